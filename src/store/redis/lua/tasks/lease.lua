-- Leases the first ready task this worker serves: moves due SCHEDULED tasks
-- to `ready` first, then takes the best-scored task whose name the worker
-- serves, counts the attempt, and records the lease with its fencing token
-- (one more than the last lease's). Returns the task hash as a flat list, or nil.
-- KEYS: 1 ready, 2 scheduled, 3 leases, 4 events
-- ARGV: 1 task key prefix, 2 lease ms, 3 worker, 4 events cap,
--       5 how many ready tasks to look at, 6.. task names served ('*' = all)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
-- due scheduled tasks become ready, keeping their priority band
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[2], id)
  -- only a task still waiting moves (never create a hash for a gone one)
  if redis.call('HGET', prefix .. id, 'state') == 'scheduled' then
    local band = tonumber(redis.call('HGET', prefix .. id, 'band') or '2')
    redis.call('ZADD', KEYS[1], band * 4398046511104 + now, id)
    redis.call('HSET', prefix .. id, 'state', 'queued')
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'id', id, 'name', redis.call('HGET', prefix .. id, 'name') or '', 'state', 'queued', 'at', now)
  end
end
local serves_all, served = false, {}
for i = 6, #ARGV do
  if ARGV[i] == '*' then serves_all = true end
  served[ARGV[i]] = true
end
-- Candidates are read a few at a time (1, then 16, then the rest of the
-- scan limit): the head of the queue is almost always the answer, and
-- reading a hundred ids per lease would cost more than the lease itself.
local limit, from, chunk = tonumber(ARGV[5]), 0, 1
local candidates = {}
local function more()
  if from >= limit then return false end
  local upto = math.min(from + chunk, limit) - 1
  local got = redis.call('ZRANGE', KEYS[1], from, upto)
  from = upto + 1
  chunk = 16
  if #got == 0 then return false end
  for _, id in ipairs(got) do candidates[#candidates + 1] = id end
  return true
end
local i = 0
while true do
  i = i + 1
  if i > #candidates and not more() then break end
  local id = candidates[i]
  local key = prefix .. id
  local name, state = unpack(redis.call('HMGET', key, 'name', 'state'))
  if not name or state ~= 'queued' then
    -- a ready entry whose task is gone or has moved on: drop it (the
    -- ranks after it shift down by one)
    redis.call('ZREM', KEYS[1], id)
    from = from - 1
  elseif serves_all or served[name] then
    redis.call('ZREM', KEYS[1], id)
    local attempt = redis.call('HINCRBY', key, 'attempts', 1)
    -- the fencing token grows with every lease (attempts can be given back)
    local token = redis.call('HINCRBY', key, 'token', 1)
    local deadline = now + tonumber(ARGV[2])
    local hard = tonumber(redis.call('HGET', key, 'hard_ms') or '0')
    local hard_deadline = 0
    if hard > 0 then hard_deadline = now + hard end
    redis.call('HSET', key, 'state', 'running', 'worker', ARGV[3],
      'started_ms', now, 'lease_until', deadline, 'hard_until', hard_deadline)
    -- progress belongs to an attempt
    redis.call('HDEL', key, 'progress')
    local score = deadline
    if hard_deadline > 0 and hard_deadline < score then score = hard_deadline end
    redis.call('ZADD', KEYS[3], score, id)
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'id', id, 'name', name, 'state', 'running',
      'attempt', attempt, 'worker', ARGV[3], 'at', now)
    return redis.call('HGETALL', key)
  end
end
return false
