-- Keeps the "someone watches cache changes" flag alive and answers its age.
-- KEYS[1]: the flag; ARGV[1]: its TTL (ms).
-- The flag holds the Redis time (ms) it was first set, so that every koo
-- measures its age by one clock (Redis's), whatever its own clock says.
-- Returns the flag's age in ms: 0 when this call created it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = redis.call('GET', KEYS[1])
if since then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return math.max(0, now - tonumber(since))
end
redis.call('SET', KEYS[1], now, 'PX', ARGV[1])
return 0
