-- Reserve (a Redis Cluster's flow control: see src/store/redis/tasks/
-- flow_cluster.rs): in flow control's own slot, the checks lease.lua makes
-- in place on one Redis, for one candidate the lease met (A_id, of queue
-- A_queue, task name A_name; A_rkey and A_ckey '' when it has none; the
-- queue's and name's limits only with A_flow '1'). KEYS and ARGV: declared
-- in scripts.rs (RESERVE). Returns
--   { 'go', bucket, interval_us, ... }  tokens taken, and entry A_entry
--                                       added to the key's running set
--   { 'held', scope, wait_ms, ... }     nothing taken; wait 0: a cap
--   { 'cancel' }                        at the cap, cancel_newest
--   { 'full', policy, now, entry, score, ... } at the cap and A_repaired
--                                       '0': its 100 oldest entries (and
--                                       the store's now, ms), for the
--                                       process to repair (the tasks are
--                                       in other slots) before asking again
-- A_drop_set, A_drop_entry: an entry the caller's finish left (see
-- leave_running), removed first in the same round trip; '' for none.
if A_drop_entry ~= '' then redis.call('ZREM', A_drop_set, A_drop_entry) end
local f = make_rates(A_flow_base)
local writes = {}
local rkey = A_rkey ~= '' and A_rkey
local ckey = A_ckey ~= '' and A_ckey
local function held()
  local out = f.held_scopes()
  table.insert(out, 1, 'held')
  return out
end
if A_flow == '1' then
  if not f.rate('queues/' .. A_queue, nil, writes) then return held() end
  if not f.rate('tasks/' .. A_name, nil, writes) then return held() end
end
if rkey and (f.backed_off(rkey) or not f.rate('keys/' .. rkey, 'keys/*', writes)) then
  return held()
end
if ckey then
  local cc = A_flow_base .. 'cc:' .. ckey
  local s = f.spec('c:keys/' .. ckey) or f.spec('c:keys/*')
  if s then
    local max, policy = string.match(s, '^(%d+) (%S+)')
    if redis.call('ZCARD', cc) >= tonumber(max) then
      if A_repaired ~= '1' then
        local out = redis.call('ZRANGE', cc, 0, 99, 'WITHSCORES')
        table.insert(out, 1, NOW)
        table.insert(out, 1, policy)
        table.insert(out, 1, 'full')
        return out
      end
      if policy == 'cancel_newest' then return { 'cancel' } end
      f.hold('c:' .. ckey, nil)
      return held()
    end
  end
  -- the set is kept for every keyed task, cap or none (a cap set later
  -- counts the tasks already running)
  redis.call('ZADD', cc, now, A_entry)
end
f.apply(writes)
local out = { 'go' }
for w = 1, #writes, 3 do
  out[#out + 1] = writes[w]
  out[#out + 1] = writes[w + 2]
end
return out
