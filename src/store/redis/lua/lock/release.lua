-- Deletes a compute lock if it is still held under the token (its value is
-- the token, or the token, '|' and a task id).
-- KEYS[1]: the lock. ARGV[1]: the token. Returns 1 when deleted, else 0.
local value = redis.call('GET', KEYS[1])
if value and (value == ARGV[1] or string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. '|') then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
