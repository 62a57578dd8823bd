//! The task engine's storage: one trait, [`TaskBackend`], whose methods are
//! the task transitions (each specified once, in its doc: `backend.rs`),
//! implemented on Redis (one Lua script each: `redis/tasks/`) and on the
//! embedded store (one critical section each: `memory/tasks/`).
//!
//! [`TaskStore`] is the handle every caller holds: a cheap clone of an
//! `Arc<dyn TaskBackend>` that derefs to the trait, so `store.lease(..)`
//! reads the same whichever backend is behind it. Every method names the
//! queue or task it works on; the Redis side derives its keys (one hash
//! slot per queue) from that.

mod backend;
mod debounce;
mod handoff;

pub use backend::TaskBackend;
pub use debounce::DebounceReply;
pub(crate) use handoff::{lease_answer, submit_many_then_lease_each};

use std::any::Any;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use super::clock::Clock;
use super::memory::tasks::{MemoryEventReader, MemoryTasks};
use super::redis::{RedisTasks, StreamReader};
pub use super::redis::{SubmitWatch, Woken};
use super::{RedisStore, Result};
use crate::domain::Outcome;
use crate::domain::task::{QueueName, State, Task, TaskId};

/// The width of a priority band of a ready score; the Lua scripts get it
/// through the generated prelude (`local BAND = ...`).
pub use crate::domain::task::BAND_WIDTH;

/// Bounds on what the engine keeps per queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    /// Events kept per queue stream (approximately: `MAXLEN ~`).
    pub events: u64,
    /// Ended tasks kept per queue history.
    pub history: u64,
    /// Ready tasks a lease looks at to find one whose name the worker serves.
    pub lease_scan: u64,
    /// How long a dead letter (FAILED or TIMED_OUT, within the cap) keeps
    /// its task: longer than a result, so that failures found late can
    /// still be read and requeued.
    pub dead_ttl: Duration,
    /// Whether a queue's or a task name's rate limit may exist (the engine
    /// knows, within a second): then the lease looks them up; without, the
    /// plain path costs nothing more. Key limits, back-offs and concurrency
    /// caps are looked up for tasks that carry a key, whatever this says.
    pub flow: bool,
    /// Replicas a submit waits for (`WAIT`, in its round trip) before it is
    /// acknowledged (`KOO_TASK_SUBMIT_WAIT_REPLICAS`): then a failover
    /// cannot lose an acknowledged submit. 0 (the default): no wait, and
    /// the loss window of asynchronous replication stays open.
    pub submit_wait_replicas: u32,
    /// How long a submit waits for them before it answers UNAVAILABLE
    /// (`KOO_TASK_SUBMIT_WAIT_TIMEOUT`; `WAIT` holds the pooled connection
    /// it runs on meanwhile, so it is kept short).
    pub submit_wait_timeout: Duration,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            events: 10_000,
            history: 10_000,
            lease_scan: 100,
            dead_ttl: Duration::from_secs(7 * 24 * 3600),
            flow: false,
            submit_wait_replicas: 0,
            submit_wait_timeout: Duration::from_millis(200),
        }
    }
}

/// One entry of a queue's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEvent {
    /// The stream entry id (a resume position).
    pub stream_id: String,
    /// The task.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its state after the event (`queued`, `running`, ...).
    pub state: String,
    /// The progress reported (JSON), for a progress event.
    pub progress: Option<String>,
    /// When it happened (Redis's clock, ms).
    pub at_ms: i64,
}

/// What a heartbeat learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Beat {
    /// The lease is still this worker's, extended.
    Held,
    /// Still held, and a cancel was asked for, with the reason its caller
    /// gave: stop the task. The reason comes with the heartbeat itself, so
    /// that a worker told of a cancel made through another koo process
    /// learns why without another round trip.
    CancelRequested(String),
    /// Fenced: the lease is someone else's, or the task ended.
    Lost,
}

/// What a take-over did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeOver {
    /// The lease is the caller's under `token`; `cancel` is the reason of
    /// a cancel asked for meanwhile.
    Taken {
        /// The lease's new token.
        token: u32,
        /// A cancel's reason, when one was asked for.
        cancel: Option<String>,
    },
    /// Fenced: the lease is someone else's, or the task ended.
    Lost,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReply {
    /// The task was waiting and is now CANCELLED.
    Cancelled,
    /// The task is running: its worker is told to stop.
    Requested,
    /// No such task (or its result expired).
    Missing,
    /// The task had already ended, in this state.
    Ended(State),
}

impl CancelReply {
    pub(crate) fn parse(reply: &str) -> Self {
        match reply {
            "cancelled" => Self::Cancelled,
            "cancelling" => Self::Requested,
            "missing" => Self::Missing,
            other => other
                .strip_prefix("ended:")
                .and_then(State::parse)
                .map_or(Self::Missing, Self::Ended),
        }
    }
}

