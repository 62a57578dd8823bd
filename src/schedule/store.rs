//! Where schedules live: Redis (shared by every koo instance) or this
//! process's memory. A version counter moves with every change, so that an
//! instance notices another's change with one cheap read.
//!
//! Redis keys (one hash tag, so one Redis Cluster slot):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{prefix}:v1:{schedules}:defs` | hash | name → schedule JSON |
//! | `{prefix}:v1:{schedules}:runs` | hash | name → latest run JSON |
//! | `{prefix}:v1:{schedules}:version` | string | counter, bumped by every change |

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::model::{Run, Schedule};
use crate::store::{Deadline, RedisStore, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

/// Key names of the schedule store under a prefix.
#[derive(Debug, Clone)]
pub struct ScheduleKeys {
    /// Definitions.
    pub defs: String,
    /// Latest runs.
    pub runs: String,
    /// Change counter.
    pub version: String,
}

impl ScheduleKeys {
    /// The keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        let base = format!("{prefix}:v1:{{schedules}}");
        Self {
            defs: format!("{base}:defs"),
            runs: format!("{base}:runs"),
            version: format!("{base}:version"),
        }
    }
}

/// Everything stored, as one read returns it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The change counter when read.
    pub version: i64,
    /// Schedules by name (entries that do not parse are skipped, logged).
    pub schedules: BTreeMap<String, Schedule>,
    /// Latest runs by schedule name.
    pub runs: HashMap<String, Run>,
}

/// The schedule store.
#[derive(Clone)]
pub enum ScheduleStore {
    /// Shared through Redis.
    Redis {
        /// The connection pool.
        store: RedisStore,
        /// Key names.
        keys: ScheduleKeys,
    },
    /// This process only.
    Memory(Arc<Mutex<Snapshot>>),
}

impl ScheduleStore {
    /// Schedules in Redis under `prefix`.
    pub fn redis(store: RedisStore, prefix: &str) -> Self {
        Self::Redis {
            store,
            keys: ScheduleKeys::new(prefix),
        }
    }

    /// Schedules in this process.
    pub fn memory() -> Self {
        Self::Memory(Arc::default())
    }

    fn lock(m: &Mutex<Snapshot>) -> std::sync::MutexGuard<'_, Snapshot> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The change counter.
    pub async fn version(&self, deadline: Deadline) -> Result<i64> {
        match self {
            Self::Redis { store, keys } => store.schedule_version(keys, deadline).await,
            Self::Memory(m) => Ok(Self::lock(m).version),
        }
    }

