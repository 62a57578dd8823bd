-- Release (see TaskBackend::release). Returns 1 (on a Cluster, the
-- running-set entry it left, '@set\nentry', for the caller to remove), or
-- 0 when fenced. KEYS
-- and ARGV: declared in scripts.rs (RELEASE).
local state, token, band, created, expire_ms, cc, vt = unpack(redis.call('HMGET', K_task,
  'state', 'token', 'band', 'created_ms', 'expire_ms', 'cc', 'vt'))
if state ~= 'running' or token ~= A_token then return 0 end
-- everything that can fail comes before the first write
local entry = cjson.decode(A_log)
entry['ended_ms'] = now
redis.call('ZREM', K_leases, A_id)
local left = leave_running(K_task, cc)
redis.call('RPUSH', K_task .. ':log', cjson.encode(entry))
redis.call('HINCRBY', K_task, 'attempts', -1)
redis.call('HSET', K_task, 'state', 'queued', 'worker', '', 'lease_until', 0)
redis.call('HDEL', K_task, 'progress')
-- back at its place: a keyed task at the turn it had (see "Fair order")
redis.call('ZADD', K_ready, ready_score(band, tonumber(vt or created or now)), A_id)
local name = redis.call('HGET', K_task, 'name')
wake_idle(K_idle, K_wake, name)
-- waiting again: it may expire again (the lease ends it if it has already)
if expire_ms then redis.call('ZADD', K_expiring, expire_ms, A_id) end
add_event(K_events, A_events_cap, A_id, name, 'queued', 'at', now)
return left or 1
