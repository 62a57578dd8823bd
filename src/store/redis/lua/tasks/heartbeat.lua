-- Extends a lease held with `token`. Returns 1, 2 when a cancel was asked
-- for (the worker should stop the task), or 0 when the lease is no longer
-- this holder's (fenced: the caller must stop and report nothing).
-- KEYS: 1 task hash, 2 leases
-- ARGV: 1 id, 2 token, 3 lease ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state, token = unpack(redis.call('HMGET', KEYS[1], 'state', 'token'))
if state ~= 'running' or token ~= ARGV[2] then return 0 end
local deadline = now + tonumber(ARGV[3])
local hard = tonumber(redis.call('HGET', KEYS[1], 'hard_until') or '0')
local score = deadline
if hard > 0 and hard < score then score = hard end
redis.call('HSET', KEYS[1], 'lease_until', deadline)
redis.call('ZADD', KEYS[2], 'XX', score, ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then return 2 end
return 1