/// What registering on a dependency found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependReply {
    /// It has not ended: the dependent waits on it.
    Waiting,
    /// No such task (or its result expired).
    Missing,
    /// It already ended, in this state.
    Ended(State),
}

impl DependReply {
    pub(crate) fn parse(reply: &str) -> Self {
        match reply {
            "waiting" => Self::Waiting,
            "missing" => Self::Missing,
            other => other
                .strip_prefix("ended:")
                .and_then(State::parse)
                .map_or(Self::Missing, Self::Ended),
        }
    }
}

/// What a RetryTask did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReply {
    /// Queued again.
    Queued,
    /// No such task (or its result expired).
    Missing,
    /// The task is in this state, which a retry does not apply to.
    NotEnded(State),
}

impl RetryReply {
    pub(crate) fn parse(reply: &str) -> Self {
        match reply {
            "queued" => Self::Queued,
            "missing" => Self::Missing,
            other => other
                .strip_prefix("in:")
                .and_then(State::parse)
                .map_or(Self::Missing, Self::NotEnded),
        }
    }
}

/// What a worker asks for when it leases.
#[derive(Debug, Clone, Copy)]
pub struct LeaseAsk<'a> {
    /// The worker's name.
    pub worker: &'a str,
    /// The lease's length.
    pub lease: Duration,
    /// The task names it serves (`*`: all).
    pub names: &'a [&'a str],
}

/// One attempt's end in a batch (see [`TaskBackend::finish_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct FinishItem<'a> {
    /// The task.
    pub id: &'a TaskId,
    /// Its lease's fencing token.
    pub token: u32,
    /// How the attempt ended.
    pub outcome: &'a Outcome,
    /// The attempt's log entry.
    pub log: &'a str,
    /// The worker that the queue's next task goes to after this end, when
    /// one is wanted.
    pub next: Option<&'a str>,
}

/// What a batch did with one [`FinishItem`]: its finish (as
/// [`TaskBackend::finish`] answers), and, for an accepted item that asked
/// for one, the lease made for its `next` worker.
#[derive(Debug)]
pub struct BatchEnd {
    /// The new state and whether tasks wait on it; `None` when fenced; an
    /// error that concerns this item alone.
    pub ended: Result<Option<(State, bool)>>,
    /// The lease made for it (`None` when it asked for none or was not
    /// accepted). A leased task beside an `ended` that is not `Ok(Some)`
    /// (an accepted finish whose reply could not be read) is the caller's
    /// to hand back.
    pub next: Option<Leased>,
}

/// A worker pool's presence record: who it is, what it serves, when it
/// last said it was alive.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerRecord {
    /// The pool's id (`host:pid:random`); its slots are `id/N`.
    pub id: String,
    /// Worker slots.
    pub slots: u32,
    /// Slots running a task when it last reported.
    pub running: u32,
    /// The queues it leases from.
    pub queues: Vec<String>,
    /// The task names it serves.
    pub names: Vec<String>,
    /// When it started (ms since the epoch).
    pub started_ms: i64,
    /// When it last reported (ms since the epoch).
    pub seen_ms: i64,
    /// `builtin`, `stream` or `unary` (records from before external workers
    /// have none: built-in).
    #[serde(default)]
    pub kind: String,
    /// The name an external worker gave.
    #[serde(default)]
    pub name: String,
    /// The tasks it holds (stream workers).
    #[serde(default)]
    pub held: Vec<String>,
    /// Its network address (external workers).
    #[serde(default)]
    pub peer: String,
}

/// What a lease call found.
#[derive(Debug, Clone, PartialEq)]
pub enum Leased {
    /// A task, now RUNNING.
    Task(Box<Task>),
    /// Nothing the worker serves is QUEUED (or the queue is paused).
    Empty,
    /// Tasks wait, but every one looked at is held by a rate limit or a
    /// key's back-off until at least this time (ms since the epoch), or
    /// by a concurrency cap (then `None`: until one of the key's tasks
    /// ends): the worker can rest the queue until then.
    Held(Option<i64>),
}

impl Leased {
    /// A copy of what a lease that found no task said (nothing waits, or
    /// limits hold the queue until a time): what later leases of the same
    /// call would find; `None` for a task.
    pub fn dry(&self) -> Option<Leased> {
        match self {
            Self::Task(_) => None,
            Self::Empty => Some(Self::Empty),
            Self::Held(until) => Some(Self::Held(*until)),
        }
    }

    /// The task, if one was leased.
    pub fn task(self) -> Option<Task> {
        match self {
            Self::Task(t) => Some(*t),
            Self::Empty | Self::Held(_) => None,
        }
    }
}

