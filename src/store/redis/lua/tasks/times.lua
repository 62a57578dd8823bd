-- Times (see TaskBackend::task_times): the run and wait times of the
-- window. Returns a list: first { now }, then each sub-window's hash as a
-- flat field, value list, oldest first. KEYS and ARGV: declared in
-- scripts.rs (TIMES).
local n = math.floor(now / TIMES_SLOT_MS)
local out = { { tostring(now) } }
for s = n - TIMES_SLOTS + 1, n do
  out[#out + 1] = redis.call('HGETALL', K_times .. s)
end
return out