    /// Every schedule and latest run.
    pub async fn snapshot(&self, deadline: Deadline) -> Result<Snapshot> {
        match self {
            Self::Redis { store, keys } => {
                let (version, defs, runs) = store.schedule_snapshot(keys, deadline).await?;
                let mut out = Snapshot {
                    version,
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
            Self::Memory(m) => Ok(Self::lock(m).clone()),
        }
    }

    /// One schedule and its latest run; `None` when there is no such name.
    pub async fn get(
        &self,
        name: &str,
        deadline: Deadline,
    ) -> Result<Option<(Schedule, Option<Run>)>> {
        match self {
            Self::Redis { store, keys } => {
                let (def, run) = store.schedule_get(keys, name, deadline).await?;
                let Some(def) = def else { return Ok(None) };
                let def = serde_json::from_str(&def)
                    .map_err(|e| StoreError::Backend(format!("schedule {name}: {e}")))?;
                let run = run.and_then(|r| serde_json::from_str(&r).ok());
                Ok(Some((def, run)))
            }
            Self::Memory(m) => {
                let s = Self::lock(m);
                Ok(s.schedules
                    .get(name)
                    .map(|d| (d.clone(), s.runs.get(name).cloned())))
            }
        }
    }

    /// Stores a new schedule; `false` when the name is taken.
    pub async fn create(&self, schedule: &Schedule, deadline: Deadline) -> Result<bool> {
        match self {
            Self::Redis { store, keys } => {
                store
                    .schedule_put(keys, &schedule.name, &json(schedule)?, Put::New, deadline)
                    .await
            }
            Self::Memory(m) => {
                let mut s = Self::lock(m);
                if s.schedules.contains_key(&schedule.name) {
                    return Ok(false);
                }
                s.schedules.insert(schedule.name.clone(), schedule.clone());
                s.version += 1;
                Ok(true)
            }
        }
    }

    /// Replaces an existing schedule; `false` when there is none.
    pub async fn replace(&self, schedule: &Schedule, deadline: Deadline) -> Result<bool> {
        match self {
            Self::Redis { store, keys } => {
                store
                    .schedule_put(
                        keys,
                        &schedule.name,
                        &json(schedule)?,
                        Put::Existing,
                        deadline,
                    )
                    .await
            }
            Self::Memory(m) => {
                let mut s = Self::lock(m);
                let Some(slot) = s.schedules.get_mut(&schedule.name) else {
                    return Ok(false);
                };
                *slot = schedule.clone();
                s.version += 1;
                Ok(true)
            }
        }
    }

    /// Stores a schedule whether or not it exists (configuration defaults).
    pub async fn upsert(&self, schedule: &Schedule, deadline: Deadline) -> Result<()> {
        match self {
            Self::Redis { store, keys } => store
                .schedule_put(keys, &schedule.name, &json(schedule)?, Put::Any, deadline)
                .await
                .map(|_| ()),
            Self::Memory(m) => {
                let mut s = Self::lock(m);
                s.schedules.insert(schedule.name.clone(), schedule.clone());
                s.version += 1;
                Ok(())
            }
        }
    }

    /// Removes a schedule and its run record; `false` when there was none.
    pub async fn delete(&self, name: &str, deadline: Deadline) -> Result<bool> {
        match self {
            Self::Redis { store, keys } => store.schedule_delete(keys, name, deadline).await,
            Self::Memory(m) => {
                let mut s = Self::lock(m);
                s.runs.remove(name);
                let existed = s.schedules.remove(name).is_some();
                if existed {
                    s.version += 1;
                }
                Ok(existed)
            }
        }
    }

    /// Records a schedule's latest run (unless a later tick's is there).
    pub async fn record_run(&self, name: &str, run: &Run, deadline: Deadline) -> Result<()> {
        match self {
            Self::Redis { store, keys } => {
                store
                    .schedule_record_run(keys, name, &json(run)?, run.fired_ms, deadline)
                    .await
            }
            Self::Memory(m) => {
                let mut s = Self::lock(m);
                if !s.schedules.contains_key(name) {
                    return Ok(());
                }
                let newer = s.runs.get(name).is_some_and(|r| r.fired_ms > run.fired_ms);
                if !newer {
                    s.runs.insert(name.to_owned(), run.clone());
                }
                Ok(())
            }
        }
    }
}

/// The in-process store's schedules and runs as plain data, for the data
/// directory (`crate::persist`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SchedulesImage {
    /// Every schedule, by name.
    pub schedules: BTreeMap<String, Schedule>,
    /// Latest runs by schedule name.
    pub runs: BTreeMap<String, Run>,
}

impl ScheduleStore {
    /// Schedules in this process, starting from a saved image.
    pub fn memory_from(image: SchedulesImage) -> Self {
        Self::Memory(Arc::new(Mutex::new(Snapshot {
            version: 1,
            schedules: image.schedules,
            runs: image.runs.into_iter().collect(),
        })))
    }

    /// The in-process store's content; `None` on Redis.
    pub fn export_memory(&self) -> Option<SchedulesImage> {
        match self {
            Self::Redis { .. } => None,
            Self::Memory(m) => {
                let s = Self::lock(m);
                Some(SchedulesImage {
                    schedules: s.schedules.clone(),
                    runs: s.runs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                })
            }
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("schedule JSON: {e}")))
}

/// How a put treats an existing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Only when the name is free.
    New,
    /// Only when the name exists.
    Existing,
    /// Either way.
    Any,
}
