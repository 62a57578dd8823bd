-- Replaces a compute lock's value if it is still held under the token,
-- keeping its expiry.
-- KEYS[1]: the lock. ARGV[1]: the token; ARGV[2]: the new value.
-- Returns 1 when replaced, else 0.
local value = redis.call('GET', KEYS[1])
if value and (value == ARGV[1] or string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. '|') then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', left)
    return 1
  end
end
return 0