/// What one recovery call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Entries handled: lapsed leases and due scheduled tasks.
    pub handled: u64,
    /// Waiting tasks past their expiry that were ended (at most 100 a call:
    /// the sweep calls again while a call ends 100).
    pub expired: u64,
    /// Tasks ended expired whose dependents the caller must release (on
    /// Redis, where they may live in other queues' slots; the embedded store
    /// releases them itself).
    pub release: Vec<TaskId>,
}

/// What one trim removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Trimmed {
    /// Ended tasks removed from history (with their stored results).
    pub history: u64,
    /// Dead letters removed.
    pub dead: u64,
    /// Events trimmed from the event log.
    pub events: u64,
}

/// Where the task engine keeps its state: a cheap-to-clone handle over one
/// backend.
///
/// A trait object rather than a type parameter: the engine, the watch
/// feeds, the gRPC services and persistence all hold a `TaskStore`, and
/// making each of them generic over the backend would spread a parameter
/// through half the crate for no gain: the cost of the dynamic call (one
/// boxed future per call, from `async_trait`) is noise next to a Redis
/// round trip (~50 µs) or the embedded store's lock.
#[derive(Clone)]
pub struct TaskStore(Arc<dyn TaskBackend>);

impl Deref for TaskStore {
    type Target = dyn TaskBackend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl TaskStore {
    /// Tasks on Redis under `prefix`.
    pub fn redis(store: RedisStore, prefix: &str) -> Self {
        Self::redis_with_clock(store, prefix, Clock::system())
    }

    /// Tasks on Redis under `prefix`, whose scripts read Redis's clock
    /// shifted by `clock`'s offset (tests move it; see [`Clock`]).
    pub fn redis_with_clock(store: RedisStore, prefix: &str, clock: Clock) -> Self {
        Self(Arc::new(RedisTasks::new(store, prefix, clock)))
    }

    /// Tasks in this process's memory.
    pub fn memory() -> Self {
        Self::from_memory(MemoryTasks::default())
    }

    /// Tasks in this process's memory, on `clock` (tests move it).
    pub fn memory_with_clock(clock: Clock) -> Self {
        Self::from_memory(MemoryTasks::with_clock(clock))
    }

    /// Tasks kept in this process's memory by `tasks` (a restored image).
    pub fn from_memory(tasks: MemoryTasks) -> Self {
        Self(Arc::new(tasks))
    }

    fn backend(&self) -> &dyn Any {
        self.0.as_any()
    }

    /// Makes idempotency claims on Redis wait for `replicas` replicas, as
    /// submits do with [`TaskLimits::submit_wait_replicas`] (nothing on the
    /// embedded store).
    pub fn wait_claims_for(&self, replicas: u32, timeout: Duration) {
        if let Some(redis) = self.backend().downcast_ref::<RedisTasks>() {
            redis.wait_claims_for(replicas, timeout);
        }
    }

    /// The Redis pool and key prefix, when the tasks live on Redis (the
    /// composition root shares the pool with the schedules and health).
    pub fn redis_parts(&self) -> Option<(&RedisStore, &str)> {
        self.backend()
            .downcast_ref::<RedisTasks>()
            .map(RedisTasks::parts)
    }

    /// The watches through which this process's idle workers are woken by
    /// submits made in other processes (see [`SubmitWatch`]): none on the
    /// embedded store, whose submits all come through this process.
    pub fn submit_watches(&self, queues: &[QueueName]) -> Vec<SubmitWatch> {
        self.backend()
            .downcast_ref::<RedisTasks>()
            .map(|redis| redis.submit_watches(queues))
            .unwrap_or_default()
    }

    /// The embedded tasks, when they live in this process (persistence
    /// exports their image).
    pub fn memory_tasks(&self) -> Option<&MemoryTasks> {
        self.backend().downcast_ref::<MemoryTasks>()
    }
}

/// Follows one queue's events.
///
/// An enum rather than a trait object: the backends are two and known, a
/// reader lives as long as a watch and is polled in a loop, and matching
/// costs nothing where a boxed future per read would.
pub enum EventReader {
    /// A Redis stream.
    Redis(StreamReader),
    /// The embedded store's event log.
    Memory(MemoryEventReader),
}

impl EventReader {
    /// The position after the last event read (a resume position).
    pub fn position(&self) -> String {
        match self {
            Self::Redis(r) => r.position().to_owned(),
            Self::Memory(r) => r.position(),
        }
    }

    /// The next events, at most `max` (and at most 1,000), waiting up to
    /// `block` for some (empty after that).
    pub async fn next(&mut self, block: Duration, max: usize) -> Result<Vec<TaskEvent>> {
        let max = max.clamp(1, 1000);
        match self {
            Self::Redis(r) => r.next(block, max).await,
            Self::Memory(r) => Ok(r.next(block, max).await),
        }
    }
}
