-- Ends an attempt reported under `token`: succeeded, retried after a
-- backoff, or failed for good (dead-lettered). Returns the new state, or
-- false when fenced (the lease is no longer this holder's).
-- KEYS: 1 task hash, 2 leases, 3 scheduled, 4 history, 5 history data,
--       6 dead, 7 events, 8 stats (counts per outcome)
-- ARGV: 1 id, 2 token, 3 events cap, 4 outcome ('succeeded' | 'retry' |
--       'failed' | 'timed_out'), 5 result or error JSON, 6 retry delay ms,
--       7 history cap, 8 attempt log entry JSON (ended_ms is added here)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state, token, attempts, max_retries, result_ttl = unpack(redis.call('HMGET', KEYS[1],
  'state', 'token', 'attempts', 'max_retries', 'result_ttl_ms'))
if state ~= 'running' or token ~= ARGV[2] then return false end
local outcome = ARGV[4]
if outcome == 'retry' and tonumber(attempts) > tonumber(max_retries) then
  outcome = 'failed'
end
-- everything that can fail comes before the first write: Redis does not
-- roll a script back
local entry = cjson.decode(ARGV[8])
redis.call('ZREM', KEYS[2], ARGV[1])
entry['ended_ms'] = now
if outcome == 'retry' then entry['retry_at_ms'] = now + tonumber(ARGV[6]) end
redis.call('RPUSH', KEYS[1] .. ':log', cjson.encode(entry))
redis.call('HSET', KEYS[1], 'worker', '', 'lease_until', 0)
if outcome == 'retry' then
  redis.call('HINCRBY', KEYS[8], 'retried', 1)
  redis.call('HSET', KEYS[1], 'state', 'scheduled', 'error', ARGV[5])
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[1])
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[1], 'name', redis.call('HGET', KEYS[1], 'name') or '', 'state', 'scheduled', 'at', now)
  return 'scheduled'
end
redis.call('HINCRBY', KEYS[8], outcome, 1)
local field = 'result'
if outcome ~= 'succeeded' then field = 'error' end
redis.call('HSET', KEYS[1], 'state', outcome, field, ARGV[5], 'finished_ms', now)
-- a success supersedes the errors of earlier attempts (they stay in the log)
if outcome == 'succeeded' then redis.call('HDEL', KEYS[1], 'error') end
if outcome ~= 'succeeded' then
  redis.call('ZADD', KEYS[6], now, ARGV[1])
  -- dead letters are capped like history
  redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -(tonumber(ARGV[7]) + 1))
end
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], cjson.encode({
  name = redis.call('HGET', KEYS[1], 'name'), state = outcome, attempts = tonumber(attempts),
  finished_ms = now, category = redis.call('HGET', KEYS[1], 'category') }))
-- trimmed a hundred at a time: the cap is approximate, the cost low
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[7])
if excess >= 100 then
  local old = redis.call('ZRANGE', KEYS[4], 0, excess - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, excess - 1)
  -- in chunks: unpack has a limit of a few thousand values
  for i = 1, #old, 1000 do
    redis.call('HDEL', KEYS[5], unpack(old, i, math.min(i + 999, #old)))
  end
end
redis.call('PEXPIRE', KEYS[1], result_ttl)
redis.call('PEXPIRE', KEYS[1] .. ':log', result_ttl)
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[1], 'name', redis.call('HGET', KEYS[1], 'name') or '', 'state', outcome, 'at', now)
return outcome
