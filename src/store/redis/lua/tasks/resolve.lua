-- Resolve a dependency (see TaskBackend::resolve_dependency). Idempotent.
-- Returns the task's state after, or 'missing'. KEYS and ARGV: declared in
-- scripts.rs (RESOLVE).
local state, band, expire_ms, ckey, rkey = unpack(redis.call('HMGET', K_task, 'state', 'band',
  'expire_ms', 'concurrency_key', 'rate_limit_key'))
if not state then return 'missing' end
if state ~= 'pending' then return state end
redis.call('SREM', K_task .. ':deps', A_dependency)
if A_dependency_state ~= 'succeeded' then
  redis.call('ZREM', K_pending, A_id)
  redis.call('ZREM', K_expiring, A_id)
  local why = 'dependency ' .. A_dependency .. ' ended ' .. string.upper(A_dependency_state)
  -- past its own expiry it ends as expired, whichever of the two ends it
  -- first (the sweep's order across queues must not matter)
  if expired(expire_ms) then why = 'cancelled: expired' end
  redis.call('HSET', K_task, 'state', 'cancelled', 'finished_ms', now,
    'error', cjson.encode({ message = why, retryable = false }))
  redis.call('HINCRBY', K_stats, 'cancelled', 1)
  record_end(K_task, A_id, 'cancelled', K_history, K_history_data, K_dead, A_history_cap, nil, true)
  add_event(K_events, A_events_cap, A_id, redis.call('HGET', K_task, 'name'), 'cancelled', 'at', now)
  return 'cancelled'
end
if redis.call('SCARD', K_task .. ':deps') > 0 then return 'pending' end
redis.call('ZREM', K_pending, A_id)
redis.call('HSET', K_task, 'state', 'queued')
redis.call('ZADD', K_ready, enter_score(K_ready, K_task, band, now, fair_key(ckey, rkey)), A_id)
local name = redis.call('HGET', K_task, 'name')
wake_idle(K_idle, K_wake, name)
add_event(K_events, A_events_cap, A_id, name, 'queued', 'at', now)
return 'queued'
