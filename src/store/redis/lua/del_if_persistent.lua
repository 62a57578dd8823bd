-- Deletes each of KEYS that has no TTL, atomically per key so that a value
-- koo writes (always with a TTL) between the scan and this script survives.
-- Returns how many keys were deleted.
local deleted = 0
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) == -1 then
    redis.call('DEL', key)
    deleted = deleted + 1
  end
end
return deleted
