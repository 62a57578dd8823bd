-- Back off a rate-limit key (see TaskBackend::back_off): no task with the
-- key starts before now + A_wait_ms on the store's clock, or a later
-- back-off already set (a shorter one never shortens it). The key holds
-- the end (ms) and expires a second after it. Returns the end.
local until_ms = now + tonumber(A_wait_ms)
local current = tonumber(redis.call('GET', K_flow) or '0')
if current >= until_ms then return current end
redis.call('SET', K_flow, string.format('%d', until_ms), 'PX', tonumber(A_wait_ms) + 1000)
return until_ms
