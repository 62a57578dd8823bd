//! The task store's one trait: every transition a task goes through,
//! specified here once and implemented by both backends
//! ([`crate::store::redis::RedisTasks`]: a Lua script each;
//! [`crate::store::memory::tasks::MemoryTasks`]: a critical section each).
//! The backends' comments refer to these docs rather than repeat them.
//!
//! # Conventions of every transition
//! - **Atomic**: a transition applies whole or not at all (one script on
//!   the queue's keys, one Redis Cluster slot; one lock on the embedded
//!   store), and reads its own notion of now: Redis's `TIME`, or the system
//!   clock, shifted by the store's [`crate::store::clock::Clock`] offset.
//! - **Fencing**: a transition made on behalf of a lease (heartbeat,
//!   progress, release, finish) applies only while the task is RUNNING with
//!   that `token`; every lease increments the token. Fenced, it changes
//!   nothing and says so (`false`, `None`, [`Beat::Lost`]).
//! - **Events**: a transition appends one event per task it moves, with the
//!   task's state after (`queued`, `running`, ...), to its queue's event
//!   log, capped at `limits.events` (Redis: `MAXLEN ~`, approximately; the
//!   embedded store: exactly).
//! - **Ready order**: a QUEUED task is scored `band * BAND_WIDTH + ms`
//!   ([`super::BAND_WIDTH`]): higher priority first, then FIFO.
//! - **Ending** (`record_end` in `lib.lua`, `Tasks::end` in memory): a task
//!   that reaches SUCCEEDED, FAILED, TIMED_OUT or CANCELLED gets its
//!   `finished_ms`, its summary in the queue's history (trimmed **at** the
//!   cap `limits.history`, oldest first, with their summaries), and its
//!   result expires after its `result_ttl_ms`. FAILED and TIMED_OUT also
//!   become dead letters (capped at `limits.history`; one pushed out by the
//!   cap expires like a result) and keep their result for the longer of the
//!   result TTL and `limits.dead_ttl`. The end's [`Count`] is bumped.
//!   Its PENDING dependents are then released (see [`TaskBackend::finish`]).
//!   A debounce key it holds is let go (see [`TaskBackend::submit_debounced`]).
//! - **Expiry** (`expire_ms`, Celery's `expires`): a task with one is in
//!   its queue's expiring set (by expiry, in the queue's slot) while it
//!   waits (QUEUED, SCHEDULED, PENDING, or a retry's backoff): **submit**
//!   adds it, **lease** takes it out as it starts, **finish** (a retry),
//!   **release** and **recover** (a requeue) put it back, and every end of
//!   a waiting task takes it out, so the set holds only tasks that may
//!   still expire. A waiting task past its expiry ends CANCELLED (error
//!   `cancelled: expired`; "Ending"; counts `Cancelled`; event
//!   `cancelled`): **recover** ends those of the set (at most 100 a call),
//!   so they show up within a sweep even in a paused or idle queue;
//!   **lease** never hands one out, whatever the sweep's timing: an expired
//!   candidate no task waits on is ended on the way, one that others wait
//!   on is skipped and left to **recover** (which ends it; the embedded
//!   store releases its dependents as it ends, and on Redis the same
//!   sweep's repair does, so both stores agree at every step). The first
//!   100 expired candidates of a lease call do not count against the scan
//!   limit, like stale entries, so a pile of them cannot hide the live
//!   tasks behind it; more do, which bounds the call. A **finish** whose
//!   retry would start past the expiry ends CANCELLED (expired) instead.
//!   A RUNNING task is never stopped by expiry. **Retry** (RetryTask)
//!   drops the expiry (and, on Redis, the task's list of dependents, all
//!   released as it ended, as the embedded store forgets them).
//! - **Flow control** (see `docs/design/flow-control.md`): the lease
//!   decides, in the same atomic step that would hand a task out, whether a
//!   limit holds it back. After the pause and expiry checks, and only when
//!   `limits.flow`: the queue's rate limit (`r:queues/<queue>`), once per
//!   call (no token: the call ends `Held`). Then per candidate the worker
//!   serves: its name's rate limit (`r:tasks/<name>`, only when
//!   `limits.flow`); with a `rate_limit_key` K, K's back-off
//!   ([`TaskBackend::back_off`]) and K's rate limit (`r:keys/K`, else
//!   `r:keys/*`, each key its own bucket); with a `concurrency_key` C, C's
//!   cap (`c:keys/C`, else `c:keys/*`) against C's running set. A candidate
//!   held by any of them stays QUEUED (no attempt, no event) and the scan
//!   goes on; a scope found held is held for the rest of the call. A
//!   candidate that passes takes one token from each of its buckets (GCRA:
//!   interval `T = period / limit`, tolerance `(burst - 1) T`; allowed when
//!   `TAT - tolerance <= now`, then `TAT = max(TAT, now) + T`) and joins
//!   C's running set. A call that leases nothing but held a candidate
//!   returns [`Leased::Held`]: the earliest time a held rate limit or
//!   back-off frees, `None` when only caps held. Past a cap, C's policy:
//!   `wait` holds; `cancel_newest` ends the candidate CANCELLED (error
//!   `cancelled: concurrency cap of C reached`; "Ending" as never run;
//!   counts `Cancelled`; event `cancelled`; counted against the scan with
//!   the held ones) and the scan goes on — but a candidate other tasks
//!   wait on waits instead, as under `wait`; `cancel_oldest` asks C's
//!   longest-running task to cancel (as **cancel** does for a running task,
//!   once; reason `concurrency cap of C: superseded by <id>`) and holds.
//!   The running set loses a task at every end of its attempt: **finish**
//!   (any outcome), **release**, **recover** of a lapsed lease.
//! - **Fair order**: a task with a fair key C (its `concurrency_key`, else
//!   its `rate_limit_key`) enters `ready`
//!   scored `band * BAND_WIDTH + vt` instead of its submit time, where
//!   `vt = max(last[C] + 1, clock + 1)`, `last[C] = vt` (per queue and
//!   priority band: a high-priority task's turn must not move the normal
//!   band's clock), and the band's `clock` is the `vt` of the last keyed
//!   task of the band leased from it (set to now by the first keyed task to
//!   enter; it never moves back). A key new or behind starts one turn after
//!   the clock, level with the next turn of the keys waiting, so that keys
//!   of one task each move the clock on (at the clock itself they all took
//!   its turn and the clock never moved past them); each key's tasks
//!   take turns (start-time fair queuing), so within a priority the keys
//!   are served round robin, ties going to the older task.
//!   Every entry into `ready` draws a turn (submit, a due task, a requeue,
//!   a dependency met, RetryTask), except **release**, which puts the task
//!   back at the turn it had. Unkeyed tasks keep their submit time.
//!
//! [`Count`]: crate::domain::Count

