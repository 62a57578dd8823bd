-- Lease (see TaskBackend::lease). Returns the task hash as a flat list, or
-- false. KEYS and ARGV: declared in scripts.rs (LEASE); after the declared
-- ARGV, the task names served ('*' = all).
local prefix = A_prefix
promote_due(K_scheduled, K_ready, K_events, prefix, A_events_cap)
-- a paused queue hands out nothing (due tasks still become QUEUED)
if redis.call('EXISTS', K_paused) == 1 then return false end
local serves_all, served = false, {}
for i = ARGN, #ARGV do
  if ARGV[i] == '*' then serves_all = true end
  served[ARGV[i]] = true
end
-- Candidates are read a few at a time (1, then 16, then the rest of the
-- scan limit): the head of the queue is almost always the answer, and
-- reading a hundred ids per lease would cost more than the lease itself.
local limit, from, chunk = tonumber(A_scan), 0, 1
local candidates = {}
local function more()
  if from >= limit then return false end
  local upto = math.min(from + chunk, limit) - 1
  local got = redis.call('ZRANGE', K_ready, from, upto)
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
  local name, state, dkey = unpack(redis.call('HMGET', key, 'name', 'state', 'debounce_key'))
  if not name or state ~= 'queued' then
    -- a ready entry whose task is gone or has moved on: drop it (the
    -- ranks after it shift down by one)
    redis.call('ZREM', K_ready, id)
    from = from - 1
  elseif serves_all or served[name] then
    redis.call('ZREM', K_ready, id)
    -- started: a later submit with its debounce key makes a new task
    forget_debounce(key, id, dkey)
    local attempt = redis.call('HINCRBY', key, 'attempts', 1)
    -- the fencing token grows with every lease (attempts can be given back)
    redis.call('HINCRBY', key, 'token', 1)
    local deadline = now + tonumber(A_lease_ms)
    local hard = tonumber(redis.call('HGET', key, 'hard_ms') or '0')
    local hard_deadline = 0
    if hard > 0 then hard_deadline = now + hard end
    redis.call('HSET', key, 'state', 'running', 'worker', A_worker,
      'started_ms', now, 'lease_until', deadline, 'hard_until', hard_deadline)
    -- progress belongs to an attempt
    redis.call('HDEL', key, 'progress')
    local score = deadline
    if hard_deadline > 0 and hard_deadline < score then score = hard_deadline end
    redis.call('ZADD', K_leases, score, id)
    add_event(K_events, A_events_cap, id, name, 'running', 'attempt', attempt, 'worker', A_worker, 'at', now)
    return redis.call('HGETALL', key)
  end
end
return false
