//! The schedule store on Redis (keys in [`crate::store::schedules`]): two
//! hashes of JSON documents and a version counter, changed by the scripts
//! below so that a change and its version bump are one.

use redis::Script;

use super::RedisStore;
use crate::domain::schedule::{Run, Schedule};
use crate::store::schedules::{Put, ScheduleBackend, ScheduleKeys, Snapshot};
use crate::store::{Deadline, Result, StoreError};

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

/// Schedules in one Redis under one prefix.
pub struct RedisSchedules {
    store: RedisStore,
    keys: ScheduleKeys,
}

impl RedisSchedules {
    /// Schedules in `store` under `keys`.
    pub fn new(store: RedisStore, keys: ScheduleKeys) -> Self {
        Self { store, keys }
    }

    /// Runs one of the scripts above: `once` for scripts whose repetition
    /// after a lost reply would answer wrongly.
    async fn script(
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
        let call = |mut c: super::conn::Conn| async move { inv.invoke_async::<i64>(&mut c).await };
        if once {
            self.store.run_once(deadline, call).await
        } else {
            self.store.run(deadline, call).await
        }
    }
}

#[tonic::async_trait]
impl ScheduleBackend for RedisSchedules {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn version(&self, deadline: Deadline) -> Result<i64> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(&self.keys.version);
        let v: Option<i64> = self.store.query(&cmd, deadline).await?;
        Ok(v.unwrap_or(0))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn snapshot(&self, deadline: Deadline) -> Result<Snapshot> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&self.keys.version);
        pipe.cmd("HGETALL").arg(&self.keys.defs);
        pipe.cmd("HGETALL").arg(&self.keys.runs);
        let (version, defs, runs): (Option<i64>, Pairs, Pairs) =
            self.store.query_pipe(&pipe, deadline).await?;
        let mut out = Snapshot {
            version: version.unwrap_or(0),
            ..Snapshot::default()
        };
        for (name, json) in defs {
            match serde_json::from_str::<Schedule>(&json) {
                Ok(s) => {
                    out.schedules.insert(name, s);
                }
                Err(e) => {
                    tracing::warn!(schedule = %name, error = %e, "skipping a stored schedule that does not parse")
                }
            }
        }
        for (name, json) in runs {
            if let Ok(r) = serde_json::from_str::<Run>(&json) {
                out.runs.insert(name, r);
            }
        }
        Ok(out)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%name))]
    async fn get(&self, name: &str, deadline: Deadline) -> Result<Option<(Schedule, Option<Run>)>> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(&self.keys.defs).arg(name);
        pipe.cmd("HGET").arg(&self.keys.runs).arg(name);
        let (def, run): (Option<String>, Option<String>) =
            self.store.query_pipe(&pipe, deadline).await?;
        let Some(def) = def else { return Ok(None) };
        let def = serde_json::from_str(&def)
            .map_err(|e| StoreError::Backend(format!("schedule {name}: {e}")))?;
        let run = run.and_then(|r| serde_json::from_str(&r).ok());
        Ok(Some((def, run)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(name = %schedule.name, ?put))]
    async fn put(&self, schedule: &Schedule, put: Put, deadline: Deadline) -> Result<bool> {
        let mode = match put {
            Put::New => "new",
            Put::Existing => "existing",
            Put::Any => "any",
        };
        let json = json(schedule)?;
        // Not repeated after a lost reply: a repeated create would report
        // its own write as a taken name.
        let keys = [self.keys.defs.as_str(), self.keys.version.as_str()];
        let done = self
            .script(PUT, &keys, &[&schedule.name, &json, mode], true, deadline)
            .await?;
        Ok(done == 1)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%name))]
    async fn delete(&self, name: &str, deadline: Deadline) -> Result<bool> {
        let keys = [
            self.keys.defs.as_str(),
            self.keys.version.as_str(),
            self.keys.runs.as_str(),
        ];
        let done = self.script(DELETE, &keys, &[name], true, deadline).await?;
        Ok(done == 1)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%name))]
    async fn record_run(&self, name: &str, run: &Run, deadline: Deadline) -> Result<()> {
        let keys = [self.keys.defs.as_str(), self.keys.runs.as_str()];
        let fired = run.fired_ms.to_string();
        self.script(
            RECORD_RUN,
            &keys,
            &[name, &json(run)?, &fired],
            false,
            deadline,
        )
        .await?;
        Ok(())
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("schedule JSON: {e}")))
}
