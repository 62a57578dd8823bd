//! The task engine's storage: the same transitions on Redis (one Lua script
//! each, `redis/lua/tasks/`) and on the embedded store (one critical section
//! each, `memory/tasks.rs`).
//!
//! [`TaskStore`] is an enum, like [`super::Store`]: two backends, static
//! dispatch. Every method names the queue or task it works on; the Redis side
//! derives its keys (one hash slot per queue) from that.

use std::time::Duration;

use super::memory::tasks::{MemoryEventReader, MemoryTasks};
use super::redis::StreamReader;
use super::{Deadline, RedisStore, Result};
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::domain::{Outcome, QueueStats};
use crate::keys::QueueKeys;

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
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            events: 10_000,
            history: 10_000,
            lease_scan: 100,
            dead_ttl: Duration::from_secs(7 * 24 * 3600),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The lease is still this worker's, extended.
    Held,
    /// Still held, and a cancel was asked for: stop the task.
    CancelRequested,
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

/// A worker pool's presence record: who it is, what it serves, when it
/// last said it was alive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Where the task engine keeps its state.
#[derive(Clone)]
pub enum TaskStore {
    /// Redis, shared by any number of koo processes; keys under `prefix`.
    Redis {
        /// The connection pool.
        store: RedisStore,
        /// Key prefix.
        prefix: String,
    },
    /// This process's memory: one `koo serve`, kept across restarts only
    /// with `KOO_DATA_DIR`.
    Memory(MemoryTasks),
}

impl TaskStore {
    /// Tasks on Redis under `prefix`.
    pub fn redis(store: RedisStore, prefix: &str) -> Self {
        Self::Redis {
            store,
            prefix: prefix.to_owned(),
        }
    }

    /// Tasks in this process's memory.
    pub fn memory() -> Self {
        Self::Memory(MemoryTasks::default())
    }

    /// Tasks kept in this process's memory by `tasks` (a restored image).
    pub fn from_memory(tasks: MemoryTasks) -> Self {
        Self::Memory(tasks)
    }

    /// The Redis pool and key prefix, when the tasks live on Redis (the
    /// composition root shares the pool with the schedules and health).
    pub fn redis_parts(&self) -> Option<(&RedisStore, &str)> {
        match self {
            Self::Redis { store, prefix } => Some((store, prefix)),
            Self::Memory(_) => None,
        }
    }

    /// The embedded tasks, when they live in this process (persistence
    /// exports their image).
    pub fn memory_tasks(&self) -> Option<&MemoryTasks> {
        match self {
            Self::Memory(m) => Some(m),
            Self::Redis { .. } => None,
        }
    }

