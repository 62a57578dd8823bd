-- Reserve (a Redis Cluster's flow control: see src/store/redis/tasks/
-- flow_cluster.rs): in flow control's own slot, the checks lease.lua makes
-- in place on one Redis, for the candidates a lease met, in the queue's
-- order (after the declared ARGV, five per candidate: id, task name, rate
-- key, concurrency key ('' when it has none) and the running-set entry it
-- would take), until the first that may start: of queue A_queue, whose
-- queue and name limits count only with A_flow '1'. KEYS and ARGV:
-- declared in scripts.rs (RESERVE). Returns
--   { 'go', n, k, bucket, interval_us, ..., scope, wait_ms, ... }
--       candidate n may start: k tokens taken (bucket, interval each) and,
--       with a concurrency key, its entry added to the key's running set;
--       then the scopes that held the candidates before it (wait 0: a cap)
--   { 'cancel', n, scope, wait_ms, ... }
--       candidate n is at its key's cap under cancel_newest
--   { 'held', scope, wait_ms, ... }
--       none may start (or the queue's own limit holds): nothing taken
--   { 'full', n, policy, now, entry, score, ... }
--       candidate n is at its key's cap, and the set may hold a stale entry
--       (one older than A_stale_ms) or the policy is cancel_oldest: its 100
--       oldest entries and the store's now (ms), for the process to repair
--       (the tasks are in other slots) before asking again with the key in
--       A_repaired (keys repaired, one per line)
-- A_drop_set, A_drop_entry: an entry the caller's finish left (see
-- leave_running), removed first in the same round trip; '' for none.
if A_drop_entry ~= '' then redis.call('ZREM', A_drop_set, A_drop_entry) end
local f = make_rates(A_flow_base)
local repaired = {}
for k in string.gmatch(A_repaired, '[^\n]+') do repaired[k] = true end
local stale_before = now - tonumber(A_stale_ms)

-- A candidate's verdict: 'go' (its tokens pushed on `writes`, its entry
-- added), 'held', 'stop' (the queue's own limit: nothing of it starts),
-- 'cancel', or 'full' with the key's policy and oldest entries.
local function check(name, rkey, ckey, entry, writes)
  if A_flow == '1' then
    if not f.rate('queues/' .. A_queue, nil, writes) then return 'stop' end
    if not f.rate('tasks/' .. name, nil, writes) then return 'held' end
  end
  if rkey and (f.backed_off(rkey) or not f.rate('keys/' .. rkey, 'keys/*', writes)) then
    return 'held'
  end
  if not ckey then return 'go' end
  if f.is_held('c:' .. ckey) then return 'held' end
  local cc = A_flow_base .. 'cc:' .. ckey
  local s = f.spec('c:keys/' .. ckey) or f.spec('c:keys/*')
  if s then
    local max, policy = string.match(s, '^(%d+) (%S+)')
    if redis.call('ZCARD', cc) >= tonumber(max) then
      if not repaired[ckey] then
        -- a repair can drop only entries older than the caller's margin:
        -- a set of younger ones costs no round trip (cancel_oldest always
        -- goes to the process, which asks the oldest task to cancel)
        local oldest = redis.call('ZRANGE', cc, 0, 0, 'WITHSCORES')
        if policy == 'cancel_oldest' or (oldest[2] and tonumber(oldest[2]) < stale_before) then
          return 'full', policy, redis.call('ZRANGE', cc, 0, 99, 'WITHSCORES')
        end
      end
      if policy == 'cancel_newest' then return 'cancel' end
      f.hold('c:' .. ckey, nil)
      return 'held'
    end
  end
  -- the set is kept for every keyed task, cap or none (a cap set later
  -- counts the tasks already running)
  redis.call('ZADD', cc, now, entry)
  return 'go'
end

local function with_scopes(out)
  for _, v in ipairs(f.held_scopes()) do out[#out + 1] = v end
  return out
end

local n = 0
for c = ARGN, #ARGV - 4, 5 do
  n = n + 1
  local rkey = ARGV[c + 2] ~= '' and ARGV[c + 2]
  local ckey = ARGV[c + 3] ~= '' and ARGV[c + 3]
  local writes = {}
  local verdict, policy, entries = check(ARGV[c + 1], rkey, ckey, ARGV[c + 4], writes)
  if verdict == 'go' then
    f.apply(writes)
    local out = { 'go', n, #writes / 3 }
    for w = 1, #writes, 3 do
      out[#out + 1] = writes[w]
      out[#out + 1] = writes[w + 2]
    end
    return with_scopes(out)
  elseif verdict == 'cancel' then
    return with_scopes({ 'cancel', n })
  elseif verdict == 'full' then
    local out = { 'full', n, policy, NOW }
    for _, v in ipairs(entries) do out[#out + 1] = v end
    return out
  elseif verdict == 'stop' then
    break
  end
end
return with_scopes({ 'held' })
