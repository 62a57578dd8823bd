-- Ends an attempt and, when that was accepted, leases the next task of the
-- same queue in the same call: a busy worker's one round trip per task.
-- The bodies of finish.lua and lease.lua are prepended as the functions
-- `finish(KEYS, ARGV)` and `lease(KEYS, ARGV)` (see TaskScripts), so both
-- transitions keep one source.
-- KEYS: 1-8 as finish.lua, 9-12 as lease.lua
-- ARGV: 1-9 as finish.lua, 10.. as lease.lua
-- Returns { new state or false (fenced), the leased task's hash or false }.
local fk, fa, lk, la = {}, {}, {}, {}
for i = 1, 8 do fk[i] = KEYS[i] end
for i = 1, 9 do fa[i] = ARGV[i] end
for i = 9, #KEYS do lk[#lk + 1] = KEYS[i] end
for i = 10, #ARGV do la[#la + 1] = ARGV[i] end
local state = finish(fk, fa)
if not state then return { false, false } end
return { state, lease(lk, la) }
