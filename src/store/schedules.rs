//! The schedule store: where schedule definitions and their latest runs
//! live, in Redis (shared by every koo instance) or in this process. A
//! version counter moves with every change, so that an instance notices
//! another's change with one cheap read.
//!
//! Redis keys (one hash tag, so one Redis Cluster slot):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{prefix}:v1:{schedules}:defs` | hash | name → schedule JSON |
//! | `{prefix}:v1:{schedules}:runs` | hash | name → latest run JSON |
//! | `{prefix}:v1:{schedules}:version` | string | counter, bumped by every change |

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{Deadline, RedisStore, Result};
use crate::domain::schedule::{Run, Schedule};

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

/// The in-process store's schedules and runs as plain data, for the data
/// directory (`crate::persist`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SchedulesImage {
    /// Every schedule, by name.
    pub schedules: BTreeMap<String, Schedule>,
    /// Latest runs by schedule name.
    pub runs: BTreeMap<String, Run>,
}

/// What the schedule service asks of a backend. Every change but a run
/// record bumps the version.
#[tonic::async_trait]
pub trait ScheduleBackend: Send + Sync {
    /// The change counter.
    async fn version(&self, deadline: Deadline) -> Result<i64>;

    /// Every schedule and latest run.
    async fn snapshot(&self, deadline: Deadline) -> Result<Snapshot>;

    /// One schedule and its latest run; `None` when there is no such name.
    async fn get(&self, name: &str, deadline: Deadline) -> Result<Option<(Schedule, Option<Run>)>>;

    /// Stores `schedule` if `put` allows it given whether its name exists;
    /// `false` when it did not.
    async fn put(&self, schedule: &Schedule, put: Put, deadline: Deadline) -> Result<bool>;

    /// Removes a schedule and its run record; `false` when there was none.
    async fn delete(&self, name: &str, deadline: Deadline) -> Result<bool>;

    /// Records a schedule's latest run, unless the schedule is gone or a
    /// later run is recorded.
    async fn record_run(&self, name: &str, run: &Run, deadline: Deadline) -> Result<()>;

    /// The content as plain data, for the data directory; `None` for a
    /// store that keeps it elsewhere (Redis).
    fn export(&self) -> Option<SchedulesImage> {
        None
    }
}

/// The schedule store: a cheap-to-clone handle on one [`ScheduleBackend`]
/// (a trait object for the reasons given at [`super::CacheBackend`];
/// schedules are far off any hot path).
#[derive(Clone)]
pub struct ScheduleStore(Arc<dyn ScheduleBackend>);

impl std::ops::Deref for ScheduleStore {
    type Target = dyn ScheduleBackend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl ScheduleStore {
    /// Schedules in Redis under `prefix`.
    pub fn redis(store: RedisStore, prefix: &str) -> Self {
        Self(Arc::new(super::redis::RedisSchedules::new(
            store,
            ScheduleKeys::new(prefix),
        )))
    }

    /// Schedules in this process.
    pub fn memory() -> Self {
        Self(Arc::new(super::memory::MemorySchedules::default()))
    }

    /// Schedules in this process, in `store` (kept by the caller too: the
    /// data directory's journal replays into it and is appended to by it).
    pub fn from_memory(store: Arc<super::memory::MemorySchedules>) -> Self {
        Self(store)
    }

    /// Schedules in this process, starting from a saved image.
    pub fn memory_from(image: SchedulesImage) -> Self {
        Self(Arc::new(super::memory::MemorySchedules::from_image(image)))
    }

    /// The in-process store's content; `None` on Redis.
    pub fn export_memory(&self) -> Option<SchedulesImage> {
        self.0.export()
    }

    /// Stores a new schedule; `false` when the name is taken.
    pub async fn create(&self, schedule: &Schedule, deadline: Deadline) -> Result<bool> {
        self.put(schedule, Put::New, deadline).await
    }

    /// Replaces an existing schedule; `false` when there is none.
    pub async fn replace(&self, schedule: &Schedule, deadline: Deadline) -> Result<bool> {
        self.put(schedule, Put::Existing, deadline).await
    }

    /// Stores a schedule whether or not it exists (configuration defaults).
    pub async fn upsert(&self, schedule: &Schedule, deadline: Deadline) -> Result<()> {
        self.put(schedule, Put::Any, deadline).await.map(|_| ())
    }
}
