-- Heartbeat (see TaskBackend::heartbeat). Returns 1, the cancel's reason
-- (a string) when a cancel was asked for (the worker should stop the task),
-- or 0 when fenced. KEYS and ARGV: declared in scripts.rs (HEARTBEAT).
local state, token = unpack(redis.call('HMGET', K_task, 'state', 'token'))
if state ~= 'running' or token ~= A_token then return 0 end
local deadline = now + tonumber(A_lease_ms)
local hard = tonumber(redis.call('HGET', K_task, 'hard_until') or '0')
local score = deadline
if hard > 0 and hard < score then score = hard end
redis.call('HSET', K_task, 'lease_until', deadline)
redis.call('ZADD', K_leases, 'XX', score, A_id)
local reason = redis.call('HGET', K_task, 'cancel')
if reason then return reason end
return 1
