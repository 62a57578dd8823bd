-- Give back (a Redis Cluster's flow control: see src/store/redis/tasks/
-- flow_cluster.rs): what reserve.lua took for a candidate that was not
-- leased after all. Each bucket's TAT moves back by its token's interval
-- (a bucket back at or before now is full: deleted), and the candidate's
-- running-set entry goes. KEYS and ARGV: declared in scripts.rs
-- (GIVE_BACK); after the declared ARGV, bucket, interval_us pairs.
local now_us = now * 1000
for i = ARGN, #ARGV - 1, 2 do
  local bucket = ARGV[i]
  local tat = tonumber(redis.call('GET', bucket) or '0') - tonumber(ARGV[i + 1])
  if tat <= now_us then
    redis.call('DEL', bucket)
  else
    redis.call('SET', bucket, string.format('%d', tat), 'PX', math.ceil((tat - now_us) / 1000) + 1)
  end
end
if A_cc ~= '' then redis.call('ZREM', A_cc, A_entry) end
return 1
