-- Stores a new task and makes it visible: QUEUED in `ready`, SCHEDULED in
-- `scheduled`, or PENDING in `pending` while it waits on dependencies (kept
-- in its `:deps` set). One event is appended.
-- KEYS: 1 task hash, 2 ready, 3 scheduled, 4 events, 5 stats, 6 pending
-- ARGV: 1 id, 2 priority band (0 critical .. 3 low), 3 delay ms (0: queue now),
--       4 events cap, 5 number N of dependencies waited on, 6..5+N their ids,
--       then field, value pairs of the task hash
-- Times come from Redis's clock, the one clock every koo instance shares.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('EXISTS task ' .. ARGV[1] .. ' already exists')
end
local deps = tonumber(ARGV[5])
local fields = {}
for i = 6 + deps, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local state = 'queued'
if deps > 0 then
  state = 'pending'
elseif tonumber(ARGV[3]) > 0 then
  state = 'scheduled'
end
redis.call('HSET', KEYS[1], 'created_ms', now, 'state', state)
if state == 'pending' then
  redis.call('SADD', KEYS[1] .. ':deps', unpack(ARGV, 6, 5 + deps))
  redis.call('ZADD', KEYS[6], now, ARGV[1])
elseif state == 'queued' then
  redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) * 4398046511104 + now, ARGV[1])
else
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
end
redis.call('HINCRBY', KEYS[5], 'submitted', 1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[1], 'name', redis.call('HGET', KEYS[1], 'name'), 'state', state, 'at', now)
return now
