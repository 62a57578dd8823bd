-- Swap an idempotency claim (see TaskBackend::swap_idempotency): replaces
-- live claim `A_old` with `A_new` (TTL `A_ttl_ms`) only if it still holds
-- `A_old`: taking over a claim whose task never got stored, with no race
-- against another submitter doing the same. An empty `A_new` deletes the
-- claim instead. Returns 1 if replaced. KEYS and ARGV: declared in
-- scripts.rs (IDEM_SWAP). Liveness and TTL as in idem_claim.lua.
local offset = CLOCK_OFFSET
local left = redis.call('PTTL', K_claim)
if left ~= -1 and left <= offset then return 0 end
if redis.call('GET', K_claim) ~= A_old then return 0 end
if A_new == '' then
  redis.call('DEL', K_claim)
else
  redis.call('SET', K_claim, A_new, 'PX', math.max(1, tonumber(A_ttl_ms) + offset))
end
return 1
