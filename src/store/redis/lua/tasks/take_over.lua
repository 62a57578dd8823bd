-- Take over (see TaskBackend::take_over): a worker that re-attached a
-- running task takes its lease from whoever held it. Returns {token,
-- cancel reason or ''} with the new token, or 0 when fenced. KEYS and
-- ARGV: declared in scripts.rs (TAKE_OVER).
local state, token = unpack(redis.call('HMGET', K_task, 'state', 'token'))
if state ~= 'running' or token ~= A_token then return 0 end
local next_token = string.format('%d', tonumber(token) + 1)
local deadline = now + tonumber(A_lease_ms)
local hard = tonumber(redis.call('HGET', K_task, 'hard_until') or '0')
local score = deadline
if hard > 0 and hard < score then score = hard end
redis.call('HSET', K_task, 'token', next_token, 'worker', A_worker, 'lease_until', deadline)
-- not a give-back (see Task::given_back)
redis.call('HINCRBY', K_task, 'takeovers', 1)
redis.call('ZADD', K_leases, 'XX', score, A_id)
local reason = redis.call('HGET', K_task, 'cancel') or ''
return {next_token, reason}
