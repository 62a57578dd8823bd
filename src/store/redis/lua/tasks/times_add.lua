-- Times add (see RedisTasks::flush_times): applies one koo process's run
-- and wait times of one queue, added up since its last flush. ARGV's tail
-- is groups of: sub-window N, task name, field count K, then K pairs of a
-- bucket field prefix ('r:B:' or 'w:B:') and its count. A sub-window keeps
-- TIMES_NAMES names (each marked `n:NAME`; `names` counts those offered)
-- and counts the rest as 'other'; it expires once the window has moved
-- past it (in real time: `now` may be shifted under test). KEYS and ARGV:
-- declared in scripts.rs (TIMES_ADD).
local i = ARGN
while i <= #ARGV do
  local n, name, k = tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2])
  local slot = K_times .. n
  if name ~= 'other' and redis.call('HEXISTS', slot, 'n:' .. name) == 0 then
    -- a name new to the sub-window; beyond the cap it stays unmarked, so
    -- that it is asked about again
    if redis.call('HINCRBY', slot, 'names', 1) > TIMES_NAMES then
      name = 'other'
    else
      redis.call('HSET', slot, 'n:' .. name, 1)
    end
  end
  for j = i + 3, i + 1 + 2 * k, 2 do
    redis.call('HINCRBY', slot, ARGV[j] .. name, ARGV[j + 1])
  end
  redis.call('PEXPIREAT', slot, (n + TIMES_SLOTS + 1) * TIMES_SLOT_MS - CLOCK_OFFSET)
  i = i + 3 + 2 * k
end
return 1
