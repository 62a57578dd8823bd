//! The Redis side of the schedule store (see `crate::schedule::store`).

use redis::Script;

use super::RedisStore;
use crate::schedule::store::{Put, ScheduleKeys};
use crate::store::{Deadline, Result};

/// Writes a definition under a condition and bumps the version, atomically.
/// ARGV: 1 name, 2 JSON, 3 'new' | 'existing' | 'any'. Returns 1, or 0 when
/// the condition failed.
const PUT: &str = r"
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if (ARGV[3] == 'new' and exists) or (ARGV[3] == 'existing' and not exists) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return 1
";

/// Removes a definition and its run, bumping the version. Returns 1, or 0
/// when there was none.
const DELETE: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[2])
return 1
";

/// Records a run unless the schedule is gone or a later run is recorded.
/// ARGV: 1 name, 2 run JSON, 3 its fired_ms.
const RECORD_RUN: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  local ok, prev = pcall(cjson.decode, old)
  if ok and type(prev) == 'table' and tonumber(prev['fired_ms'] or 0) > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
";

/// Name → JSON pairs of a hash.
type Pairs = Vec<(String, String)>;

impl RedisStore {
    pub(crate) async fn schedule_version(
        &self,
        keys: &ScheduleKeys,
        deadline: Deadline,
    ) -> Result<i64> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(&keys.version);
        let v: Option<i64> = self.query(&cmd, deadline).await?;
        Ok(v.unwrap_or(0))
    }

    pub(crate) async fn schedule_snapshot(
        &self,
        keys: &ScheduleKeys,
        deadline: Deadline,
    ) -> Result<(i64, Pairs, Pairs)> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&keys.version);
        pipe.cmd("HGETALL").arg(&keys.defs);
        pipe.cmd("HGETALL").arg(&keys.runs);
        let (version, defs, runs): (Option<i64>, Pairs, Pairs) =
            self.query_pipe(&pipe, deadline).await?;
        Ok((version.unwrap_or(0), defs, runs))
    }

    pub(crate) async fn schedule_get(
        &self,
        keys: &ScheduleKeys,
        name: &str,
        deadline: Deadline,
    ) -> Result<(Option<String>, Option<String>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(&keys.defs).arg(name);
        pipe.cmd("HGET").arg(&keys.runs).arg(name);
        self.query_pipe(&pipe, deadline).await
    }

    pub(crate) async fn schedule_put(
        &self,
        keys: &ScheduleKeys,
        name: &str,
        json: &str,
        put: Put,
        deadline: Deadline,
    ) -> Result<bool> {
        let mode = match put {
            Put::New => "new",
            Put::Existing => "existing",
            Put::Any => "any",
        };
        // Not repeated after a lost reply: a repeated create would report
        // its own write as a taken name.
        let keys = [keys.defs.as_str(), keys.version.as_str()];
        let done = self
            .schedule_script(PUT, &keys, &[name, json, mode], true, deadline)
            .await?;
        Ok(done == 1)
    }

    pub(crate) async fn schedule_delete(
        &self,
        keys: &ScheduleKeys,
        name: &str,
        deadline: Deadline,
    ) -> Result<bool> {
        let keys = [
            keys.defs.as_str(),
            keys.version.as_str(),
            keys.runs.as_str(),
        ];
        let done = self
            .schedule_script(DELETE, &keys, &[name], true, deadline)
            .await?;
        Ok(done == 1)
    }

    pub(crate) async fn schedule_record_run(
        &self,
        keys: &ScheduleKeys,
        name: &str,
        json: &str,
        fired_ms: i64,
        deadline: Deadline,
    ) -> Result<()> {
        let keys = [keys.defs.as_str(), keys.runs.as_str()];
        let fired = fired_ms.to_string();
        self.schedule_script(RECORD_RUN, &keys, &[name, json, &fired], false, deadline)
            .await?;
        Ok(())
    }

    /// Runs one of the scripts above: `once` for scripts whose repetition
    /// after a lost reply would answer wrongly.
    async fn schedule_script(
        &self,
        source: &str,
        keys: &[&str],
        args: &[&str],
        once: bool,
        deadline: Deadline,
    ) -> Result<i64> {
        let script = Script::new(source);
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        let inv = &invocation;
        let call = |mut c: redis::aio::ConnectionManager| async move {
            inv.invoke_async::<i64>(&mut c).await
        };
        if once {
            self.run_once(deadline, call).await
        } else {
            self.run(deadline, call).await
        }
    }
}
