-- Depend (see TaskBackend::depend_on), in the dependency's slot. Returns
-- 'waiting', 'missing', or 'ended:' and the state it ended in. KEYS and
-- ARGV: declared in scripts.rs (DEPEND).
local state = redis.call('HGET', K_task, 'state')
if not state then return 'missing' end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' or state == 'timed_out' then
  return 'ended:' .. state
end
redis.call('SADD', K_task .. ':dependents', A_dependent)
return 'waiting'
