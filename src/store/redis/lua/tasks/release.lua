-- Hands a running task back to its queue at once (its worker is stopping
-- before the task ended): the attempt is given back and logged as handed
-- back, and the task is queued again in its original place (by creation
-- time) rather than waiting for its lease to lapse. Returns 1, or 0 when
-- fenced.
-- KEYS: 1 task hash, 2 leases, 3 ready, 4 events
-- ARGV: 1 id, 2 token, 3 events cap, 4 attempt log entry JSON (ended_ms is added here)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state, token, band, created = unpack(redis.call('HMGET', KEYS[1],
  'state', 'token', 'band', 'created_ms'))
if state ~= 'running' or token ~= ARGV[2] then return 0 end
-- everything that can fail comes before the first write
local entry = cjson.decode(ARGV[4])
entry['ended_ms'] = now
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[1] .. ':log', cjson.encode(entry))
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker', '', 'lease_until', 0)
redis.call('HDEL', KEYS[1], 'progress')
redis.call('ZADD', KEYS[3], tonumber(band or '2') * 4398046511104 + tonumber(created or now), ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[1], 'name',
  redis.call('HGET', KEYS[1], 'name') or '', 'state', 'queued', 'at', now)
return 1
