//! Task transitions on the embedded store: [`MemoryTasks`] implements
//! [`TaskBackend`] (where each transition is specified) with one critical
//! section per transition under one lock, so a single `koo serve` runs
//! tasks with no other process. A restart loses every task unless
//! `KOO_DATA_DIR` is set: then [`crate::persist`] saves and loads them (the
//! image: `snapshot`).
//!
//! The state and the steps transitions share are in `state.rs`, the
//! transitions in `transitions.rs`, reads and the registry (claims, worker
//! records) in `reads.rs`, event readers in `events.rs`, flow control
//! (limits, buckets, back-offs, caps, fair order) in `flow.rs`. Here each trait
//! method takes the lock, reads the store's clock, runs one of those, and
//! wakes event readers.
//!
//! The lock is a std mutex: it is never held across an `.await`, and every
//! critical section touches a handful of map entries (at most ~100 lapsed
//! leases or due tasks per recovery call, as on Redis).

mod debounce;
mod events;
mod expiry;
mod flow;
#[cfg(test)]
mod flow_tests;
mod journal;
mod reads;
mod snapshot;
mod state;
mod times;
mod transitions;

pub use events::MemoryEventReader;
pub use flow::{FairImage, FlowImage};
pub use snapshot::{EventImage, QueueImage, TaskImage, TasksImage};

use crate::domain::flow::{Limit, LimitState};
use crate::store::tasks::Leased;
use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tracing::instrument;

use self::state::Tasks;
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::domain::times::QueueTimes;
use crate::domain::{Outcome, Pause, QueueStats};
use crate::store::clock::Clock;
use crate::store::memory::journal::{Journal, JournalSlot, Record};
use crate::store::tasks::{
    Beat, CancelReply, DebounceReply, DependReply, EventReader, LeaseAsk, Recovered, RetryReply,
    TakeOver, TaskBackend, TaskLimits, Trimmed, WorkerRecord,
};
use crate::store::{Deadline, Result};

/// Tasks the embedded store holds at most (queued, running and finished
/// whose results have not expired): a submit beyond is RESOURCE_EXHAUSTED
/// rather than a process that grows until the kernel kills it.
pub const MAX_TASKS: usize = 1_000_000;

struct Shared {
    tasks: Mutex<Tasks>,
    /// The newest event's sequence number: readers wait on it.
    events: watch::Sender<u64>,
    /// With `KOO_DATA_DIR`: where acknowledged changes are appended.
    journal: JournalSlot,
}

/// The embedded task store: a cheap-to-clone handle.
#[derive(Clone)]
pub struct MemoryTasks {
    shared: Arc<Shared>,
    /// Now, for every expiry and deadline (tests move it).
    clock: Clock,
}

impl Default for MemoryTasks {
    fn default() -> Self {
        Self::with_clock(Clock::system())
    }
}

