-- Replaces an idempotency key's claim `ARGV[1]` with `ARGV[2]` (TTL ARGV[3]
-- ms) only if it still holds `ARGV[1]`: taking over a claim whose task never
-- got stored (its submitter died between the claim and the submit), with
-- no race against another submitter doing the same. Returns 1 if replaced.
-- An empty ARGV[2] deletes the claim instead (a submit that failed).
-- KEYS: 1 idempotency key
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
