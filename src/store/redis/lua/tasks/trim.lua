-- Removes ended tasks that ended before a time: from history (with their
-- summaries), and their stored results and logs if still there (only while
-- the task is in an end state: a task that runs again keeps its hash).
-- Dead letters are removed only when they ended before their own cutoff
-- (ARGV 4: the dead-letter retention, or the time itself when the caller
-- asks for dead letters too); younger ones stay, in history and stored.
-- Also trims the event stream to its cap.
-- Returns {history entries removed, dead letters removed, events trimmed};
-- at most 1000 history entries per call.
-- KEYS: 1 history, 2 history data, 3 dead, 4 events
-- ARGV: 1 ended before (ms), 2 events cap, 3 task key prefix,
--       4 dead letters ended before (ms)
local final = { succeeded = true, failed = true, cancelled = true, timed_out = true }
local dead_before = tonumber(ARGV[4])
local function forget(id)
  local state = redis.call('HGET', ARGV[3] .. id, 'state')
  if state and final[state] then
    redis.call('DEL', ARGV[3] .. id, ARGV[3] .. id .. ':log')
  end
end
-- the old entries in rank order, skipping the dead letters kept (they
-- stay at the lowest ranks, so the next chunk starts after them)
local removed, kept = 0, 0
while removed < 1000 do
  local chunk = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', kept, 1000 - removed)
  if #chunk == 0 then break end
  local gone = {}
  for _, id in ipairs(chunk) do
    local ended = redis.call('ZSCORE', KEYS[3], id)
    if ended and tonumber(ended) >= dead_before then
      kept = kept + 1
    else
      gone[#gone + 1] = id
    end
  end
  if #gone > 0 then
    redis.call('ZREM', KEYS[1], unpack(gone))
    redis.call('HDEL', KEYS[2], unpack(gone))
    for _, id in ipairs(gone) do forget(id) end
    removed = removed + #gone
  end
end
-- dead letters past their cutoff, also those history no longer lists
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[4])
for i = 1, #dead, 1000 do
  local part = { unpack(dead, i, math.min(i + 999, #dead)) }
  redis.call('ZREM', KEYS[3], unpack(part))
  for _, id in ipairs(part) do forget(id) end
end
local trimmed = redis.call('XTRIM', KEYS[4], 'MAXLEN', '~', ARGV[2])
return { removed, #dead, trimmed }