impl MemoryTasks {
    /// An empty store on `clock`.
    pub fn with_clock(clock: Clock) -> Self {
        Self {
            shared: Arc::new(Shared {
                tasks: Mutex::new(Tasks::default()),
                events: watch::Sender::new(0),
                journal: JournalSlot::default(),
            }),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tasks> {
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Runs `f` on the state under the lock, given now, then wakes event
    /// readers if it appended events.
    fn write<T>(&self, f: impl FnOnce(&mut Tasks, i64) -> T) -> T {
        let mut guard = self.lock();
        // A transition that panicked inside `deferring_releases` (the lock
        // survives a panic) left its releases undone: they must not stay
        // deferred, or no dependent would be released again.
        let now = self.now_ms();
        guard.release_deferred(now);
        let out = f(&mut guard, now);
        let last = guard.last_event;
        drop(guard);
        self.announce(last);
        out
    }

    /// [`Self::write`], appending under the same lock the record `log`
    /// makes of `f`'s outcome (none: nothing to keep), then waiting until the
    /// journal keeps it. Without a journal, `log` is not called.
    async fn write_kept<T>(
        &self,
        f: impl FnOnce(&mut Tasks, i64) -> T,
        log: impl FnOnce(&T, i64) -> Option<Record>,
    ) -> Result<T> {
        let (out, seq) = self.write(|s, now| {
            let out = f(s, now);
            let seq = self.shared.journal.append(|| log(&out, now));
            (out, seq)
        });
        self.shared.journal.kept(seq).await?;
        Ok(out)
    }

    /// Sets where acknowledged changes are appended (`crate::persist`).
    pub fn set_journal(&self, journal: std::sync::Arc<dyn Journal>) {
        self.shared.journal.set(journal);
    }

    /// Runs `f` on the state under the lock, given now.
    fn read<T>(&self, f: impl FnOnce(&Tasks, i64) -> T) -> T {
        let guard = self.lock();
        f(&guard, self.now_ms())
    }

    /// Tells event readers that events were appended up to `last`.
    fn announce(&self, last: u64) {
        self.shared.events.send_if_modified(|seen| {
            let changed = *seen != last;
            *seen = last;
            changed
        });
    }
}

#[async_trait::async_trait]
impl TaskBackend for MemoryTasks {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn is_shared(&self) -> bool {
        false
    }

    #[instrument(skip_all, level = "debug", fields(task = %task.id))]
    async fn submit(
        &self,
        task: &Task,
        delay: Duration,
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<()> {
        self.write_kept(
            |s, now| s.submit(task, delay, limits, now),
            |r, now| r.is_ok().then(|| journal::submitted(task, delay, now)),
        )
        .await?
    }

    #[instrument(skip_all, level = "debug", fields(task = %task.id))]
    async fn submit_debounced(
        &self,
        task: &Task,
        window: Duration,
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<DebounceReply> {
        self.write_kept(
            |s, now| s.submit_debounced(task, window, limits, now),
            |r, now| journal::debounced(task, window, r, now),
        )
        .await?
    }

    #[instrument(skip_all, level = "debug")]
    async fn submit_many(
        &self,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<Vec<Result<()>>> {
        let (mut first, mut last) = (None, None);
        let out = tasks
            .iter()
            .map(|(task, delay)| {
                let (out, seq) = self.write(|s, now| {
                    let out = s.submit(task, *delay, limits, now);
                    let seq = self
                        .shared
                        .journal
                        .append(|| out.is_ok().then(|| journal::submitted(task, *delay, now)));
                    (out, seq)
                });
                first = first.or(seq);
                last = seq.or(last);
                out
            })
            .collect();
        self.shared.journal.kept_all(first, last).await?;
        Ok(out)
    }

    #[instrument(skip_all, level = "debug", fields(%queue, worker))]
    async fn lease_or_hold(
        &self,
        queue: &QueueName,
        worker: &str,
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<Leased> {
        Ok(self.write(|s, now| s.lease(queue, worker, lease, names, limits, now)))
    }

    #[instrument(skip_all, level = "debug", fields(limit = %limit.field()))]
    async fn set_limit(&self, limit: &Limit, _: Deadline) -> Result<()> {
        self.write_kept(
            |s, _| s.flow.set(limit),
            |_, _| {
                Some(Record::SetLimit {
                    field: limit.field(),
                    value: limit.encode(),
                })
            },
        )
        .await
    }

    #[instrument(skip_all, level = "debug", fields(limit = %field))]
    async fn delete_limit(&self, field: &str, _: Deadline) -> Result<bool> {
        self.write_kept(
            |s, _| s.flow.delete(field),
            |deleted, _| {
                deleted.then(|| Record::DeleteLimit {
                    field: field.to_owned(),
                })
            },
        )
        .await
    }

    #[instrument(skip_all, level = "debug")]
    async fn limits(&self, _: Deadline) -> Result<(u64, Vec<(Limit, LimitState)>)> {
        Ok(self.read(|s, now| (s.flow.version, s.flow.states(now))))
    }

    #[instrument(skip_all, level = "debug")]
    async fn limits_version(&self, _: Deadline) -> Result<u64> {
        Ok(self.read(|s, _| s.flow.version))
    }

    #[instrument(skip_all, level = "debug", fields(key))]
    async fn back_off(&self, key: &str, wait: Duration, _: Deadline) -> Result<i64> {
        let wait_ms = state::millis(wait).max(1);
        Ok(self.write(|s, now| s.flow.back_off(key, now.saturating_add(wait_ms))))
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn heartbeat(
        &self,
        id: &TaskId,
        token: u32,
        lease: Duration,
        _: Deadline,
    ) -> Result<Beat> {
        Ok(self.write(|s, now| s.heartbeat(id, token, lease, now)))
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn take_over(
        &self,
        id: &TaskId,
        token: u32,
        worker: &str,
        lease: Duration,
        _: Deadline,
    ) -> Result<TakeOver> {
        Ok(self.write(|s, now| s.take_over(id, token, worker, lease, now)))
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn cancel(
        &self,
        id: &TaskId,
        reason: &str,
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<CancelReply> {
        self.write_kept(
            |s, now| s.cancel(id, reason, limits, now),
            |r, now| {
                matches!(r, CancelReply::Cancelled | CancelReply::Requested).then(|| {
                    Record::Cancel {
                        now,
                        id: id.to_string(),
                        reason: reason.to_owned(),
                    }
                })
            },
        )
        .await
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn retry(&self, id: &TaskId, limits: TaskLimits, _: Deadline) -> Result<RetryReply> {
        self.write_kept(
            |s, now| s.retry(id, limits, now),
            |r, now| {
                matches!(r, RetryReply::Queued).then(|| Record::Retry {
                    now,
                    id: id.to_string(),
                })
            },
        )
        .await
    }

    #[instrument(skip_all, level = "debug", fields(task = %task.id))]
    async fn submit_pending(
        &self,
        task: &Task,
        waiting: &[TaskId],
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<()> {
        self.write_kept(
            |s, now| s.submit_pending(task, waiting, limits, now),
            |r, now| r.is_ok().then(|| journal::pending(task, waiting, now)),
        )
        .await?
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn depend_on(&self, id: &TaskId, dependent: &TaskId, _: Deadline) -> Result<DependReply> {
        self.write_kept(
            |s, now| s.depend_on(id, dependent, now),
            |r, now| {
                matches!(r, DependReply::Waiting).then(|| Record::DependOn {
                    now,
                    id: id.to_string(),
                    dependent: dependent.to_string(),
                })
            },
        )
        .await
    }

    /// Released as `id` ends: none wait.
    #[instrument(skip_all, level = "debug")]
    async fn dependents(&self, _: &TaskId, _: Deadline) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Releases happen as dependencies end, under the lock: none to repair.
    #[instrument(skip_all, level = "debug")]
    async fn pending_tasks(
        &self,
        _: &QueueName,
        _: usize,
        _: Deadline,
    ) -> Result<Vec<(String, Vec<String>)>> {
        Ok(Vec::new())
    }

    /// Done as the dependency ends (`Tasks::release_dependents`).
    #[instrument(skip_all, level = "debug")]
    async fn resolve_dependency(
        &self,
        _: &TaskId,
        _: &str,
        _: &str,
        _: TaskLimits,
        _: Deadline,
    ) -> Result<Option<State>> {
        Ok(None)
    }

    #[instrument(skip_all, level = "debug")]
    async fn claim_idempotency(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        _: Deadline,
    ) -> Result<Option<String>> {
        self.write_kept(
            |s, now| s.claim_idempotency(key, value, ttl, now),
            |held, now| {
                held.is_none().then(|| Record::Claim {
                    now,
                    key: key.to_owned(),
                    value: value.to_owned(),
                    ttl_ms: journal::ms(ttl),
                })
            },
        )
        .await
    }

    #[instrument(skip_all, level = "debug")]
    async fn swap_idempotency(
        &self,
        key: &str,
        old: &str,
        new: &str,
        ttl: Duration,
        _: Deadline,
    ) -> Result<bool> {
        self.write_kept(
            |s, now| s.swap_idempotency(key, old, new, ttl, now),
            |swapped, now| {
                swapped.then(|| Record::Swap {
                    now,
                    key: key.to_owned(),
                    old: old.to_owned(),
                    new: new.to_owned(),
                    ttl_ms: journal::ms(ttl),
                })
            },
        )
        .await
    }

    #[instrument(skip_all, level = "debug")]
    async fn idempotency_claimed(&self, keys: &[String], _: Deadline) -> Result<Vec<bool>> {
        Ok(self.read(|s, now| s.idempotency_claimed(keys, now)))
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn dead_letters(
        &self,
        queue: &QueueName,
        count: usize,
        _: Deadline,
    ) -> Result<Vec<String>> {
        Ok(self.read(|s, _| s.dead_letters(queue, count)))
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn release(
        &self,
        id: &TaskId,
        token: u32,
        log: &str,
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<bool> {
        self.write(|s, now| s.release(id, token, log, limits, now))
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn progress(
        &self,
        id: &TaskId,
        token: u32,
        progress: &str,
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<bool> {
        Ok(self.write(|s, now| s.progress(id, token, progress, limits, now)))
    }

    /// Dependents are released here: never `true`.
    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn finish(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<Option<(State, bool)>> {
        let state = self.write(|s, now| s.finish(id, token, outcome, log, limits, now))?;
        Ok(state.map(|s| (s, false)))
    }

    /// One critical section, as one script on Redis.
    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn finish_and_lease(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        next: &LeaseAsk<'_>,
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<Option<((State, bool), Leased)>> {
        self.write(|s, now| {
            s.deferring_releases(limits, now, |s| {
                let Some(state) = s.finish(id, token, outcome, log, limits, now)? else {
                    return Ok(None);
                };
                let queue = id.queue();
                let task = s.lease(&queue, next.worker, next.lease, next.names, limits, now);
                Ok(Some(((state, false), task)))
            })
        })
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn recover(
        &self,
        queue: &QueueName,
        acks_late: bool,
        limits: TaskLimits,
        _: Deadline,
    ) -> Result<Recovered> {
        Ok(self.write(|s, now| s.recover(queue, acks_late, limits, now)))
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn trim(
        &self,
        queue: &QueueName,
        before_ms: i64,
        dead_before_ms: i64,
        _: TaskLimits,
        _: Deadline,
    ) -> Result<Trimmed> {
        Ok(self.write(|s, now| s.trim(queue, before_ms, dead_before_ms, now)))
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn list_active(
        &self,
        queue: &QueueName,
        set: usize,
        offset: u64,
        count: usize,
        _: Deadline,
    ) -> Result<(Vec<Task>, Option<(usize, u64)>)> {
        Ok(self.read(|s, _| s.list_active(queue, set, offset, count)))
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn history_page(
        &self,
        queue: &QueueName,
        max_ms: i64,
        below_id: Option<&str>,
        min_ms: i64,
        count: usize,
        _: Deadline,
    ) -> Result<Vec<(String, i64, String)>> {
        Ok(self.read(|s, _| s.history_page(queue, max_ms, below_id, min_ms, count)))
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn queue_stats(&self, queue: &QueueName, _: Deadline) -> Result<QueueStats> {
        Ok(self.read(|s, now| s.queue_stats(queue, now)))
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn set_pause(
        &self,
        queue: &QueueName,
        pause: Option<&Pause>,
        _: Deadline,
    ) -> Result<Option<Pause>> {
        self.write_kept(
            |s, _| s.set_pause(queue, pause),
            |now_paused, _| Some(journal::paused(queue, now_paused.as_ref())),
        )
        .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn task_times(&self, queue: &QueueName, _: Deadline) -> Result<QueueTimes> {
        Ok(self.read(|s, now| s.queue_times(queue, now)))
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn get(&self, id: &TaskId, _: Deadline) -> Result<Option<Task>> {
        Ok(self.read(|s, now| s.get(id, now)))
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn event_reader(
        &self,
        queue: &QueueName,
        after: Option<&str>,
        _: Deadline,
    ) -> Result<EventReader> {
        Ok(EventReader::Memory(self.open_reader(queue, after)?))
    }

    #[instrument(skip_all, level = "debug")]
    async fn announce_worker(
        &self,
        record: &WorkerRecord,
        ttl: Duration,
        _: Deadline,
    ) -> Result<()> {
        self.write(|s, now| s.announce_worker(record, ttl, now));
        Ok(())
    }

    /// The key created first (`fresh` when none was): kept with the
    /// tasks, so that a restart from the data directory keeps running
    /// tasks' secrets.
    #[instrument(skip_all, level = "debug")]
    async fn lease_key(&self, fresh: &str, _: Deadline) -> Result<String> {
        Ok(self.write(|s, _| s.lease_key.get_or_insert_with(|| fresh.to_owned()).clone()))
    }

    #[instrument(skip_all, level = "debug")]
    async fn retire_worker(&self, id: &str, _: Deadline) -> Result<()> {
        self.write(|s, _| s.retire_worker(id));
        Ok(())
    }

    #[instrument(skip_all, level = "debug")]
    async fn list_workers(&self, _: Deadline) -> Result<Vec<WorkerRecord>> {
        Ok(self.read(|s, now| s.list_workers(now)))
    }

    #[instrument(skip_all, level = "debug")]
    async fn usage(&self, _: Deadline) -> Result<serde_json::Value> {
        Ok(self.read(|s, _| s.usage()))
    }

    async fn recovered(&self) {
        std::future::pending().await
    }

    #[instrument(skip_all, level = "debug")]
    async fn ping(&self, _: Deadline) -> Result<Duration> {
        Ok(Duration::ZERO)
    }
}
