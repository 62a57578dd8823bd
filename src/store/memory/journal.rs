//! The embedded store's journal of acknowledged changes (with
//! `KOO_DATA_DIR`): what the stores hand to it, and the seam through which
//! they do.
//!
//! Why a journal and why of these changes only: a periodic save alone let a
//! `kill -9` lose every task submitted since the last save, although its
//! submit had been answered OK. Each change a caller is told succeeded and
//! could not be recovered otherwise (a submit, a cancel, a retry by hand, an
//! idempotency claim, a dependency link, a pause, a flow limit, a schedule
//! and its runs) is appended here under the lock that made it, so the
//! journal's order is the store's, and the call answers once the journal has
//! it (`KOO_DATA_FSYNC` says how durably). Leases, heartbeats and ends are
//! not journaled: after a crash a task restored as it was submitted runs
//! again (at least once, as after any crash), and a lost end makes it run
//! again rather than vanish.
//!
//! Records name what happened, with the store's clock at the time, so that
//! replaying them on the last save through the same transitions gives what
//! the callers were told. Replay is idempotent: a record whose effect the
//! save already holds changes nothing (a submit of an id that exists is
//! skipped), so a save need not be atomic with the journal's rotation
//! (`crate::persist::journal`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::domain::schedule::{Run, Schedule};
use crate::domain::task::Task;
use crate::store::{Result, task_fields};

/// A task in a record: kept as the task itself (one clone under the
/// store's lock), written as the field map Redis stores and the save holds
/// (`task_fields`), by the journal's thread.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFields(pub Box<Task>);

impl Serialize for TaskFields {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_map(task_fields::to_fields(&self.0))
    }
}

impl<'de> Deserialize<'de> for TaskFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let fields = HashMap::<String, String>::deserialize(deserializer)?;
        let id = fields.get("id").cloned().unwrap_or_default();
        task_fields::from_fields(&fields, Vec::new())
            .map(|t| Self(Box::new(t)))
            .map_err(|e| serde::de::Error::custom(format!("task {id:?}: {e}")))
    }
}

/// One acknowledged change, as a JSON line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// A task submitted (`delay_ms` > 0: scheduled).
    Submit {
        now: i64,
        delay_ms: u64,
        task: TaskFields,
    },
    /// A task submitted waiting on dependencies.
    Pending {
        now: i64,
        waiting: Vec<String>,
        task: TaskFields,
    },
    /// A debounced submit: a new task, or the held one `replaced`.
    Debounce {
        now: i64,
        window_ms: u64,
        task: TaskFields,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replaced: Option<String>,
    },
    /// `dependent` registered to wait on `id`.
    DependOn {
        now: i64,
        id: String,
        dependent: String,
    },
    /// An idempotency key claimed for `value`.
    Claim {
        now: i64,
        key: String,
        value: String,
        ttl_ms: u64,
    },
    /// An idempotency claim moved from `old` to `new`.
    Swap {
        now: i64,
        key: String,
        old: String,
        new: String,
        ttl_ms: u64,
    },
    /// A cancel asked for.
    Cancel {
        now: i64,
        id: String,
        reason: String,
    },
    /// A retry by hand.
    Retry { now: i64, id: String },
    /// A queue paused (`pause` as stored) or resumed (`None`).
    Pause {
        queue: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pause: Option<BTreeMap<String, String>>,
    },
    /// A flow limit set (its field and stored value).
    SetLimit { field: String, value: String },
    /// A flow limit removed.
    DeleteLimit { field: String },
    /// A schedule stored (created, replaced or from the configuration).
    PutSchedule { schedule: Box<Schedule> },
    /// A schedule removed.
    DeleteSchedule { name: String },
    /// A schedule's run recorded.
    ScheduleRun { name: String, run: Run },
}

/// Where the stores append their changes: the data directory's journal.
#[async_trait::async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Appends `record`, called under the lock that made the change; its
    /// sequence number, for [`Journal::kept`]. Never blocks on I/O.
    fn append(&self, record: Record) -> u64;

    /// Returns once the records `first..=last` are kept as durably as the
    /// journal's policy asks (0: nothing to wait for); an error when one
    /// could not be written (the change stands in memory but would not
    /// survive a crash).
    async fn kept(&self, first: u64, last: u64) -> Result<()>;
}

/// A store's optional journal, set once when the data directory is opened.
#[derive(Default)]
pub(crate) struct JournalSlot(OnceLock<Arc<dyn Journal>>);

impl JournalSlot {
    /// Sets the journal; a second call is ignored.
    pub(crate) fn set(&self, journal: Arc<dyn Journal>) {
        let _ = self.0.set(journal);
    }

    /// Appends the record `make` builds (none: nothing to keep), if there is
    /// a journal (without one, `make` is not called); its sequence number.
    pub(crate) fn append(&self, make: impl FnOnce() -> Option<Record>) -> Option<u64> {
        let journal = self.0.get()?;
        make().map(|r| journal.append(r))
    }

    /// Waits for the record `seq` (from [`Self::append`]) to be kept.
    pub(crate) async fn kept(&self, seq: Option<u64>) -> Result<()> {
        self.kept_all(seq, seq).await
    }

    /// Waits for the records `first..=last` to be kept.
    pub(crate) async fn kept_all(&self, first: Option<u64>, last: Option<u64>) -> Result<()> {
        match (first, last, self.0.get()) {
            (Some(first), Some(last), Some(j)) => j.kept(first, last).await,
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for JournalSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "JournalSlot(set)"
        } else {
            "JournalSlot(none)"
        })
    }
}
