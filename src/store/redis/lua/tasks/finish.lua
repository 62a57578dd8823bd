-- Finish (see TaskBackend::finish). Returns { the new state (with '+'
-- appended when the task ended and other tasks wait on it, so that the
-- caller releases them only then; then, on a Cluster, the running-set
-- entry it left, '@set\nentry', for the caller to remove), then the attempt's times (times_of in
-- lib.lua: none, or name, sub-window, run, wait) }, or false when fenced. KEYS and ARGV:
-- declared in scripts.rs (FINISH).
-- one read for everything, record_end's fields included (each redis.call
-- costs about as much as the fields it reads)
local state, token, cancel, name, attempts, created, started, expire_ms, cc, category, ttl,
  schedule, dkey = unpack(redis.call('HMGET', K_task, 'state', 'token', 'cancel', 'name',
  'attempts', 'created_ms', 'started_ms', 'expire_ms', 'cc', 'category', 'result_ttl_ms',
  'schedule', 'debounce_key'))
if state ~= 'running' or token ~= A_token then return false end
local outcome = A_outcome
if outcome == 'retry' and budget_spent(K_task) then
  outcome = 'failed'
end
-- a cancel asked for while it ran: any end but success is the cancel's
local payload = A_payload
if cancel and outcome ~= 'succeeded' then
  outcome = 'cancelled'
  payload = cjson.encode({ message = 'cancelled: ' .. cancel, retryable = false })
end
-- a retry that would start at or past the task's expiry would wait for
-- nothing: it ends now
if outcome == 'retry' and expire_ms and now + tonumber(A_delay_ms) >= tonumber(expire_ms) then
  outcome = 'cancelled'
  payload = cjson.encode({ message = 'cancelled: expired', retryable = false })
end
-- everything that can fail comes before the first write: Redis does not
-- roll a script back
local extra = '"ended_ms":' .. NOW
if outcome == 'retry' then
  extra = extra .. ',"retry_at_ms":' .. string.format('%d', now + tonumber(A_delay_ms))
end
local logged = json_with(A_log, extra)
redis.call('ZREM', K_leases, A_id)
local left = leave_running(K_task, cc) or ''
redis.call('RPUSH', K_task .. ':log', logged)
local times = times_of(name, attempts, created, started, true) or {}
if outcome == 'retry' then
  redis.call('HINCRBY', K_stats, 'retried', '1')
  redis.call('HSET', K_task, 'state', 'scheduled', 'error', payload, 'worker', '', 'lease_until', '0')
  redis.call('ZADD', K_scheduled, now + tonumber(A_delay_ms), A_id)
  -- waiting out its backoff, it may expire again
  if expire_ms then redis.call('ZADD', K_expiring, expire_ms, A_id) end
  add_event(K_events, A_events_cap, A_id, name, 'scheduled', 'at', NOW)
  return { 'scheduled' .. left, unpack(times) }
end
redis.call('HINCRBY', K_stats, outcome, '1')
local field = 'result'
if outcome ~= 'succeeded' then field = 'error' end
redis.call('HSET', K_task, 'state', outcome, field, payload, 'finished_ms', NOW, 'worker', '',
  'lease_until', '0')
-- a success supersedes the errors of earlier attempts (they stay in the
-- log); a first attempt has none (every end that writes an error either
-- counted an attempt or ended the task, and RetryTask deletes it)
if outcome == 'succeeded' and tonumber(attempts) > 1 then redis.call('HDEL', K_task, 'error') end
local waited_on = redis.call('EXISTS', K_task .. ':dependents') == 1
record_end(K_task, A_id, outcome, K_history, K_history_data, K_dead, A_history_cap, A_dead_ttl_ms,
  false, { name, category, attempts, ttl, schedule, started, dkey, waited_on })
add_event(K_events, A_events_cap, A_id, name, outcome, 'at', NOW)
if waited_on then outcome = outcome .. '+' end
return { outcome .. left, unpack(times) }
