-- Shared by the task scripts that end a task: prepended to them when they
-- are loaded (see TaskScripts), so the steps live in one place.

-- A dead letter trimmed by the cap (`key`, its hash) expires like a
-- result: `result_ttl_ms` after it ended (at once when that has passed).
local function expire_as_result(key)
  local state, finished, ttl = unpack(redis.call('HMGET', key, 'state', 'finished_ms', 'result_ttl_ms'))
  if (state ~= 'failed' and state ~= 'timed_out') or not finished or not ttl then return end
  local at = tonumber(finished) + tonumber(ttl)
  for _, suffix in ipairs({ '', ':log', ':deps', ':dependents' }) do
    redis.call('PEXPIREAT', key .. suffix, at)
  end
end

-- Records that task `id` (hash `key`) ended in state `outcome` at `now`:
-- its summary in history (capped, trimmed a hundred at a time), a dead
-- letter when it failed or timed out, and the expiry of its result and log:
-- the result TTL, or for a dead letter the longer of it and `dead_ttl` (ms),
-- so that failures found late can still be read and requeued. Dead letters
-- beyond the cap expire like results.
local function record_end(key, id, outcome, now, history, history_data, dead, cap, dead_ttl)
  cap = tonumber(cap)
  local name, category, attempts, ttl, schedule = unpack(redis.call('HMGET', key,
    'name', 'category', 'attempts', 'result_ttl_ms', 'schedule'))
  if outcome == 'failed' or outcome == 'timed_out' then
    redis.call('ZADD', dead, now, id)
    local over = redis.call('ZRANGE', dead, 0, -(cap + 1))
    if #over > 0 then
      redis.call('ZREMRANGEBYRANK', dead, 0, -(cap + 1))
      local prefix = string.sub(key, 1, #key - #id)
      for _, old in ipairs(over) do expire_as_result(prefix .. old) end
    end
    ttl = math.max(tonumber(ttl), tonumber(dead_ttl or '0'))
  end
  redis.call('ZADD', history, now, id)
  -- a task no schedule submitted has no 'schedule' field (false: left out)
  if not schedule then schedule = nil end
  redis.call('HSET', history_data, id, cjson.encode({ name = name, state = outcome,
    attempts = tonumber(attempts), finished_ms = now, category = category, schedule = schedule }))
  local excess = redis.call('ZCARD', history) - cap
  if excess >= 100 then
    local old = redis.call('ZRANGE', history, 0, excess - 1)
    redis.call('ZREMRANGEBYRANK', history, 0, excess - 1)
    -- in chunks: unpack has a limit of a few thousand values
    for i = 1, #old, 1000 do
      redis.call('HDEL', history_data, unpack(old, i, math.min(i + 999, #old)))
    end
  end
  redis.call('PEXPIRE', key, ttl)
  redis.call('PEXPIRE', key .. ':log', ttl)
  -- dependency bookkeeping goes with the task
  redis.call('PEXPIRE', key .. ':deps', ttl)
  redis.call('PEXPIRE', key .. ':dependents', ttl)
end

-- Whether the retry budget is spent: attempts since the last RetryTask
-- (`attempt_base`) beyond `max_retries`.
local function budget_spent(key)
  local attempts, max_retries, base = unpack(redis.call('HMGET', key,
    'attempts', 'max_retries', 'attempt_base'))
  return tonumber(attempts) - tonumber(base or '0') > tonumber(max_retries)
end
