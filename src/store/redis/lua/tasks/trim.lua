-- Removes ended tasks that ended before a time: from history (with their
-- summaries), from the dead letters, and their stored results and logs if
-- still there (only while the task is in an end state: a task that runs
-- again keeps its hash). Also trims the event stream to its cap.
-- Returns {history entries removed, dead letters removed, events trimmed};
-- at most 1000 history entries per call.
-- KEYS: 1 history, 2 history data, 3 dead, 4 events
-- ARGV: 1 ended before (ms), 2 events cap, 3 task key prefix
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, 1000)
local final = { succeeded = true, failed = true, cancelled = true, timed_out = true }
if #old > 0 then
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('HDEL', KEYS[2], unpack(old))
  for _, id in ipairs(old) do
    local state = redis.call('HGET', ARGV[3] .. id, 'state')
    if state and final[state] then
      redis.call('DEL', ARGV[3] .. id, ARGV[3] .. id .. ':log')
    end
  end
end
local dead = redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[1])
local trimmed = redis.call('XTRIM', KEYS[4], 'MAXLEN', '~', ARGV[2])
return { #old, dead, trimmed }
