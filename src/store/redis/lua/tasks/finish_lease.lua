-- Finish, then (when that was accepted) lease the next task of the same
-- queue in the same call (see TaskBackend::finish_and_lease): a busy
-- worker's one round trip per task. `finish()` and `lease()` are finish.lua
-- and lease.lua composed as functions, each reading its own KEYS and ARGV
-- by name (the offsets come from their declarations: scripts.rs).
-- Returns { new state or false (fenced), the leased task's hash or false }.
local state = finish()
if not state then return { false, false } end
return { state, lease() }
