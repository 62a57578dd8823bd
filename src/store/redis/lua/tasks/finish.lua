-- Ends an attempt reported under `token`: succeeded, retried after a
-- backoff, failed for good (dead-lettered), or cancelled when a cancel was
-- asked for while it ran and it did not succeed. Returns the new state
-- (with '+' appended when the task ended and other tasks wait on it, so
-- that the caller releases them only then), or false when fenced.
-- KEYS: 1 task hash, 2 leases, 3 scheduled, 4 history, 5 history data,
--       6 dead, 7 events, 8 stats (counts per outcome)
-- ARGV: 1 id, 2 token, 3 events cap, 4 outcome ('succeeded' | 'retry' |
--       'failed' | 'timed_out' | 'cancelled'), 5 result or error JSON, 6 retry delay ms,
--       7 history cap, 8 attempt log entry JSON (ended_ms is added here),
--       9 dead-letter TTL ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state, token, cancel = unpack(redis.call('HMGET', KEYS[1], 'state', 'token', 'cancel'))
if state ~= 'running' or token ~= ARGV[2] then return false end
local outcome = ARGV[4]
if outcome == 'retry' and budget_spent(KEYS[1]) then
  outcome = 'failed'
end
-- a cancel asked for while it ran: any end but success is the cancel's
local payload = ARGV[5]
if cancel and outcome ~= 'succeeded' then
  outcome = 'cancelled'
  payload = cjson.encode({ message = 'cancelled: ' .. cancel, retryable = false })
end
-- everything that can fail comes before the first write: Redis does not
-- roll a script back
local entry = cjson.decode(ARGV[8])
entry['ended_ms'] = now
if outcome == 'retry' then entry['retry_at_ms'] = now + tonumber(ARGV[6]) end
local logged = cjson.encode(entry)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[1] .. ':log', logged)
redis.call('HSET', KEYS[1], 'worker', '', 'lease_until', 0)
if outcome == 'retry' then
  redis.call('HINCRBY', KEYS[8], 'retried', 1)
  redis.call('HSET', KEYS[1], 'state', 'scheduled', 'error', payload)
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[1])
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[1], 'name', redis.call('HGET', KEYS[1], 'name') or '', 'state', 'scheduled', 'at', now)
  return 'scheduled'
end
redis.call('HINCRBY', KEYS[8], outcome, 1)
local field = 'result'
if outcome ~= 'succeeded' then field = 'error' end
redis.call('HSET', KEYS[1], 'state', outcome, field, payload, 'finished_ms', now)
-- a success supersedes the errors of earlier attempts (they stay in the log)
if outcome == 'succeeded' then redis.call('HDEL', KEYS[1], 'error') end
record_end(KEYS[1], ARGV[1], outcome, now, KEYS[4], KEYS[5], KEYS[6], ARGV[7], ARGV[9])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[1], 'name', redis.call('HGET', KEYS[1], 'name') or '', 'state', outcome, 'at', now)
if redis.call('EXISTS', KEYS[1] .. ':dependents') == 1 then return outcome .. '+' end
return outcome
