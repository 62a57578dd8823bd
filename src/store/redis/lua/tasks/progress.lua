-- Progress (see TaskBackend::progress). Returns 1, or 0 when fenced. KEYS
-- and ARGV: declared in scripts.rs (PROGRESS).
local state, token = unpack(redis.call('HMGET', K_task, 'state', 'token'))
if state ~= 'running' or token ~= A_token then return 0 end
redis.call('HSET', K_task, 'progress', A_progress)
add_event(K_events, A_events_cap, A_id, redis.call('HGET', K_task, 'name'), 'running',
  'progress', A_progress, 'at', now)
return 1
