-- Registers a dependent on a dependency (in the dependency's slot): while
-- the dependency has not ended, the dependent's id is added to its
-- `:dependents` set, which whoever ends it releases. Returns 'waiting',
-- 'missing', or 'ended:' and the state it ended in.
-- KEYS: 1 the dependency's task hash
-- ARGV: 1 the dependent's id
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'succeeded' or state == 'failed' or state == 'cancelled' or state == 'timed_out' then
  return 'ended:' .. state
end
redis.call('SADD', KEYS[1] .. ':dependents', ARGV[1])
return 'waiting'
