-- Cancel (see TaskBackend::cancel). Returns 'cancelled', 'cancelling',
-- 'missing', or 'ended:' and the end state it already has. KEYS and ARGV:
-- declared in scripts.rs (CANCEL).
local state = redis.call('HGET', K_task, 'state')
if not state then return 'missing' end
if state == 'running' then
  if not redis.call('HGET', K_task, 'cancel') then
    redis.call('HSET', K_task, 'cancel', A_reason)
    add_event(K_events, A_events_cap, A_id, redis.call('HGET', K_task, 'name'), 'running',
      'cancel', A_reason, 'at', now)
  end
  return 'cancelling'
end
-- (A_only_running '1': asking a running task only, as a cap's cancel_oldest
-- does on a Cluster; one that no longer runs is left as it is)
if A_only_running == '1' then return 'ended:' .. state end
if state ~= 'queued' and state ~= 'scheduled' and state ~= 'pending' then return 'ended:' .. state end
redis.call('ZREM', K_ready, A_id)
redis.call('ZREM', K_scheduled, A_id)
redis.call('ZREM', K_pending, A_id)
redis.call('ZREM', K_expiring, A_id)
redis.call('HSET', K_task, 'state', 'cancelled', 'finished_ms', now,
  'error', cjson.encode({ message = 'cancelled: ' .. A_reason, retryable = false }))
redis.call('HINCRBY', K_stats, 'cancelled', 1)
record_end(K_task, A_id, 'cancelled', K_history, K_history_data, K_dead, A_history_cap, nil, true)
add_event(K_events, A_events_cap, A_id, redis.call('HGET', K_task, 'name'), 'cancelled', 'at', now)
return 'cancelled'