use std::any::Any;
use std::time::Duration;

use super::handoff;
use super::{
    BatchEnd, Beat, CancelReply, DebounceReply, DependReply, EventReader, FinishItem, LeaseAsk,
    Leased, Recovered, RetryReply, TakeOver, TaskLimits, Trimmed, WorkerRecord,
};
use crate::domain::flow::{Limit, LimitState};
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::domain::times::QueueTimes;
use crate::domain::{Outcome, Pause, QueueStats};
use crate::store::{Deadline, Result};

/// A task store backend: the transitions and reads of the task engine.
///
/// `deadline` bounds the call on Redis; the embedded store never waits on
/// anything but its lock and ignores it.
#[async_trait::async_trait]
pub trait TaskBackend: Send + Sync + 'static {
    /// The backend itself, for the handle's accessors
    /// ([`super::TaskStore::redis_parts`], [`super::TaskStore::memory_tasks`]).
    fn as_any(&self) -> &dyn Any;

    /// Whether other koo processes can share these tasks (Redis).
    fn is_shared(&self) -> bool;

    /// **Submit.** Pre: no task `task.id`. Post: QUEUED in `ready` (`delay`
    /// zero) or SCHEDULED, due `delay` from now, with `created_ms` now.
    /// Event: its state. Counts: `Submitted`. An existing id is an error
    /// (Redis: `EXISTS`); on the embedded store, so is a store holding
    /// [`crate::store::memory::tasks::MAX_TASKS`] (`OutOfMemory`).
    async fn submit(
        &self,
        task: &Task,
        delay: Duration,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()>;

    /// [`Self::submit`] of a task due now, then [`Self::lease_or_hold`] of
    /// the queue's next task for `ask` (lease limits `lease_limits`), in one
    /// round trip where the store allows it (on Redis, the two scripts in
    /// one pipeline): a new task handed to an idle worker of this process
    /// without the worker's own lease call. Two steps, not one: the task is
    /// stored whatever the lease finds, and the lease follows the queue's
    /// order (it may give an older task, or find the queue held).
    /// Answers the submit's outcome and the lease's: `None` when the lease
    /// did not run or failed (logged; the worker then looks for itself). A
    /// task leased while the submit failed is the caller's to hand back.
    async fn submit_and_lease(
        &self,
        task: &Task,
        limits: TaskLimits,
        ask: &LeaseAsk<'_>,
        lease_limits: TaskLimits,
        deadline: Deadline,
    ) -> (Result<()>, Option<Leased>) {
        handoff::submit_then_lease(self, task, limits, ask, lease_limits, deadline).await
    }

    /// [`Self::submit_many`], then a lease for each of `asks` (its queue's
    /// next task, for that worker), in one round trip where the store
    /// allows it (one pipeline on a single Redis): a burst handed to the
    /// idle workers of this process in the call that stores it, one task
    /// each. As for [`Self::submit_and_lease`]: two steps, the leases by
    /// the queues' rules, one answer per ask (`None`: that lease failed,
    /// logged); the submits' answer is [`Self::submit_many`]'s.
    async fn submit_many_and_lease(
        &self,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        asks: &[(QueueName, LeaseAsk<'_>)],
        lease_limits: TaskLimits,
        deadline: Deadline,
    ) -> (Result<Vec<Result<()>>>, Vec<Option<Leased>>) {
        handoff::submit_many_then_lease_each(self, tasks, limits, asks, lease_limits, deadline)
            .await
    }

    /// [`Self::submit`] for a batch, in one round trip: the outcome per
    /// task. `Err` when the batch as a whole failed (then, as for any
    /// ambiguous write, some may have been stored).
    async fn submit_many(
        &self,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<Result<()>>>;

    /// **Lease.** First, due SCHEDULED tasks of `queue` become QUEUED
    /// (at most 100; an event each). Then, among the first
    /// `limits.lease_scan` QUEUED entries of `ready` (entries whose task is
    /// gone or moved on are dropped on the way and do not count), the best
    /// one whose name is in `names` (`*` serves all) becomes RUNNING:
    /// `attempts` + 1, `token` + 1, `worker`, `started_ms` now, lease until
    /// now + `lease`, hard deadline now + `hard_ms` (when set); progress is
    /// cleared; a debounce key it holds is let go. In `leases`, scored by
    /// the sooner of the two deadlines.
    /// Event: `running`. The task is returned without its attempt log (a
    /// worker does not need it; `get` reads it). `None` when nothing is
    /// served.
    async fn lease(
        &self,
        queue: &QueueName,
        worker: &str,
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<Task>> {
        self.lease_or_hold(queue, worker, lease, names, limits, deadline)
            .await
            .map(Leased::task)
    }

    /// [`Self::lease`], saying why nothing was leased: nothing waits
    /// ([`Leased::Empty`]), or limits hold what waits ([`Leased::Held`];
    /// see "Flow control").
    async fn lease_or_hold(
        &self,
        queue: &QueueName,
        worker: &str,
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Leased>;

    /// **Set a limit** (creates or replaces the one of its scope) and
    /// changes the limits' version. A bucket's state (its TAT) is kept.
    async fn set_limit(&self, limit: &Limit, deadline: Deadline) -> Result<()>;

    /// **Delete a limit** by its field ([`Limit::field`]): whether there
    /// was one. Changes the limits' version when there was.
    async fn delete_limit(&self, field: &str, deadline: Deadline) -> Result<bool>;

    /// Every limit (by field) with its live state, and the limits'
    /// version. Stored values that do not parse are skipped.
    async fn limits(&self, deadline: Deadline) -> Result<(u64, Vec<(Limit, LimitState)>)>;

    /// The limits' version: it changes at every set and delete, so that a
    /// process polling it knows when to read them again.
    async fn limits_version(&self, deadline: Deadline) -> Result<u64>;

    /// **Back off a key**: no task with rate-limit key `key` starts until
    /// `wait` from now (or a later back-off already set; a shorter one does
    /// not shorten it). Returns when it ends (ms since the epoch).
    async fn back_off(&self, key: &str, wait: Duration, deadline: Deadline) -> Result<i64>;

    /// **Heartbeat.** Fenced by `token`. Post: the lease runs until now +
    /// `lease` (its score: the sooner of that and the hard deadline). No
    /// event. [`Beat::CancelRequested`] with the cancel's reason when a
    /// cancel was asked for.
    async fn heartbeat(
        &self,
        id: &TaskId,
        token: u32,
        lease: Duration,
        deadline: Deadline,
    ) -> Result<Beat>;

    /// **Take over.** Fenced by `token` ([`TakeOver::Lost`]). Post: the
    /// lease is `worker`'s under the next token (so that its former holder
    /// is fenced out: its reports, heartbeats and hand-backs), running until
    /// now + `lease` as a heartbeat's; the attempt is the same one (its
    /// count, start and time limits unchanged). No event. For a worker that
    /// re-attaches a running task to a new stream.
    async fn take_over(
        &self,
        id: &TaskId,
        token: u32,
        worker: &str,
        lease: Duration,
        deadline: Deadline,
    ) -> Result<TakeOver>;

    /// **Cancel.** Missing (or expired): [`CancelReply::Missing`]. QUEUED,
    /// SCHEDULED or PENDING: ends CANCELLED now (error `cancelled:
    /// <reason>`; "Ending"; counts `Cancelled`; event `cancelled`).
    /// RUNNING: the reason is recorded for its worker (told at its next
    /// heartbeat; event `running`, once), and the task ends CANCELLED when
    /// the worker reports anything but success, or when the sweep finds its
    /// lease lapsed. Ended: [`CancelReply::Ended`] with its state.
    async fn cancel(
        &self,
        id: &TaskId,
        reason: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<CancelReply>;

    /// **Retry (RetryTask).** Pre: FAILED, TIMED_OUT or CANCELLED (else
    /// [`RetryReply::NotEnded`]; missing: [`RetryReply::Missing`], and a
    /// dead letter whose task expired is dropped). Post: QUEUED (scored
    /// now), out of history and the dead letters, no longer expiring, a
    /// fresh retry budget (`attempt_base` = `attempts`), cancel, error,
    /// result and progress cleared; its log stays. Event: `queued`. Counts:
    /// `Requeued`.
    async fn retry(
        &self,
        id: &TaskId,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<RetryReply>;

    /// **Submit pending.** As [`Self::submit`], but PENDING (in `pending`,
    /// by submit time) on the dependencies in `waiting`, each of which
    /// already lists it as a dependent ([`Self::depend_on`]). Event:
    /// `pending`. Counts: `Submitted`. With `waiting` empty, it is a plain
    /// submit (QUEUED). The embedded store releases it at once from
    /// dependencies that ended in between (Redis leaves that to the
    /// dependency sweep: [`Self::pending_tasks`]).
    async fn submit_pending(
        &self,
        task: &Task,
        waiting: &[TaskId],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()>;

    /// **Submit debounced.** `task` carries its `debounce_key`. When an
    /// unstarted (SCHEDULED or QUEUED) task of its queue holds the key: with
    /// the same name and category, that task takes `task`'s arguments,
    /// priority and options (keeping its id and `created_ms`) and becomes
    /// SCHEDULED, due `window` from now ([`DebounceReply::Replaced`]; event
    /// `scheduled`; no count); else nothing changes
    /// ([`DebounceReply::Conflict`]). Otherwise `task` is stored SCHEDULED,
    /// due `window` from now, and holds the key ([`DebounceReply::Created`];
    /// event `scheduled`; counts `Submitted`). The key is per queue (Redis:
    /// a hash in the queue's slot); a task lets go of it when it is leased
    /// or ends ("Ending"), so it holds only unstarted tasks.
    async fn submit_debounced(
        &self,
        task: &Task,
        window: Duration,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<DebounceReply>;

    /// **Depend.** Registers `dependent` as waiting on `id` unless `id` has
    /// ended ([`DependReply::Ended`]) or is missing. No event.
    async fn depend_on(
        &self,
        id: &TaskId,
        dependent: &TaskId,
        deadline: Deadline,
    ) -> Result<DependReply>;

    /// The tasks waiting on `id` (the embedded store releases them as `id`
    /// ends: always empty).
    async fn dependents(&self, id: &TaskId, deadline: Deadline) -> Result<Vec<String>>;

    /// Up to `count` PENDING tasks of `queue` with the dependencies each
    /// still waits on, for the sweep that repairs releases a dead process
    /// did not make (the embedded store: none need repair).
    async fn pending_tasks(
        &self,
        queue: &QueueName,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, Vec<String>)>>;

    /// **Resolve a dependency.** Pre: `id` PENDING (else its state, or
    /// `None` when missing). It stops waiting on `dependency`; if that
    /// ended other than SUCCEEDED, `id` ends CANCELLED (error `dependency
    /// <id> ended <STATE>`; "Ending"; counts `Cancelled`; event
    /// `cancelled`); else, with nothing left to wait on, it becomes QUEUED
    /// (event `queued`). Idempotent. The embedded store does this as the
    /// dependency ends: `None`.
    async fn resolve_dependency(
        &self,
        id: &TaskId,
        dependency: &str,
        state: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<State>>;

    /// Claims idempotency key `key` with `value` for `ttl`: `None` when
    /// claimed now, else the value of the claim that holds it.
    async fn claim_idempotency(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<Option<String>>;

    /// Replaces claim `old` of `key` with `new` (empty: deletes it) if it
    /// still holds `old`; whether it did.
    async fn swap_idempotency(
        &self,
        key: &str,
        old: &str,
        new: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<bool>;

    /// Which of `keys` are claimed idempotency keys (one round trip).
    async fn idempotency_claimed(&self, keys: &[String], deadline: Deadline) -> Result<Vec<bool>>;

    /// Up to `count` of `queue`'s dead-lettered ids, oldest first.
    async fn dead_letters(
        &self,
        queue: &QueueName,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<String>>;

    /// **Release.** Fenced by `token`; the worker stops before the task
    /// ended. Post: QUEUED again in its original place (scored by its
    /// `created_ms`), the attempt given back (`attempts` - 1), `log` (a
    /// JSON object, `ended_ms` added) appended to its log, worker and
    /// progress cleared. Event: `queued`. No count.
    async fn release(
        &self,
        id: &TaskId,
        token: u32,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool>;

    /// **Progress.** Fenced by `token`. Post: `progress` (JSON) stored.
    /// Event: `running` with the progress.
    async fn progress(
        &self,
        id: &TaskId,
        token: u32,
        progress: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool>;

    /// **Finish.** Fenced by `token` (`None`). `log` (a JSON object,
    /// `ended_ms` added; `retry_at_ms` for a retry) is appended to the
    /// task's log; the lease and worker are cleared. The outcome decides:
    /// - a retry whose budget is spent (attempts since `attempt_base`
    ///   beyond `max_retries`) is FAILED instead;
    /// - with a cancel asked for, anything but success is CANCELLED
    ///   (error `cancelled: <reason>`);
    /// - retry: SCHEDULED, due after its delay, its error kept; counts
    ///   `Retried`; event `scheduled`;
    /// - else the end state ("Ending"; a success clears earlier errors);
    ///   event with that state.
    ///
    /// Returns the state and whether tasks wait on it: on Redis, releasing
    /// them ([`Self::resolve_dependency`]) is the caller's part; the
    /// embedded store releases them here (always `false`).
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<(State, bool)>>;

    /// [`Self::finish`], then, when it was accepted, [`Self::lease`] of the
    /// next task of the same queue for `next`, atomically and in one round
    /// trip: the new state and the next task, or `None` when fenced. The
    /// lease comes before the finished task's dependents are released (on
    /// Redis the caller releases them after the call; the embedded store
    /// defers its release to match), so a dependent this finish frees is
    /// never leased by the same call.
    #[allow(clippy::too_many_arguments)]
    async fn finish_and_lease(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        next: &LeaseAsk<'_>,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<((State, bool), Leased)>>;

    /// Several [`Self::finish`]es of tasks of `queue`, each followed, when
    /// it was accepted and its item names a `next` worker, by a lease for
    /// that worker (`lease`, `names` and `limits` shared), as
    /// [`Self::finish_and_lease`] would make them one after the other; one
    /// answer per item, in order. Once a lease finds nothing (or limits
    /// hold the queue), the later items' leases answer the same without
    /// looking. On Redis the whole batch is one script call (a busy pool's
    /// one round trip for several tasks); an item that fails alone is that
    /// item's error. Dependents are the caller's to release, as after
    /// [`Self::finish`].
    async fn finish_batch(
        &self,
        queue: &QueueName,
        items: &[FinishItem<'_>],
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<BatchEnd>> {
        debug_assert!(items.iter().all(|i| i.id.queue() == *queue));
        let mut out = Vec::with_capacity(items.len());
        // once a lease finds nothing, the rest find the same
        let mut dry: Option<Leased> = None;
        for item in items {
            let end = match (item.next, &dry) {
                (Some(worker), None) => {
                    let ask = LeaseAsk {
                        worker,
                        lease,
                        names,
                    };
                    match self
                        .finish_and_lease(
                            item.id,
                            item.token,
                            item.outcome,
                            item.log,
                            &ask,
                            limits,
                            deadline,
                        )
                        .await
                    {
                        Ok(Some((ended, next))) => {
                            dry = next.dry();
                            BatchEnd {
                                ended: Ok(Some(ended)),
                                next: Some(next),
                            }
                        }
                        Ok(None) => BatchEnd {
                            ended: Ok(None),
                            next: None,
                        },
                        Err(e) => BatchEnd {
                            ended: Err(e),
                            next: None,
                        },
                    }
                }
                (next, dry) => {
                    let ended = self
                        .finish(
                            item.id,
                            item.token,
                            item.outcome,
                            item.log,
                            limits,
                            deadline,
                        )
                        .await;
                    let next = match (&ended, next, dry) {
                        (Ok(Some(_)), Some(_), Some(d)) => d.dry(),
                        _ => None,
                    };
                    BatchEnd { ended, next }
                }
            };
            out.push(end);
        }
        Ok(out)
    }

    /// **Recover (the sweep).** First, due SCHEDULED tasks become QUEUED (as
    /// in [`Self::lease`]). Then each lease of `queue` that lapsed (at most
    /// 100): its task, if still RUNNING, counts `Lost`, logs a `lost`
    /// attempt (`worker lost: lease lapsed`), and becomes: CANCELLED when a
    /// cancel was asked for; TIMED_OUT past its hard deadline; QUEUED again
    /// (scored now) when `acks_late` and its budget remains; else FAILED.
    /// An end is "Ending" with its error. Event: the state after. Waiting
    /// tasks past their expiry end (at most 100; see "Expiry"). Returns
    /// how many entries were handled (lapsed and due; expired ones are
    /// counted apart, in `expired`, so that a dependent another queue's
    /// release ended first on the embedded store does not tell the stores
    /// apart), and, on Redis, the expired tasks whose dependents the caller
    /// must release (the embedded store releases them after its batch). The
    /// embedded store also forgets expired results here.
    async fn recover(
        &self,
        queue: &QueueName,
        acks_late: bool,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Recovered>;

    /// **Trim.** Removes `queue`'s tasks that ended before `before_ms`
    /// (history entries, summaries, stored results and logs while still
    /// ended; at most 1000 per call), except dead letters that ended at or
    /// after `dead_before_ms` (they stay, in history and stored); removes
    /// dead letters that ended before `dead_before_ms`. Redis also trims
    /// the event stream to its cap here (the embedded log is capped as it
    /// is written: `events` is 0). No event.
    async fn trim(
        &self,
        queue: &QueueName,
        before_ms: i64,
        dead_before_ms: i64,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Trimmed>;

    /// Up to `count` active tasks of `queue` from position `offset` of set
    /// `set` (0 running, 1 queued, 2 scheduled, 3 pending), and where the
    /// next call should start (`None`: the queue is done).
    async fn list_active(
        &self,
        queue: &QueueName,
        set: usize,
        offset: u64,
        count: usize,
        deadline: Deadline,
    ) -> Result<(Vec<Task>, Option<(usize, u64)>)>;

    /// Up to `count` history entries of `queue` ending at or before `max_ms`
    /// (newest first, ties by id descending, skipping ids at `max_ms` that
    /// are not below `below_id`) and at or after `min_ms`: `(id, end ms,
    /// summary JSON)`.
    #[allow(clippy::too_many_arguments)]
    async fn history_page(
        &self,
        queue: &QueueName,
        max_ms: i64,
        below_id: Option<&str>,
        min_ms: i64,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, i64, String)>>;

    /// `queue`'s depths, oldest wait (by the store's now), outcome
    /// counters and pause.
    async fn queue_stats(&self, queue: &QueueName, deadline: Deadline) -> Result<QueueStats>;

    /// **Pause / resume.** `Some(pause)`: `queue` is paused from now on
    /// (already paused: unchanged, the first pause's who, why and when
    /// stay); `None`: resumed. Returns the pause in force after the call.
    /// While paused, **lease** (and the lease of **finish and lease**)
    /// hands out nothing from the queue; every other transition goes on
    /// (submits queue, running tasks finish, due tasks become QUEUED).
    async fn set_pause(
        &self,
        queue: &QueueName,
        pause: Option<&Pause>,
        deadline: Deadline,
    ) -> Result<Option<Pause>>;

    /// **Times.** The run and wait times of `queue`'s attempts over the
    /// window, per task name (see [`crate::domain::times`]). They are
    /// recorded by the transitions that end an attempt: **finish** (its run;
    /// and, on a first attempt, the task's wait from submit to start) and
    /// **recover** of a lapsed lease (the first attempt's wait only); on
    /// Redis they are written by [`Self::flush_times`], so another
    /// process's show up to a flush interval later.
    async fn task_times(&self, queue: &QueueName, deadline: Deadline) -> Result<QueueTimes>;

    /// Applies the times this process recorded but has not written yet.
    /// The Redis store adds them up in the process (two writes per task on
    /// the task path cost ~7% of throughput) until this is called: the
    /// engine calls it about once a second and at shutdown, and
    /// [`Self::task_times`] first, so that a process reads its own.
    /// Nothing to do on the embedded store, which records them directly.
    async fn flush_times(&self, _deadline: Deadline) -> Result<()> {
        Ok(())
    }

    /// Reads a task and its attempt log; `None` once it has expired.
    async fn get(&self, id: &TaskId, deadline: Deadline) -> Result<Option<Task>>;

    /// A reader of `queue`'s events after position `after` (a resume
    /// token's), or from now on. `Expired` when events after `after` were
    /// trimmed; `InvalidCursor` when `after` is not a position of this store.
    async fn event_reader(
        &self,
        queue: &QueueName,
        after: Option<&str>,
        deadline: Deadline,
    ) -> Result<EventReader>;

    /// Records that worker pool `record` is alive, for `ttl`.
    async fn announce_worker(
        &self,
        record: &WorkerRecord,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()>;

    /// The key of lease secrets: the one stored, or `fresh` stored now when
    /// there is none (`SET NX`, so that every process of a deployment ends
    /// up with the first one written). The embedded store keeps the first
    /// one with its tasks (saved with them).
    async fn lease_key(&self, fresh: &str, deadline: Deadline) -> Result<String>;

    /// Removes a stopping worker pool's record.
    async fn retire_worker(&self, id: &str, deadline: Deadline) -> Result<()>;

    /// The worker pools alive now (their records have not expired).
    async fn list_workers(&self, deadline: Deadline) -> Result<Vec<WorkerRecord>>;

    /// What the store holds, for maintenance reports: Redis's memory
    /// figures, or the embedded store's counts.
    async fn usage(&self, deadline: Deadline) -> Result<serde_json::Value>;

    /// Resolves when the store answers again after an outage (see
    /// [`crate::store::RedisStore::recovered`]); never for the embedded
    /// store.
    async fn recovered(&self);

    /// The round trip to the store.
    async fn ping(&self, deadline: Deadline) -> Result<Duration>;
}
