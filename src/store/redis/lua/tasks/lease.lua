-- Lease (see TaskBackend::lease_or_hold). Returns the task hash as a flat
-- list; false when nothing waits; or, when limits hold every candidate
-- looked at, an integer: how long from now (ms, at least 1) until the
-- first held rate limit or back-off frees, 0 when only concurrency caps
-- held. KEYS and ARGV:
-- declared in scripts.rs (LEASE); after the declared ARGV, the task names
-- served ('*' = all). On a Redis Cluster a reserving caller may also get
-- { 'need', ... } (see `reserved` below).
local prefix = A_prefix
-- in a batch (finish_batch.lua) each lease names its own worker, and the
-- leases after the first find due tasks promoted and the queue not paused
local worker = LEASE_WORKER or A_worker
if not LEASE_AGAIN then
  promote_due(K_scheduled, K_ready, K_events, prefix, A_events_cap)
  -- a paused queue hands out nothing (due tasks still become QUEUED)
  if redis.call('EXISTS', K_paused) == 1 then return false end
end
local serves_all, served = false, {}
for i = ARGN, #ARGV do
  if ARGV[i] == '*' then serves_all = true end
  served[ARGV[i]] = true
end

-- Flow control (see TaskBackend's "Flow control"): its state and checks,
-- made only when a candidate needs them (a keyed task, or a process that
-- knows of a queue or name limit: A_flow '1'), so that a plain lease pays
-- for none of it. Limits are read from the limits hash only for what a
-- candidate needs.
local per_call = A_flow == '1'
local function make_flow()
  local f = make_rates(A_flow_base)
  local fb, spec, hold = A_flow_base, f.spec, f.hold
  -- cancel_oldest: the key's longest-running task is asked to cancel (as
  -- cancel.lua asks a running task), unless one of them already was.
  local function ask_oldest(cc, ckey, newcomer)
    local running = redis.call('ZRANGE', cc, 0, 99)
    for _, member in ipairs(running) do
      if redis.call('HEXISTS', member, 'cancel') == 1 then return end
    end
    local oldest = running[1]
    if not oldest then return end
    local oid, oname = unpack(redis.call('HMGET', oldest, 'id', 'name'))
    local reason = 'concurrency cap of ' .. ckey .. ': superseded by ' .. newcomer
    redis.call('HSET', oldest, 'cancel', reason)
    local events = string.sub(oldest, 1, #oldest - #oid - 5) .. 'events'
    add_event(events, A_events_cap, oid, oname, 'running', 'cancel', reason, 'at', now)
  end
  -- Concurrency key `ckey`'s verdict for candidate `id`: 'go', 'hold' or
  -- 'cancel' (cancel_newest), and the key's running set.
  local repaired = {}
  local function cap(ckey, id)
    local cc = fb .. 'cc:' .. ckey
    if f.is_held('c:' .. ckey) then return 'hold', cc end
    local s = spec('c:keys/' .. ckey) or spec('c:keys/*')
    if not s then return 'go', cc end
    local max, policy = string.match(s, '^(%d+) (%S+)')
    max = tonumber(max)
    if redis.call('ZCARD', cc) >= max then
      -- at the cap: first drop entries of tasks that no longer run under the
      -- key (a repair, of the 100 oldest, once per key per call; every end
      -- of an attempt removes its own)
      if not repaired[cc] then
        repaired[cc] = true
        for _, member in ipairs(redis.call('ZRANGE', cc, 0, 99)) do
          if redis.call('HGET', member, 'cc') ~= cc then redis.call('ZREM', cc, member) end
        end
      end
      if redis.call('ZCARD', cc) >= max then
        -- a task others wait on waits instead: its dependents could not be
        -- released here (the lease's reply cannot name them)
        if policy == 'cancel_newest' and redis.call('EXISTS', prefix .. id .. ':dependents') == 0 then
          return 'cancel', cc
        end
        if policy == 'cancel_oldest' then ask_oldest(cc, ckey, id) end
        hold('c:' .. ckey, nil)
        return 'hold', cc
      end
    end
    return 'go', cc
  end
  f.cap = cap
  return f
end
local F = false
local function flow()
  if not F then F = make_flow() end
  return F
end

-- On a Redis Cluster (A_cluster '1') flow control's keys live in their own
-- slot, out of this script's reach: the process reserves a candidate's
-- tokens and cap there first (reserve.lua; see src/store/redis/tasks/
-- flow_cluster.rs) and names the reservation in A_grant: 'go', the id and
-- its running-set entry (or ''), or 'cancel' and the id (cancel_newest at
-- the cap), one per line; A_denied holds the scopes it found held, one
-- per line, and 'id:<id>' for a candidate another lease of the process is
-- reserving. A candidate that needs flow control and was not reserved
-- ends the call with 1 (held for 1 ms: the caller's next lease is one that
-- reserves) unless the caller reserves (A_grant not ''); then the call
-- names up to A_cluster such candidates (the caller asks for more than one
-- once it has met held ones: a head of many held keys costs one
-- reservation, not one each) and ends at the next one that could start
-- or at the end of the scan: { 'need', id, name, rate key, concurrency
-- key, ... }, in the queue's order.
local cluster = A_cluster ~= '0'
local needs_max = tonumber(A_cluster)
local needs = { 'need' }
local grant_verdict, grant_id, grant_entry = string.match(A_grant, '^(%a+)\n([^\n]*)\n?(.*)$')
local denied, cluster_held = {}, false
for scope in string.gmatch(A_denied, '[^\n]+') do denied[scope] = true end
-- A candidate's verdict on a Cluster: as flow().rate/cap's, plus 'stop'
-- (the queue's own limit holds: nothing of it starts) and 'need'; the
-- running-set entry that a 'go' records in the task's hash.
local function reserved(id, name, rkey, ckey)
  -- another lease of the caller's process is reserving it: left to that one
  if denied['id:' .. id] then return 'hold' end
  if id == grant_id then
    if grant_verdict == 'cancel' and redis.call('EXISTS', prefix .. id .. ':dependents') == 1 then
      cluster_held = true
      return 'hold'
    end
    return grant_verdict, ckey and ('@' .. A_flow_base .. 'cc:' .. ckey .. '\n' .. grant_entry)
  end
  if per_call and denied['queues/' .. A_queue] then return 'stop' end
  if (per_call and denied['tasks/' .. name]) or (rkey and (denied['b:' .. rkey] or denied['keys/' .. rkey]))
      or (ckey and denied['c:' .. ckey]) then
    cluster_held = true
    return 'hold'
  end
  return 'need'
end

-- Candidates are read a few at a time (1, then 16, then the rest of the
-- scan limit): the head of the queue is almost always the answer, and
-- reading a hundred ids per lease would cost more than the lease itself.
local limit, from, chunk = tonumber(A_scan), 0, 1
local candidates = {}
local function more()
  if from >= limit then return false end
  local upto = math.min(from + chunk, limit) - 1
  local got
  -- the head alone, the commonest read, without formatting two numbers
  if upto == 0 then got = redis.call('ZRANGE', K_ready, '0', '0')
  else got = redis.call('ZRANGE', K_ready, from, upto) end
  from = upto + 1
  chunk = 16
  if #got == 0 then return false end
  for _, id in ipairs(got) do candidates[#candidates + 1] = id end
  return true
end
-- expired candidates are never handed out: one that no task waits on is
-- ended on the way; one that others wait on is left to the sweep, which
-- ends it and releases them in the same pass (as the embedded store does).
-- The first 100 of a call do not count against the scan limit (so a pile
-- of them cannot hide the live tasks behind it); more take a place each,
-- which bounds a call's work. Held candidates are counted the same way.
local i, expired_seen, held_seen = 0, 0, 0
while true do
  i = i + 1
  if i > #candidates and not more() then break end
  local id = candidates[i]
  local key = prefix .. id
  -- one read for everything the lease needs (each redis.call costs about
  -- as much as the fields it reads: the counters and hard limit come with it)
  local name, state, expire_ms, dkey, rkey, ckey, hard_ms, attempts, token = unpack(redis.call(
    'HMGET', key, 'name', 'state', 'expire_ms', 'debounce_key', 'rate_limit_key',
    'concurrency_key', 'hard_ms', 'attempts', 'token'))
  if not name or state ~= 'queued' then
    -- a ready entry whose task is gone or has moved on: drop it (the
    -- ranks after it shift down by one)
    redis.call('ZREM', K_ready, id)
    from = from - 1
  elseif expired(expire_ms) then
    -- never hand out a task past its expiry, whatever the sweep's timing
    expired_seen = expired_seen + 1
    if redis.call('EXISTS', key .. ':dependents') == 0 then
      redis.call('ZREM', K_ready, id)
      redis.call('ZREM', K_expiring, id)
      end_expired(key, id, name, K_history, K_history_data, K_dead, K_stats, K_events,
        A_history_cap, A_events_cap)
      -- the ranks after it shift down by one
      from = from - 1
      if expired_seen > 100 then limit = limit - 1 end
    elseif expired_seen <= 100 then
      -- skipped: its place is given back to the scan
      limit = limit + 1
    end
  elseif serves_all or served[name] then
    local verdict, writes, cc = 'go', false, false
    if cluster and (per_call or rkey or ckey) then
      verdict, cc = reserved(id, name, rkey, ckey)
      if verdict == 'stop' then return 0 end
      if verdict == 'need' then
        if A_grant == '' then return 1 end
        local at = #needs
        needs[at + 1], needs[at + 2], needs[at + 3], needs[at + 4] = id, name, rkey or '', ckey or ''
        if (at + 3) / 4 >= needs_max then return needs end
        -- looked at later than those before it: passed over for now
        verdict = 'hold'
      end
    elseif per_call or rkey or ckey then
      local f = flow()
      writes = {}
      if per_call then
        -- no token for the queue: nothing of it starts in this call
        if not f.rate('queues/' .. A_queue, nil, writes) then return f.held() end
        if not f.rate('tasks/' .. name, nil, writes) then verdict = 'hold' end
      end
      if verdict == 'go' and rkey
          and (f.backed_off(rkey) or not f.rate('keys/' .. rkey, 'keys/*', writes)) then
        verdict = 'hold'
      end
      if verdict == 'go' and ckey then verdict, cc = f.cap(ckey, id) end
    end
    if verdict ~= 'hold' and #needs > 1 then
      -- a candidate before this one may start first: reserve them
      return needs
    end
    if verdict == 'hold' then
      -- it stays QUEUED, untouched; the scan goes on
      held_seen = held_seen + 1
      if held_seen <= 100 then limit = limit + 1 end
    elseif verdict == 'cancel' then
      -- cancel_newest: it ends without running (its dependents are
      -- released by the sweep's repair, as an expired task's)
      redis.call('ZREM', K_ready, id)
      if expire_ms then redis.call('ZREM', K_expiring, id) end
      end_unrun(key, id, name, 'cancelled: concurrency cap of ' .. ckey .. ' reached', K_history,
        K_history_data, K_dead, K_stats, K_events, A_history_cap, A_events_cap)
      from = from - 1
      -- counted with the held ones: past 100, each takes a place
      held_seen = held_seen + 1
      if held_seen > 100 then limit = limit - 1 end
    else
      if writes then F.apply(writes) end
      redis.call('ZREM', K_ready, id)
      if cc then
        -- (on a Cluster the reservation made the entry: see leave_running)
        if not cluster then redis.call('ZADD', cc, now, key) end
        redis.call('HSET', key, 'cc', cc)
      end
      if rkey or ckey then
        -- the queue's fair clock moves to this task's turn
        local fair = fair_hash(K_ready)
        local vt, band = unpack(redis.call('HMGET', key, 'vt', 'band'))
        local field = 'clock:' .. (band or '2')
        local clock = redis.call('HGET', fair, field)
        if vt and (not clock or tonumber(vt) > tonumber(clock)) then
          redis.call('HSET', fair, field, vt)
        end
      end
      -- started: a later submit with its debounce key makes a new task
      forget_debounce(key, id, dkey)
      -- it starts in time: it no longer expires (until it waits again)
      if expire_ms then redis.call('ZREM', K_expiring, id) end
      local attempt = (tonumber(attempts) or 0) + 1
      local attempt_s = string.format('%d', attempt)
      local deadline = now + tonumber(A_lease_ms)
      local deadline_s = string.format('%d', deadline)
      local hard = tonumber(hard_ms or '0')
      local hard_deadline, hard_s = 0, '0'
      if hard > 0 then
        hard_deadline = now + hard
        hard_s = string.format('%d', hard_deadline)
      end
      -- the fencing token grows with every lease (attempts can be given back)
      redis.call('HSET', key, 'state', 'running', 'worker', worker, 'attempts', attempt_s,
        'token', string.format('%d', (tonumber(token) or 0) + 1), 'started_ms', NOW,
        'lease_until', deadline_s, 'hard_until', hard_s)
      -- progress belongs to an attempt (a first one has none: RetryTask
      -- and a hand-back delete it)
      if attempt > 1 then redis.call('HDEL', key, 'progress') end
      local score = deadline_s
      if hard_deadline > 0 and hard_deadline < deadline then score = hard_s end
      redis.call('ZADD', K_leases, score, id)
      add_event(K_events, A_events_cap, id, name, 'running', 'attempt', attempt_s, 'worker', worker, 'at', NOW)
      return redis.call('HGETALL', key)
    end
  end
end
if #needs > 1 then return needs end
if F then return F.held() or false end
-- (on a Cluster the caller knows until when what it found held frees)
if cluster_held then return 0 end
return false
