-- Submit and submit-pending (see TaskBackend::submit, ::submit_pending).
-- KEYS and ARGV: declared in scripts.rs (SUBMIT); after the declared ARGV,
-- the `A_deps` ids waited on, then field, value pairs of the task hash.
if redis.call('EXISTS', K_task) == 1 then
  return redis.error_reply('EXISTS task ' .. A_id .. ' already exists')
end
local deps = tonumber(A_deps)
local state = 'queued'
if deps > 0 then
  state = 'pending'
elseif tonumber(A_delay_ms) > 0 then
  state = 'scheduled'
end
-- the hash: its fields as given (no Lua table of them), then when and in
-- what state it starts
redis.call('HSET', K_task, unpack(ARGV, ARGN + deps))
redis.call('HSET', K_task, 'created_ms', NOW, 'state', state)
if state == 'pending' then
  redis.call('SADD', K_task .. ':deps', unpack(ARGV, ARGN, ARGN + deps - 1))
  redis.call('ZADD', K_pending, NOW, A_id)
elseif state == 'queued' then
  local fkey = false
  if A_fkey ~= '' then fkey = A_fkey end
  redis.call('ZADD', K_ready, enter_score(K_ready, K_task, A_band, now, fkey), A_id)
  -- not when the caller leases it for an idle worker of its own at once
  if A_wake == '1' then wake_idle(K_idle, K_wake, A_name) end
else
  redis.call('ZADD', K_scheduled, now + tonumber(A_delay_ms), A_id)
end
if tonumber(A_expire_ms) > 0 then redis.call('ZADD', K_expiring, A_expire_ms, A_id) end
redis.call('HINCRBY', K_stats, 'submitted', '1')
add_event(K_events, A_events_cap, A_id, A_name, state, 'at', NOW)
return now