    /// Whether other koo processes can share these tasks.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Redis { .. })
    }

    fn keys(prefix: &str, queue: &QueueName) -> QueueKeys {
        QueueKeys::new(prefix, queue)
    }

    /// Stores a new task: queued now, or scheduled `delay` from now.
    pub async fn submit(
        &self,
        task: &Task,
        delay: Duration,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &task.id.queue());
                store
                    .submit_task(&keys, task, delay, limits, deadline)
                    .await
            }
            Self::Memory(m) => m.submit(task, delay, limits),
        }
    }

    /// Stores a batch of new tasks (each with its countdown) in one round
    /// trip: the outcome per task. `Err` when the batch as a whole failed
    /// (then, as for any ambiguous write, some may have been stored).
    pub async fn submit_many(
        &self,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<Result<()>>> {
        match self {
            Self::Redis { store, prefix } => {
                store.submit_tasks(prefix, tasks, limits, deadline).await
            }
            Self::Memory(m) => Ok(tasks
                .iter()
                .map(|(task, delay)| m.submit(task, *delay, limits))
                .collect()),
        }
    }

    /// Leases the best ready task of `queue` whose name is in `names` (`*`
    /// serves all), counting the attempt; `None` when there is none.
    pub async fn lease(
        &self,
        queue: &QueueName,
        worker: &str,
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<Task>> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, queue);
                store
                    .lease_task(&keys, worker, lease, names, limits, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.lease(queue, worker, lease, names, limits)),
        }
    }

    /// Extends a lease; whether it is still held, and whether a cancel was
    /// asked for.
    pub async fn heartbeat(
        &self,
        id: &TaskId,
        token: u32,
        lease: Duration,
        deadline: Deadline,
    ) -> Result<Beat> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store
                    .heartbeat_task(&keys, id, token, lease, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.heartbeat(id, token, lease)),
        }
    }

    /// Cancels a task that has not ended: waiting, it ends CANCELLED now;
    /// running, its worker is told (and the sweep ends it if the worker is
    /// gone).
    pub async fn cancel(
        &self,
        id: &TaskId,
        reason: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<CancelReply> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store.cancel_task(&keys, id, reason, limits, deadline).await
            }
            Self::Memory(m) => Ok(m.cancel(id, reason, limits)),
        }
    }

    /// Queues a FAILED, TIMED_OUT or CANCELLED task again with a fresh
    /// retry budget.
    pub async fn retry(
        &self,
        id: &TaskId,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<RetryReply> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store.retry_task(&keys, id, limits, deadline).await
            }
            Self::Memory(m) => Ok(m.retry(id, limits)),
        }
    }

    /// Stores a new task PENDING on the dependencies in `waiting` (each of
    /// which already lists it as a dependent).
    pub async fn submit_pending(
        &self,
        task: &Task,
        waiting: &[TaskId],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &task.id.queue());
                store
                    .submit_pending_task(&keys, task, waiting, limits, deadline)
                    .await
            }
            Self::Memory(m) => m.submit_pending(task, waiting, limits),
        }
    }

    /// Registers `dependent` as waiting on `id`, unless `id` has ended.
    pub async fn depend_on(
        &self,
        id: &TaskId,
        dependent: &TaskId,
        deadline: Deadline,
    ) -> Result<DependReply> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store.depend_on(&keys, id, dependent, deadline).await
            }
            Self::Memory(m) => Ok(m.depend_on(id, dependent)),
        }
    }

    /// The tasks waiting on `id` (on the embedded store, released as `id`
    /// ends: always empty).
    pub async fn dependents(&self, id: &TaskId, deadline: Deadline) -> Result<Vec<String>> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store.dependents(&keys, id, deadline).await
            }
            Self::Memory(_) => Ok(Vec::new()),
        }
    }

    /// Up to `count` PENDING tasks of `queue` with the dependencies each
    /// still waits on (on the embedded store: none need repair).
    pub async fn pending_tasks(
        &self,
        queue: &QueueName,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, Vec<String>)>> {
        match self {
            Self::Redis { store, prefix } => {
                store
                    .pending_tasks(&Self::keys(prefix, queue), count, deadline)
                    .await
            }
            Self::Memory(_) => Ok(Vec::new()),
        }
    }

    /// Dependency `dependency` of PENDING task `id` ended in `state`: the
    /// task's state after (the embedded store does this as the dependency
    /// ends).
    pub async fn resolve_dependency(
        &self,
        id: &TaskId,
        dependency: &str,
        state: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<State>> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store
                    .resolve_dependency(&keys, id, dependency, state, limits, deadline)
                    .await
            }
            Self::Memory(_) => Ok(None),
        }
    }

    /// Claims idempotency key `key` with `value` for `ttl`: `None` when
    /// claimed now, else the value of the claim that holds it.
    pub async fn claim_idempotency(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<Option<String>> {
        match self {
            Self::Redis { store, prefix } => {
                store
                    .claim_idempotency(prefix, key, value, ttl, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.claim_idempotency(key, value, ttl)),
        }
    }

    /// Replaces claim `old` of `key` with `new` (empty: deletes it) if it
    /// still holds `old`; whether it did.
    pub async fn swap_idempotency(
        &self,
        key: &str,
        old: &str,
        new: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<bool> {
        match self {
            Self::Redis { store, prefix } => {
                store
                    .swap_idempotency(prefix, key, old, new, ttl, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.swap_idempotency(key, old, new, ttl)),
        }
    }

    /// Which of `keys` are claimed idempotency keys (one round trip).
    pub async fn idempotency_claimed(
        &self,
        keys: &[String],
        deadline: Deadline,
    ) -> Result<Vec<bool>> {
        match self {
            Self::Redis { store, prefix } => {
                store.idempotency_claimed(prefix, keys, deadline).await
            }
            Self::Memory(m) => Ok(m.idempotency_claimed(keys)),
        }
    }

    /// Up to `count` of `queue`'s dead-lettered ids, oldest first.
    pub async fn dead_letters(
        &self,
        queue: &QueueName,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<String>> {
        match self {
            Self::Redis { store, prefix } => {
                store
                    .dead_letters(&Self::keys(prefix, queue), count, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.dead_letters(queue, count)),
        }
    }

    /// Hands a running task back to its queue at once (its worker is
    /// stopping), giving its attempt back; `false` when fenced.
    pub async fn release(
        &self,
        id: &TaskId,
        token: u32,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store
                    .release_task(&keys, id, token, log, limits, deadline)
                    .await
            }
            Self::Memory(m) => m.release(id, token, log, limits),
        }
    }

    /// Records progress (JSON); `false` when fenced.
    pub async fn progress(
        &self,
        id: &TaskId,
        token: u32,
        progress: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store
                    .progress_task(&keys, id, token, progress, limits, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.progress(id, token, progress, limits)),
        }
    }

    /// Ends the attempt held with `token`: the state the task moved to and
    /// whether tasks wait on it (on Redis, releasing them is the caller's
    /// part), or `None` when fenced. `log` is the attempt's log entry (a
    /// JSON object).
    #[allow(clippy::too_many_arguments)]
    pub async fn finish(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<(State, bool)>> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store
                    .finish_task(&keys, id, token, outcome, log, limits, deadline)
                    .await
            }
            // the embedded store releases dependents as the task ends
            Self::Memory(m) => Ok(m
                .finish(id, token, outcome, log, limits)?
                .map(|s| (s, false))),
        }
    }

    /// [`Self::finish`], then, when it was accepted, a lease of the next task
    /// of the same queue, in one round trip: the new state and the next
    /// task, or `None` when fenced.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_and_lease(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        next: &LeaseAsk<'_>,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<((State, bool), Option<Task>)>> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, &id.queue());
                store
                    .finish_and_lease_task(&keys, id, token, outcome, log, next, limits, deadline)
                    .await
            }
            Self::Memory(m) => {
                let Some(state) = m.finish(id, token, outcome, log, limits)? else {
                    return Ok(None);
                };
                let task = m.lease(&id.queue(), next.worker, next.lease, next.names, limits);
                Ok(Some(((state, false), task)))
            }
        }
    }

    /// Recovers `queue`'s lapsed leases and queues its due scheduled tasks
    /// (at most 100 of each per call); how many were handled.
    pub async fn recover(
        &self,
        queue: &QueueName,
        acks_late: bool,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<u64> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, queue);
                store
                    .recover_tasks(&keys, acks_late, limits, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.recover(queue, acks_late, limits)),
        }
    }

    /// Removes `queue`'s tasks that ended before `before_ms` (history,
    /// stored results; at most 1000 per call), except dead letters that
    /// ended at or after `dead_before_ms` (they stay, in history and
    /// stored), and trims its events to the cap.
    pub async fn trim(
        &self,
        queue: &QueueName,
        before_ms: i64,
        dead_before_ms: i64,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Trimmed> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, queue);
                store
                    .trim_tasks(&keys, before_ms, dead_before_ms, limits, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.trim(queue, before_ms, dead_before_ms)),
        }
    }

    /// Up to `count` active tasks of `queue` from position `offset` of set
    /// `set` (0 running, 1 queued, 2 scheduled), and where the next call
    /// should start (`None`: the queue is done).
    pub async fn list_active(
        &self,
        queue: &QueueName,
        set: usize,
        offset: u64,
        count: usize,
        deadline: Deadline,
    ) -> Result<(Vec<Task>, Option<(usize, u64)>)> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, queue);
                store.list_active(&keys, set, offset, count, deadline).await
            }
            Self::Memory(m) => Ok(m.list_active(queue, set, offset, count)),
        }
    }

    /// Up to `count` history entries of `queue` ending at or before `max_ms`
    /// (newest first, ties by id descending, skipping ids at `max_ms` that
    /// are not below `below_id`) and at or after `min_ms`: `(id, end ms,
    /// summary JSON)`.
    #[allow(clippy::too_many_arguments)]
    pub async fn history_page(
        &self,
        queue: &QueueName,
        max_ms: i64,
        below_id: Option<&str>,
        min_ms: i64,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, i64, String)>> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, queue);
                store
                    .history_page(&keys, max_ms, below_id, min_ms, count, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.history_page(queue, max_ms, below_id, min_ms, count)),
        }
    }

    /// `queue`'s depths, oldest wait and outcome counters.
    pub async fn queue_stats(&self, queue: &QueueName, deadline: Deadline) -> Result<QueueStats> {
        match self {
            Self::Redis { store, prefix } => {
                store
                    .queue_stats(&Self::keys(prefix, queue), deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.queue_stats(queue)),
        }
    }

    /// Reads a task and its attempt log; `None` once it has expired.
    pub async fn get(&self, id: &TaskId, deadline: Deadline) -> Result<Option<Task>> {
        match self {
            Self::Redis { store, prefix } => {
                store
                    .get_task(&Self::keys(prefix, &id.queue()), id, deadline)
                    .await
            }
            Self::Memory(m) => Ok(m.get(id)),
        }
    }

    /// A reader of `queue`'s events after position `after` (a resume
    /// token's), or from now on.
    pub async fn event_reader(
        &self,
        queue: &QueueName,
        after: Option<&str>,
        deadline: Deadline,
    ) -> Result<EventReader> {
        match self {
            Self::Redis { store, prefix } => {
                let keys = Self::keys(prefix, queue);
                Ok(EventReader::Redis(match after {
                    Some(position) => store.event_reader_after(&keys, position, deadline).await?,
                    None => store.event_reader(&keys, deadline).await?,
                }))
            }
            Self::Memory(m) => Ok(EventReader::Memory(m.event_reader(queue, after)?)),
        }
    }

    /// Records that worker pool `record` is alive, for `ttl`.
    pub async fn announce_worker(
        &self,
        record: &WorkerRecord,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        match self {
            Self::Redis { store, prefix } => {
                store.announce_worker(prefix, record, ttl, deadline).await
            }
            Self::Memory(m) => {
                m.announce_worker(record, ttl);
                Ok(())
            }
        }
    }

    /// The key of lease secrets: the one stored, or `fresh` stored now when
    /// there is none (`SET NX`, so that every process of a deployment ends
    /// up with the first one written). The embedded store's is `fresh`: no
    /// other process serves its tasks.
    pub async fn lease_key(&self, fresh: &str, deadline: Deadline) -> Result<String> {
        match self {
            Self::Redis { store, prefix } => store.lease_key(prefix, fresh, deadline).await,
            Self::Memory(_) => Ok(fresh.to_owned()),
        }
    }

    /// Removes a stopping worker pool's record.
    pub async fn retire_worker(&self, id: &str, deadline: Deadline) -> Result<()> {
        match self {
            Self::Redis { store, prefix } => store.retire_worker(prefix, id, deadline).await,
            Self::Memory(m) => {
                m.retire_worker(id);
                Ok(())
            }
        }
    }

    /// The worker pools alive now (their records have not expired).
    pub async fn list_workers(&self, deadline: Deadline) -> Result<Vec<WorkerRecord>> {
        match self {
            Self::Redis { store, prefix } => store.list_workers(prefix, deadline).await,
            Self::Memory(m) => Ok(m.list_workers()),
        }
    }

    /// What the store holds, for maintenance reports: Redis's memory
    /// figures, or the embedded store's counts.
    pub async fn usage(&self, deadline: Deadline) -> Result<serde_json::Value> {
        match self {
            Self::Redis { store, .. } => {
                let m = store.memory(deadline).await?;
                Ok(serde_json::to_value(m).unwrap_or_default())
            }
            Self::Memory(m) => Ok(m.usage()),
        }
    }

    /// Resolves when the store answers again after an outage (see
    /// [`RedisStore::recovered`]); never for the embedded store.
    pub async fn recovered(&self) {
        match self {
            Self::Redis { store, .. } => store.recovered().await,
            Self::Memory(_) => std::future::pending().await,
        }
    }

    /// The round trip to the store.
    pub async fn ping(&self, deadline: Deadline) -> Result<Duration> {
        match self {
            Self::Redis { store, .. } => store.probe(deadline).await,
            Self::Memory(_) => Ok(Duration::ZERO),
        }
    }
}

/// Follows one queue's events.
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
