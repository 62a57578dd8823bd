-- A dependency of a PENDING task ended (in the dependent's slot; run by
-- whoever ended it, and by the sweep that repairs a release a dead process
-- did not make). It no longer waits on it; if the dependency did not
-- succeed, the task ends CANCELLED naming it; when nothing is left to wait
-- on, it is queued. Idempotent. Returns the task's state after, or
-- 'missing'.
-- KEYS: 1 task hash, 2 pending, 3 ready, 4 history, 5 history data, 6 dead,
--       7 events, 8 stats
-- ARGV: 1 id, 2 dependency id, 3 the dependency's end state, 4 events cap,
--       5 history cap
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state, band = unpack(redis.call('HMGET', KEYS[1], 'state', 'band'))
if not state then return 'missing' end
if state ~= 'pending' then return state end
redis.call('SREM', KEYS[1] .. ':deps', ARGV[2])
if ARGV[3] ~= 'succeeded' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  local why = 'dependency ' .. ARGV[2] .. ' ended ' .. string.upper(ARGV[3])
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_ms', now,
    'error', cjson.encode({ message = why, retryable = false }))
  redis.call('HINCRBY', KEYS[8], 'cancelled', 1)
  record_end(KEYS[1], ARGV[1], 'cancelled', now, KEYS[4], KEYS[5], KEYS[6], ARGV[5])
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[1], 'name',
    redis.call('HGET', KEYS[1], 'name') or '', 'state', 'cancelled', 'at', now)
  return 'cancelled'
end
if redis.call('SCARD', KEYS[1] .. ':deps') > 0 then return 'pending' end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('ZADD', KEYS[3], tonumber(band or '2') * 4398046511104 + now, ARGV[1])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[1], 'name',
  redis.call('HGET', KEYS[1], 'name') or '', 'state', 'queued', 'at', now)
return 'queued'
