-- Finishes N attempts of one queue, then leases the next task for each
-- accepted finish that asks for one (its item's `next`: the worker it goes
-- to), in one call (see TaskBackend::finish_batch): a busy pool's one round
-- trip for several tasks. `finish(i)` is finish.lua for item i (0-based)
-- and `lease()` lease.lua, each reading its own KEYS and ARGV by name (the
-- offsets come from the declarations: scripts.rs). A finish that raises an
-- error answers { '!', message } for its item and the others go on (finish
-- checks everything before its first write, so the failed one wrote
-- nothing).
-- Returns { each item's finish reply (false when fenced), the leased
-- tasks' hashes in the order of the workers asking, ended early by false
-- (nothing waits) or an integer (limits hold the queue: see lease.lua), or
-- on a Redis Cluster by a candidate that needs a reservation (lease.lua's
-- { 'need', ... }: the caller reserves for the workers left) }.
local ended, workers = {}, {}
for i = 0, N - 1 do
  local ok, state = pcall(finish, i)
  if ok then
    ended[i + 1] = state
    local to = ARGV[ITEM_ARG0 + i * ITEM_ARGS + ITEM_ARGS - 1]
    if state and to ~= '' then workers[#workers + 1] = to end
  else
    if type(state) == 'table' and state.err then state = state.err end
    ended[i + 1] = { '!', tostring(state) }
  end
end
local leased = {}
for j = 1, #workers do
  LEASE_WORKER = workers[j]
  local task = lease()
  LEASE_AGAIN = true
  leased[j] = task
  if type(task) ~= 'table' or task[1] == 'need' then break end
end
return { ended, leased }
