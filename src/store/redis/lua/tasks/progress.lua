-- Records progress reported under `token`. Returns 1, or 0 when fenced.
-- KEYS: 1 task hash, 2 events
-- ARGV: 1 id, 2 token, 3 events cap, 4 progress JSON
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state, token = unpack(redis.call('HMGET', KEYS[1], 'state', 'token'))
if state ~= 'running' or token ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[1], 'name', redis.call('HGET', KEYS[1], 'name') or '', 'state', 'running',
  'progress', ARGV[4], 'at', now)
return 1
