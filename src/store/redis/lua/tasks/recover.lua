-- Recovers tasks whose lease lapsed (worker killed, paused, partitioned):
-- back to `ready` while retries remain and acks are late, else FAILED
-- ('worker lost'); past its hard limit, TIMED_OUT; CANCELLED when a cancel
-- was asked for. Returns how many.
-- Also moves due SCHEDULED tasks to `ready`, so that they show as queued
-- even when no worker is looking at this queue.
-- KEYS: 1 leases, 2 ready, 3 history, 4 history data, 5 dead, 6 events, 7 stats,
--       8 scheduled
-- ARGV: 1 task key prefix, 2 events cap, 3 acks late ('1' | '0'), 4 history cap,
--       5 dead-letter TTL ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[8], id)
  if redis.call('HGET', prefix .. id, 'state') == 'scheduled' then
  local band = tonumber(redis.call('HGET', prefix .. id, 'band') or '2')
  redis.call('ZADD', KEYS[2], band * 4398046511104 + now, id)
  redis.call('HSET', prefix .. id, 'state', 'queued')
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[2], '*', 'id', id, 'name', redis.call('HGET', prefix .. id, 'name') or '',
    'state', 'queued', 'at', now)
  end
end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(lapsed) do
  local key = prefix .. id
  redis.call('ZREM', KEYS[1], id)
  local state, attempts, band, hard_until, worker, cancel = unpack(redis.call('HMGET', key,
    'state', 'attempts', 'band', 'hard_until', 'worker', 'cancel'))
  if state == 'running' then
    local outcome
    local hard = tonumber(hard_until or '0')
    if cancel then
      outcome = 'cancelled'
    elseif hard > 0 and hard <= now then
      outcome = 'timed_out'
    elseif ARGV[3] == '1' and not budget_spent(key) then
      outcome = 'queued'
    else
      outcome = 'failed'
    end
    redis.call('RPUSH', key .. ':log', cjson.encode({ attempt = tonumber(attempts), worker = worker,
      ended_ms = now, outcome = 'lost', error = 'worker lost: lease lapsed' }))
    redis.call('HSET', key, 'worker', '', 'lease_until', 0)
    redis.call('HINCRBY', KEYS[7], 'lost', 1)
    if outcome ~= 'queued' then redis.call('HINCRBY', KEYS[7], outcome, 1) end
    if outcome == 'queued' then
      redis.call('HSET', key, 'state', 'queued')
      redis.call('ZADD', KEYS[2], tonumber(band or '2') * 4398046511104 + now, id)
    else
      local why = 'worker lost: lease lapsed'
      if outcome == 'timed_out' then why = 'hard time limit reached' end
      if outcome == 'cancelled' then why = 'cancelled: ' .. cancel end
      redis.call('HSET', key, 'state', outcome, 'error', cjson.encode({ message = why, retryable = false }),
        'finished_ms', now)
      record_end(key, id, outcome, now, KEYS[3], KEYS[4], KEYS[5], ARGV[4], ARGV[5])
    end
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[2], '*', 'id', id, 'name', redis.call('HGET', key, 'name') or '', 'state', outcome, 'at', now)
  end
end
return #lapsed + #due
