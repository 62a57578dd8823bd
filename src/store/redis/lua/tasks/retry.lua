-- RetryTask: a FAILED, TIMED_OUT or CANCELLED task is queued again under
-- the same id with a fresh retry budget (attempts count on; the budget
-- counts from here). It leaves history and the dead letters; its attempt
-- log stays. Returns 'queued', 'missing', or 'in:' and the state it is in.
-- KEYS: 1 task hash, 2 ready, 3 history, 4 history data, 5 dead, 6 events, 7 stats
-- ARGV: 1 id, 2 events cap
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state, attempts, band = unpack(redis.call('HMGET', KEYS[1], 'state', 'attempts', 'band'))
if not state then
  -- its result expired: a dead letter that can no longer run is dropped
  redis.call('ZREM', KEYS[5], ARGV[1])
  return 'missing'
end
if state ~= 'failed' and state ~= 'timed_out' and state ~= 'cancelled' then return 'in:' .. state end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[1] .. ':log')
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt_base', attempts)
redis.call('HDEL', KEYS[1], 'cancel', 'finished_ms', 'error', 'result', 'progress')
redis.call('ZADD', KEYS[2], tonumber(band or '2') * 4398046511104 + now, ARGV[1])
redis.call('HINCRBY', KEYS[7], 'requeued', 1)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[2], '*', 'id', ARGV[1], 'name',
  redis.call('HGET', KEYS[1], 'name') or '', 'state', 'queued', 'at', now)
return 'queued'
