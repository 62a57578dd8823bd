-- Trim (see TaskBackend::trim): removes ended tasks that ended before
-- `A_before_ms` from history (with their summaries), and their stored
-- results and logs if still there (only while the task is in an end state:
-- a task that runs again keeps its hash). Dead letters go only when they
-- ended before `A_dead_before_ms`; younger ones stay, in history and
-- stored. Also trims the event stream to its cap. Returns {history entries
-- removed, dead letters removed, events trimmed}; at most 1000 history
-- entries per call. KEYS and ARGV: declared in scripts.rs (TRIM).
local final = { succeeded = true, failed = true, cancelled = true, timed_out = true }
local dead_before = tonumber(A_dead_before_ms)
local function forget(id)
  local state = redis.call('HGET', A_prefix .. id, 'state')
  if state and final[state] then
    redis.call('DEL', A_prefix .. id, A_prefix .. id .. ':log')
  end
end
-- the old entries in rank order, skipping the dead letters kept (they
-- stay at the lowest ranks, so the next chunk starts after them)
local removed, kept = 0, 0
while removed < 1000 do
  local chunk = redis.call('ZRANGEBYSCORE', K_history, '-inf', '(' .. A_before_ms, 'LIMIT', kept, 1000 - removed)
  if #chunk == 0 then break end
  local gone = {}
  for _, id in ipairs(chunk) do
    local ended = redis.call('ZSCORE', K_dead, id)
    if ended and tonumber(ended) >= dead_before then
      kept = kept + 1
    else
      gone[#gone + 1] = id
    end
  end
  if #gone > 0 then
    redis.call('ZREM', K_history, unpack(gone))
    redis.call('HDEL', K_history_data, unpack(gone))
    for _, id in ipairs(gone) do forget(id) end
    removed = removed + #gone
  end
end
-- dead letters past their cutoff, also those history no longer lists
local dead = redis.call('ZRANGEBYSCORE', K_dead, '-inf', '(' .. A_dead_before_ms)
for i = 1, #dead, 1000 do
  local part = { unpack(dead, i, math.min(i + 999, #dead)) }
  redis.call('ZREM', K_dead, unpack(part))
  for _, id in ipairs(part) do forget(id) end
end
local trimmed = redis.call('XTRIM', K_events, 'MAXLEN', '~', A_events_cap)
return { removed, #dead, trimmed }
