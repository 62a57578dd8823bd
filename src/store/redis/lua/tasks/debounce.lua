-- Debounced submit (see TaskBackend::submit_debounced). KEYS and ARGV:
-- declared in scripts.rs (DEBOUNCE); after the declared ARGV, field, value
-- pairs of the new task's hash (with its `debounce_key`).
-- Returns { 'created', id }, { 'replaced', id } or
-- { 'conflict', id, name, category }.
local function fields_from(first)
  local out = {}
  for i = first, #ARGV, 2 do
    local f = ARGV[i]
    -- the held task keeps its id and submit time; its state is set below
    if f ~= 'id' and f ~= 'created_ms' and f ~= 'state' then
      out[#out + 1] = f
      out[#out + 1] = ARGV[i + 1]
    end
  end
  return out
end
local due = now + tonumber(A_window_ms)
local held = redis.call('HGET', K_debounce, A_key)
if held then
  local key = A_prefix .. held
  local state, name, category = unpack(redis.call('HMGET', key, 'state', 'name', 'category'))
  if state == 'scheduled' or state == 'queued' then
    if name ~= A_name or category ~= A_category then
      return { 'conflict', held, name, category }
    end
    -- the last submit wins: its optional fields replace the held task's too
    redis.call('HDEL', key, 'cache_result', 'schedule', 'schedule_tick_ms', 'trace_parent',
      'trace_state', 'rate_limit_key', 'concurrency_key')
    redis.call('HSET', key, unpack(fields_from(ARGN)))
    redis.call('HSET', key, 'state', 'scheduled')
    redis.call('ZREM', K_ready, held)
    redis.call('ZADD', K_scheduled, due, held)
    add_event(K_events, A_events_cap, held, name, 'scheduled', 'at', now)
    return { 'replaced', held }
  end
  -- a stale entry (its task started or ended without letting go): replaced below
end
if redis.call('EXISTS', K_task) == 1 then
  return redis.error_reply('EXISTS task ' .. A_id .. ' already exists')
end
local fields = {}
for i = ARGN, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', K_task, unpack(fields))
redis.call('HSET', K_task, 'created_ms', now, 'state', 'scheduled')
redis.call('ZADD', K_scheduled, due, A_id)
redis.call('HSET', K_debounce, A_key, A_id)
redis.call('HINCRBY', K_stats, 'submitted', 1)
add_event(K_events, A_events_cap, A_id, A_name, 'scheduled', 'at', now)
return { 'created', A_id }
