-- Recover (see TaskBackend::recover). Returns { how many entries were
-- handled (lapsed leases and due scheduled tasks), how many waiting tasks
-- were ended expired, the ids of those that other tasks wait on (separated
-- by spaces: the engine releases their dependents, which may be in other
-- queues' slots), then each lost first attempt's times (times_of in
-- lib.lua: name, sub-window, run, wait) }. KEYS and ARGV: declared in
-- scripts.rs (RECOVER).
local prefix = A_prefix
local due = promote_due(K_scheduled, K_ready, K_events, prefix, A_events_cap)
-- waiting tasks past their expiry end CANCELLED, even in a paused or idle
-- queue (an entry of a task that started or ended is only dropped)
local expiring = redis.call('ZRANGEBYSCORE', K_expiring, '-inf', now, 'LIMIT', 0, 100)
local expired, waited_on = 0, {}
for _, id in ipairs(expiring) do
  redis.call('ZREM', K_expiring, id)
  local key = prefix .. id
  local state, name = unpack(redis.call('HMGET', key, 'state', 'name'))
  if state == 'queued' or state == 'scheduled' or state == 'pending' then
    redis.call('ZREM', K_ready, id)
    redis.call('ZREM', K_scheduled, id)
    redis.call('ZREM', K_pending, id)
    end_expired(key, id, name, K_history, K_history_data, K_dead, K_stats, K_events,
      A_history_cap, A_events_cap)
    expired = expired + 1
    if redis.call('EXISTS', key .. ':dependents') == 1 then waited_on[#waited_on + 1] = id end
  end
end
local out = { '', tostring(expired), table.concat(waited_on, ' ') }
local requeued = false
local lapsed = redis.call('ZRANGEBYSCORE', K_leases, '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(lapsed) do
  local key = prefix .. id
  redis.call('ZREM', K_leases, id)
  local state, attempts, band, hard_until, worker, cancel, name, created, started, expire_ms, cc,
    ckey, rkey, lease_until = unpack(redis.call('HMGET', key, 'state', 'attempts', 'band',
      'hard_until', 'worker', 'cancel', 'name', 'created_ms', 'started_ms', 'expire_ms', 'cc',
      'concurrency_key', 'rate_limit_key', 'lease_until'))
  if state == 'running' then
    leave_running(key, cc)
    local outcome
    local hard = tonumber(hard_until or '0')
    -- timed out only when the hard limit came while the lease still held
    -- (a handler past its limit); a lease that lapsed first is a lost
    -- worker, however late the sweep (koo down, Redis paused) looks
    if cancel then
      outcome = 'cancelled'
    elseif hard > 0 and hard <= now and tonumber(lease_until or '0') >= hard then
      outcome = 'timed_out'
    elseif A_acks_late == '1' and not budget_spent(key) then
      outcome = 'queued'
    else
      outcome = 'failed'
    end
    redis.call('RPUSH', key .. ':log', cjson.encode({ attempt = tonumber(attempts), worker = worker,
      ended_ms = now, outcome = 'lost', error = 'worker lost: lease lapsed' }))
    redis.call('HSET', key, 'worker', '', 'lease_until', 0)
    for _, v in ipairs(times_of(name, attempts, created, started, false) or {}) do
      out[#out + 1] = v
    end
    redis.call('HINCRBY', K_stats, 'lost', 1)
    if outcome ~= 'queued' then redis.call('HINCRBY', K_stats, outcome, 1) end
    if outcome == 'queued' then
      redis.call('HSET', key, 'state', 'queued')
      redis.call('ZADD', K_ready, enter_score(K_ready, key, band, now, fair_key(ckey, rkey)), id)
      requeued = true
      -- waiting again, it may expire again (the lease ends it if it has)
      if expire_ms then redis.call('ZADD', K_expiring, expire_ms, id) end
    else
      local why = 'worker lost: lease lapsed'
      if outcome == 'timed_out' then why = 'hard time limit reached' end
      if outcome == 'cancelled' then why = 'cancelled: ' .. cancel end
      redis.call('HSET', key, 'state', outcome, 'error', cjson.encode({ message = why, retryable = false }),
        'finished_ms', now)
      record_end(key, id, outcome, K_history, K_history_data, K_dead, A_history_cap, A_dead_ttl_ms)
    end
    add_event(K_events, A_events_cap, id, name, outcome, 'at', now)
  end
end
-- the fair order's turns behind the queue's clock change nothing (a new
-- task of such a key starts after the clock): past 1,000 keys, drop those of
-- one bounded slice per sweep, so that a key per tenant or per document
-- does not grow the hash for ever
local fair = fair_hash(K_ready)
if redis.call('HLEN', fair) > 1000 then
  local clocks = {}
  local slice = redis.call('HSCAN', fair, redis.call('HGET', fair, 'cursor') or '0', 'COUNT', 500)
  local entries = slice[2]
  for j = 1, #entries, 2 do
    local b = string.match(entries[j], '^k:(%d+):')
    if b then
      if clocks[b] == nil then clocks[b] = tonumber(redis.call('HGET', fair, 'clock:' .. b) or '0') end
      if tonumber(entries[j + 1]) < clocks[b] then redis.call('HDEL', fair, entries[j]) end
    end
  end
  redis.call('HSET', fair, 'cursor', slice[1])
end
-- expired entries are counted apart (out[2]): a dependent in another queue
-- may have been ended by its dependency's release before this call on the
-- embedded store, and the handled count must not tell the stores apart
out[1] = tostring(#lapsed + due)
-- tasks due now: an idle process looks at once, not at its next poll
if requeued or due > 0 then wake_idle(K_idle, K_wake) end
return out
