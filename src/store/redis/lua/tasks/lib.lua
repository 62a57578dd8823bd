-- Shared by the task scripts: appended to the generated prelude (`BAND`,
-- `now`: see src/store/redis/script.rs) when they are loaded, so that each
-- step lives in one place.

-- A ready score: higher priority bands first, FIFO within one (`band`: the
-- task hash's field, 2 when it has none).
local function ready_score(band, at)
  return tonumber(band or '2') * BAND + at
end

-- The fair-order hash of the queue whose ready set is `ready` (beside it,
-- in the queue's slot), per priority band (a high-priority task's turn
-- must not move the normal band's clock): 'clock:<band>', 'k:<band>:<key>'
-- -> the key's last turn, and the trimming sweep's 'cursor' (recover.lua).
local function fair_hash(ready)
  return string.sub(ready, 1, #ready - 5) .. 'fair'
end

-- The ready score of task hash `key` entering `ready` in band `band` at
-- `at` (see TaskBackend's "Fair order"): a task with a fair key `fkey`
-- (its concurrency key, else its rate-limit key; false when none) draws
-- its key's next turn, max(last + 1, the queue's clock + 1), kept in its
-- hash as 'vt'; others keep `at`. The clock starts at now with the first
-- keyed task. A key new or behind starts one turn after the clock, level
-- with the next turn of the keys already waiting, so that keys of one task
-- each move the clock on and fall behind it, where the sweep drops them
-- (starting at the clock itself, they all took its turn, which then never
-- moved past them: the fair hash kept every key ever seen).
local function enter_score(ready, key, band, at, fkey)
  if not fkey then return ready_score(band, at) end
  local fair = fair_hash(ready)
  local b = band or '2'
  local lane = 'k:' .. b .. ':' .. fkey
  local clock, last = unpack(redis.call('HMGET', fair, 'clock:' .. b, lane))
  if not clock then
    clock = now
    redis.call('HSET', fair, 'clock:' .. b, NOW)
  end
  local vt = tonumber(clock) + 1
  if last and tonumber(last) + 1 > vt then vt = tonumber(last) + 1 end
  redis.call('HSET', fair, lane, string.format('%d', vt))
  redis.call('HSET', key, 'vt', string.format('%d', vt))
  return ready_score(band, vt)
end

-- The fair key of a task whose concurrency and rate-limit keys were read
-- (false when it has neither).
local function fair_key(ckey, rkey)
  return ckey or rkey or false
end

-- Task hash `key` ends its attempt: it leaves its concurrency key's
-- running set (the set's name is kept in its hash as 'cc' while it runs).
-- On a Redis Cluster the set lives in flow control's own slot, out of this
-- script's reach: 'cc' then holds '@', the set's name, a newline and the
-- task's entry in it, which is returned for the caller to remove (the
-- cap's repair removes what a caller could not).
local function leave_running(key, cc)
  if not cc then return nil end
  redis.call('HDEL', key, 'cc')
  if string.byte(cc, 1) == 64 then return cc end
  redis.call('ZREM', cc, key)
  return nil
end

-- Flow control's rate limits under key base `fb` (see TaskBackend's "Flow
-- control"), read only for what is asked: `rate` and `backed_off` check a
-- scope, `hold` marks one held for the rest of the call, `held` says how
-- long from now until the first held one frees (nil when none held, 0
-- when only caps), `apply` writes an admitted candidate's buckets.
-- lease.lua adds the caps; reserve.lua (a Cluster) runs the same checks
-- in flow control's own slot.
local function make_rates(fb)
  local specs = {}
  local function spec(field)
    local s = specs[field]
    if s == nil then
      s = redis.call('HGET', fb .. 'limits', field) or false
      specs[field] = s
    end
    return s
  end
  local now_us = now * 1000
  -- GCRA on `bucket` (its TAT in µs) under limit `s` ('limit period_ms burst
  -- ...'): true, the TAT after taking a token and the token's interval, or
  -- false and when the next token frees (ms).
  local function gcra(s, bucket)
    local limit, period, burst = string.match(s, '^(%d+) (%d+) (%d+)')
    local interval = math.max(math.floor(tonumber(period) * 1000 / tonumber(limit)), 1)
    local tolerance = interval * (tonumber(burst) - 1)
    local tat = tonumber(redis.call('GET', bucket) or '0')
    if tat < now_us then tat = now_us end
    if tat - tolerance > now_us then return false, math.ceil((tat - tolerance) / 1000) end
    return true, tat + interval, interval
  end
  -- Scopes found held stay held for the rest of the call (each with when
  -- it frees, 0 for a cap); `held_until`: the earliest (false while only
  -- caps hold).
  local held, held_until, held_any = {}, false, false
  local function hold(scope, until_ms)
    held[scope] = until_ms or 0
    held_any = true
    if until_ms and (not held_until or until_ms < held_until) then held_until = until_ms end
  end
  -- Whether rate scope `scope` (or, with no limit of its own, `fallback`'s
  -- limit in its own bucket) has a token: its bucket, new TAT and interval
  -- are pushed on `writes`, applied only if the candidate is admitted.
  local function rate(scope, fallback, writes)
    if held[scope] then return false end
    local s = spec('r:' .. scope)
    if not s and fallback then s = spec('r:' .. fallback) end
    if not s then return true end
    local bucket = fb .. 'rl:' .. scope
    local ok, v, interval = gcra(s, bucket)
    if not ok then
      hold(scope, v)
      return false
    end
    writes[#writes + 1] = bucket
    writes[#writes + 1] = v
    writes[#writes + 1] = interval
    return true
  end
  -- Whether a back-off (a worker's 429 for the key) holds rate-limit key `rkey`.
  local function backed_off(rkey)
    if held['b:' .. rkey] then return true end
    local until_ms = tonumber(redis.call('GET', fb .. 'backoff:' .. rkey) or '0')
    if until_ms > now then
      hold('b:' .. rkey, until_ms)
      return true
    end
    return false
  end
  return {
    spec = spec,
    hold = hold,
    rate = rate,
    backed_off = backed_off,
    is_held = function(scope) return held[scope] ~= nil end,
    -- the scopes held, each with the wait from now until it frees (ms, at
    -- least 1; 0 for a cap)
    held_scopes = function()
      local out = {}
      for scope, until_ms in pairs(held) do
        out[#out + 1] = scope
        out[#out + 1] = until_ms > 0 and math.max(until_ms - now, 1) or 0
      end
      return out
    end,
    -- what a lease that leased nothing returns: the wait from now (at
    -- least 1 ms: the caller's clock may differ from this one; 0 when only
    -- caps hold), or nil when nothing held
    held = function()
      if not held_any then return nil end
      if not held_until then return 0 end
      return math.max(held_until - now, 1)
    end,
    -- the writes of an admitted candidate's buckets
    apply = function(writes)
      for w = 1, #writes, 3 do
        local tat = writes[w + 1]
        redis.call('SET', writes[w], string.format('%d', tat), 'PX', math.ceil((tat - now_us) / 1000) + 1)
      end
    end,
  }
end

-- Wakes one koo process whose workers wait idle on this queue for a task
-- named `name` (see store/redis/tasks/wake.rs: before blocking on its own
-- wake list `wake:ID`, a process sets the flag `idle:NAME` of each name
-- its idle workers serve, `idle:*` for any name, and `idle` itself, to its
-- ID): one that serves the name if any waits, else one that serves any
-- name; for tasks of no one name (`name` nil: a sweep's), any idle
-- process. A flag found is deleted and the name pushed to the list it
-- names ('' for the queue's flag, '*' and a newline before the name for
-- `idle:*`; the list expires if nobody takes it); none waits: a GET or two.
local function wake_one(flag, wake, name)
  local to = redis.call('GET', flag)
  if not to then return false end
  redis.call('DEL', flag)
  local list = wake .. ':' .. to
  redis.call('RPUSH', list, name)
  redis.call('PEXPIRE', list, 10000)
  return true
end
local function wake_idle(idle, wake, name)
  if not name then
    wake_one(idle, wake, '')
  elseif not wake_one(idle .. ':' .. name, wake, name) then
    -- (the flag found, and the name: the process tells only its workers
    -- that serve it)
    wake_one(idle .. ':*', wake, '*\n' .. name)
  end
end

-- Appends an event about task `id` to stream `events` (capped, roughly, at
-- `cap`); `...` are more field, value pairs.
local function add_event(events, cap, id, name, state, ...)
  redis.call('XADD', events, 'MAXLEN', '~', cap, '*', 'id', id, 'name', name or '', 'state', state, ...)
end

-- Moves up to 100 due SCHEDULED tasks of a queue (`scheduled`, by due
-- time) to `ready`, keeping their priority band; each becomes QUEUED with
-- an event. An entry whose task is gone or has moved on is only dropped
-- (never create a hash for a gone one). Returns how many entries were due.
local function promote_due(scheduled, ready, events, prefix, events_cap)
  local due = redis.call('ZRANGEBYSCORE', scheduled, '-inf', NOW, 'LIMIT', '0', '100')
  for _, id in ipairs(due) do
    redis.call('ZREM', scheduled, id)
    local key = prefix .. id
    local state, band, name, ckey, rkey = unpack(redis.call('HMGET', key, 'state', 'band', 'name',
      'concurrency_key', 'rate_limit_key'))
    if state == 'scheduled' then
      redis.call('ZADD', ready, enter_score(ready, key, band, now, fair_key(ckey, rkey)), id)
      redis.call('HSET', key, 'state', 'queued')
      add_event(events, events_cap, id, name, 'queued', 'at', NOW)
    end
  end
  return #due
end

-- Task `id` (hash `key`) starts or ends: the debounce key `dkey` it holds
-- (its hash's `debounce_key`; nothing to do without one) lets go of it, so
-- that the next submit with the key creates a new task and the queue's
-- debounce hash holds only unstarted tasks. The hash is the queue's
-- `debounce`, beside `task:<id>` (keys.rs, DEBOUNCE_FROM_TASK), in the
-- queue's slot.
local function forget_debounce(key, id, dkey)
  if not dkey then return end
  local hash = string.sub(key, 1, #key - #id - 5) .. 'debounce'
  if redis.call('HGET', hash, dkey) == id then redis.call('HDEL', hash, dkey) end
end

-- A dead letter trimmed by the cap (`key`, its hash) expires like a
-- result: `result_ttl_ms` after it ended (at once when that has passed).
local function expire_as_result(key)
  local state, finished, ttl = unpack(redis.call('HMGET', key, 'state', 'finished_ms', 'result_ttl_ms'))
  if (state ~= 'failed' and state ~= 'timed_out') or not finished or not ttl then return end
  local at = tonumber(finished) + tonumber(ttl)
  for _, suffix in ipairs({ '', ':log', ':deps', ':dependents' }) do
    redis.call('PEXPIREAT', key .. suffix, at)
  end
end

-- Trims sorted set `set` to its newest `cap` members (only when it is
-- over: one ZCARD otherwise), dropping their entries of hash `data` too
-- when given. Returns the ids removed.
local function trim_to_cap(set, cap, data)
  local excess = redis.call('ZCARD', set) - cap
  if excess <= 0 then return {} end
  local old = redis.call('ZRANGE', set, 0, excess - 1)
  redis.call('ZREMRANGEBYRANK', set, 0, excess - 1)
  if data then
    -- in chunks: unpack has a limit of a few thousand values
    for i = 1, #old, 1000 do
      redis.call('HDEL', data, unpack(old, i, math.min(i + 999, #old)))
    end
  end
  return old
end

-- Records that task `id` (hash `key`) ended in state `outcome` at `now`
-- (see TaskBackend's "Ending" in src/store/tasks/backend.rs): its summary
-- in history (trimmed at the cap), a dead letter when it failed or timed
-- out, and the expiry of its result and log: the result TTL, or for a
-- dead letter the longer of it and `dead_ttl` (ms). Dead letters beyond
-- the cap expire like results.
-- `unrun`: the task ends without running since it was last queued (a
-- cancel or a failed dependency): its history names no start, whatever an
-- earlier attempt's `started_ms` says.
-- `ran`: given by an attempt's end (finish.lua), which has read the
-- hash's fields already: { name, category, attempts, result_ttl_ms,
-- schedule, started_ms, debounce_key, dependents } (`dependents`: whether
-- its `:dependents` set exists), so that the commonest end makes no read
-- of its own and no PEXPIRE of keys that do not exist. A task that ran has
-- no `:deps` of its own: the set emptied (and Redis deleted it) before it
-- was queued, and a leftover of an earlier end keeps that end's expiry
-- (RetryTask persists only the hash and its log).
local function record_end(key, id, outcome, history, history_data, dead, cap, dead_ttl, unrun, ran)
  cap = tonumber(cap)
  local name, category, attempts, ttl, schedule, started, dkey
  if ran then
    name, category, attempts, ttl, schedule, started, dkey = unpack(ran, 1, 7)
  else
    name, category, attempts, ttl, schedule, started, dkey = unpack(redis.call('HMGET', key,
      'name', 'category', 'attempts', 'result_ttl_ms', 'schedule', 'started_ms', 'debounce_key'))
  end
  forget_debounce(key, id, dkey)
  if outcome == 'failed' or outcome == 'timed_out' then
    redis.call('ZADD', dead, NOW, id)
    local prefix = string.sub(key, 1, #key - #id)
    for _, old in ipairs(trim_to_cap(dead, cap)) do expire_as_result(prefix .. old) end
    ttl = math.max(tonumber(ttl), tonumber(dead_ttl or '0'))
  end
  redis.call('ZADD', history, NOW, id)
  -- the summary, written by hand (cjson formats each number with printf,
  -- and the numbers here are stored integers already): a field the hash
  -- lacks is left out, as are a schedule when no schedule submitted it and
  -- a start when it never started (its last attempt's start)
  local summary = '{"state":"' .. outcome .. '","finished_ms":' .. NOW
  if name then summary = summary .. ',"name":' .. cjson.encode(name) end
  if category then summary = summary .. ',"category":' .. cjson.encode(category) end
  if attempts and string.match(attempts, '^%d+$') then
    summary = summary .. ',"attempts":' .. attempts
  end
  if schedule then summary = summary .. ',"schedule":' .. cjson.encode(schedule) end
  if started and not unrun and string.match(started, '^%d+$') then
    summary = summary .. ',"started_ms":' .. started
  end
  redis.call('HSET', history_data, id, summary .. '}')
  trim_to_cap(history, cap, history_data)
  redis.call('PEXPIRE', key, ttl)
  redis.call('PEXPIRE', key .. ':log', ttl)
  -- dependency bookkeeping goes with the task
  if not ran then redis.call('PEXPIRE', key .. ':deps', ttl) end
  if not ran or ran[8] then redis.call('PEXPIRE', key .. ':dependents', ttl) end
end

-- JSON object `json` (koo's own, compact) with the members in `extra`
-- (`"name":value,...`) added at its end: an attempt's log entry gets its
-- end without being decoded and encoded again (each number cjson writes
-- costs a printf).
local function json_with(json, extra)
  if string.byte(json, -1) ~= 125 then error('the log entry is not a JSON object') end
  local body = string.sub(json, 1, -2)
  if body == '{' then return body .. extra .. '}' end
  return body .. ',' .. extra .. '}'
end

-- Whether a task's expiry (its `expire_ms` field, as read: false when it
-- has none) has passed: then, still waiting, it must never start.
local function expired(expire_ms)
  return expire_ms and tonumber(expire_ms) <= now
end

-- Ends waiting task `id` (hash `key`, named `name`) CANCELLED without
-- running, with error `message` in the cancel's form: its expiry passed
-- ("cancelled: expired"; see TaskBackend's "Expiry" in
-- src/store/tasks/backend.rs), or its key's cap cancels it. The caller has
-- taken it out of its waiting set and the expiring set. Its dependents
-- are released by the caller, or by the sweep's repair.
local function end_unrun(key, id, name, message, history, history_data, dead, stats, events,
    history_cap, events_cap)
  redis.call('HSET', key, 'state', 'cancelled', 'finished_ms', NOW,
    'error', cjson.encode({ message = message, retryable = false }))
  redis.call('HINCRBY', stats, 'cancelled', '1')
  record_end(key, id, 'cancelled', history, history_data, dead, history_cap, nil, true)
  add_event(events, events_cap, id, name, 'cancelled', 'at', NOW)
end

local function end_expired(key, id, name, history, history_data, dead, stats, events, history_cap, events_cap)
  end_unrun(key, id, name, 'cancelled: expired', history, history_data, dead, stats, events,
    history_cap, events_cap)
end

-- Whether the retry budget is spent: attempts since the last RetryTask
-- (`attempt_base`) beyond `max_retries`.
local function budget_spent(key)
  local attempts, max_retries, base = unpack(redis.call('HMGET', key,
    'attempts', 'max_retries', 'attempt_base'))
  return tonumber(attempts) - tonumber(base or '0') > tonumber(max_retries)
end

-- The times of the attempt that ends now of a task (its `name`,
-- `attempts`, `created` and `started` ms, as stored: the caller has read
-- them already), for the caller's reply: nothing is written here (this is
-- on every task's path; the koo process that ends the attempt adds them up
-- and applies them with times_add.lua about once a second). Its run when
-- `ran` (it finished; a lost attempt has no observed end), and the task's
-- wait from submit to start when it is its first attempt, in ms; -1 for
-- either when there is none. Returns { name, sub-window, run, wait }, or
-- nothing when there is neither.
local function times_of(name, attempts, created, started, ran)
  local first = attempts == '1'
  if not started or not (ran or first) then return nil end
  started = tonumber(started)
  local run, wait = -1, -1
  if ran then run = math.max(now - started, 0) end
  if first and created then wait = math.max(started - tonumber(created), 0) end
  if run < 0 and wait < 0 then return nil end
  return { name or '', string.format('%d', math.floor(now / TIMES_SLOT_MS)),
    string.format('%d', run), string.format('%d', wait) }
end
