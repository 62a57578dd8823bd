-- Cancels a task that has not ended. Waiting (queued, scheduled, pending)
-- it ends CANCELLED here; running, the cancel is recorded for its worker
-- (told at its next heartbeat), whose report then ends it CANCELLED (unless
-- it succeeded first), and the sweep ends it so if the worker is gone.
-- Returns 'cancelled', 'cancelling', 'missing', or 'ended:' and the end
-- state it already has.
-- KEYS: 1 task hash, 2 ready, 3 scheduled, 4 history, 5 history data, 6 dead,
--       7 events, 8 stats, 9 pending
-- ARGV: 1 id, 2 events cap, 3 history cap, 4 reason
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'running' then
  if not redis.call('HGET', KEYS[1], 'cancel') then
    redis.call('HSET', KEYS[1], 'cancel', ARGV[4])
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[2], '*', 'id', ARGV[1], 'name',
      redis.call('HGET', KEYS[1], 'name') or '', 'state', 'running', 'cancel', ARGV[4], 'at', now)
  end
  return 'cancelling'
end
if state ~= 'queued' and state ~= 'scheduled' and state ~= 'pending' then return 'ended:' .. state end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_ms', now,
  'error', cjson.encode({ message = 'cancelled: ' .. ARGV[4], retryable = false }))
redis.call('HINCRBY', KEYS[8], 'cancelled', 1)
record_end(KEYS[1], ARGV[1], 'cancelled', now, KEYS[4], KEYS[5], KEYS[6], ARGV[3])
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[2], '*', 'id', ARGV[1], 'name',
  redis.call('HGET', KEYS[1], 'name') or '', 'state', 'cancelled', 'at', now)
return 'cancelled'
