-- Retry (see TaskBackend::retry). Returns 'queued', 'missing', or 'in:'
-- and the state it is in. KEYS and ARGV: declared in scripts.rs (RETRY).
local state, attempts, band, ckey, rkey = unpack(redis.call('HMGET', K_task, 'state', 'attempts',
  'band', 'concurrency_key', 'rate_limit_key'))
if not state then
  -- its result expired: a dead letter that can no longer run is dropped
  redis.call('ZREM', K_dead, A_id)
  return 'missing'
end
if state ~= 'failed' and state ~= 'timed_out' and state ~= 'cancelled' then return 'in:' .. state end
redis.call('ZREM', K_history, A_id)
redis.call('HDEL', K_history_data, A_id)
redis.call('ZREM', K_dead, A_id)
redis.call('PERSIST', K_task)
redis.call('PERSIST', K_task .. ':log')
-- its dependents were released as it ended (the embedded store forgets
-- them then): waiting on it is over
redis.call('DEL', K_task .. ':dependents')
redis.call('HSET', K_task, 'state', 'queued', 'attempt_base', attempts)
-- an operator's requeue runs it whenever it can: its expiry is dropped
redis.call('HDEL', K_task, 'cancel', 'finished_ms', 'error', 'result', 'progress', 'expire_ms')
redis.call('ZADD', K_ready, enter_score(K_ready, K_task, band, now, fair_key(ckey, rkey)), A_id)
local name = redis.call('HGET', K_task, 'name')
wake_idle(K_idle, K_wake, name)
redis.call('HINCRBY', K_stats, 'requeued', 1)
add_event(K_events, A_events_cap, A_id, name, 'queued', 'at', now)
return 'queued'
