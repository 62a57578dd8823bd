-- Claim an idempotency key (see TaskBackend::claim_idempotency): unless a
-- live claim holds it, `A_value` is stored for `A_ttl_ms`. Returns false
-- when claimed now, else the value of the claim that holds it. KEYS and
-- ARGV: declared in scripts.rs (IDEM_CLAIM).
-- The key's real TTL is stretched by the clock's offset (CLOCK_OFFSET from the
-- prelude, 0 in production), so that it expires at now + TTL on the store's clock, and a
-- claim is live while more of its TTL is left than the offset: a test
-- that moves the clock sees claims expire as on the embedded store.
local offset = CLOCK_OFFSET
local left = redis.call('PTTL', K_claim)
if left == -1 or left > offset then
  local held = redis.call('GET', K_claim)
  if held then return held end
end
redis.call('SET', K_claim, A_value, 'PX', math.max(1, tonumber(A_ttl_ms) + offset))
return false
