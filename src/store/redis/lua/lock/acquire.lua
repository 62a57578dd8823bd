-- Takes a compute lock unless someone holds it.
-- KEYS[1]: the lock. ARGV[1]: the token; ARGV[2]: the lease (ms).
-- Returns {1} when taken, else {0, the holder's value, its PTTL (ms)}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1}
end
local value = redis.call('GET', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
return {0, value or '', left}
