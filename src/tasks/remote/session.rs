//! A stream worker's session (`WorkerService.Work`).
//!
//! A stream worker is a [`Session`]: koo leases tasks on its behalf (never
//! more than the concurrency it declared), pushes them, and keeps for each
//! held task the timers a built-in slot would run — the soft limit (a
//! notice), the hard limit (koo ends the task TIMED_OUT and revokes it) and
//! the cancel grace (koo ends a cancelled task the worker did not stop).
//! The worker's heartbeats extend every lease it holds; without one for a
//! whole lease, its leases lapse and the recovery sweep takes the tasks
//! back, as for a built-in worker that hangs.
//!
//! When the stream ends, every task it held goes back at once rather than
//! a lease later. A stream is *closing* from the moment its inbound half
//! ends or breaks or its outbound half is gone; the session looks (without
//! waiting) before every lease, and takes nothing more once it is: when
//! many streams close at once, the tasks the first ones hand back must not
//! be pushed to the others. A task goes back in one of two ways:
//!
//! - *never started*, its attempt given back (logged `handed_back`): the
//!   worker said nothing about it — no progress, complete or fail naming
//!   it and no heartbeat since it was pushed — and the stream closed less
//!   than one heartbeat interval (a third of the lease) after the push.
//!   koo cannot see whether a worker began a task, so silence within the
//!   first interval is taken as "never started" (a stream closing while
//!   koo pushed is the usual case). So that a task that kills every worker
//!   before it can speak still reaches its dead letter, the attempt is
//!   given back only while the task has been given back fewer than
//!   [`MAX_GIVEN_BACK`] times (its lease token, which grows with every
//!   lease, minus its attempts);
//! - *lost*, the attempt counted, as a lapsed lease would be: every other
//!   task, and every task of a stream that ended on a message koo could
//!   not read or that broke the protocol (the worker was talking).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::holds::{Taken, Tally};
use super::{
    CALL, Failure, MAX_CONCURRENCY, Progress, Proof, Routing, check_name, finish_leased,
    progress_task,
};
use crate::cache::Cache;
use crate::domain::task::{State, Task, TaskId};
use crate::store::Deadline;
use crate::store::tasks::WorkerRecord;
use crate::tasks::engine::{Finish, TaskEngine, TaskError};
use crate::tasks::poller::Poller;
use crate::tasks::worker::cache_result;

/// Most attempts of one task given back (by hand-backs of any kind)
/// before a never-started task of a vanished stream counts as lost.
pub const MAX_GIVEN_BACK: u32 = 4;
/// Hand-backs of one ended session in flight at once.
const HAND_BACKS: usize = 16;

/// How often a stream worker must send a heartbeat (told in the welcome):
/// a third of the lease, so that one lost heartbeat does not lapse it.
pub fn heartbeat_interval(lease: Duration) -> Duration {
    lease / 3
}

/// What a stream worker sends (after its hello).
#[derive(Debug, Clone)]
pub enum Inbound {
    /// Extends every lease the stream holds.
    Heartbeat,
    /// Progress of a held task.
    Progress {
        /// The task.
        id: String,
        /// Its lease token.
        token: u32,
        /// Its lease secret (empty: none; needed only for a task the
        /// stream does not hold).
        secret: String,
        /// The report.
        progress: Progress,
    },
    /// A held task succeeded with this result (JSON).
    Complete {
        /// The task.
        id: String,
        /// Its lease token.
        token: u32,
        /// Its lease secret (as for progress).
        secret: String,
        /// The result.
        result: serde_json::Value,
    },
    /// A held task failed.
    Fail {
        /// The task.
        id: String,
        /// Its lease token.
        token: u32,
        /// Its lease secret (as for progress).
        secret: String,
        /// The failure.
        failure: Failure,
    },
    /// The worker sent something that is not a valid message (a second
    /// hello, an empty message): the stream ends with this error.
    Invalid(TaskError),
}

/// Which message a [`Outbound::Reply`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A progress report (replied to only when refused).
    Progress,
    /// A completion.
    Complete,
    /// A failure.
    Fail,
}

/// What koo sends a stream worker.
#[derive(Debug)]
pub enum Outbound {
    /// A task to run, with its lease token in `task.token`.
    Task {
        /// The task.
        task: Box<Task>,
        /// Its lease secret (empty when the key could not be read: the
        /// stream's own reports need none).
        secret: String,
    },
    /// Stop this task (it was cancelled) and report a failure.
    Cancel {
        /// The task.
        id: TaskId,
        /// Why.
        reason: String,
    },
    /// This task passed its soft time limit.
    SoftLimit(TaskId),
    /// This task is no longer the worker's: stop it, report nothing.
    Revoked {
        /// The task.
        id: TaskId,
        /// Why.
        reason: String,
    },
    /// The outcome of a report: the state the task moved to (for completes
    /// and fails), or why it was refused.
    Reply {
        /// The task.
        id: String,
        /// The message answered.
        kind: ReplyKind,
        /// The outcome.
        outcome: Result<Option<State>, TaskError>,
    },
}

/// A connected stream worker.
pub struct Session {
    engine: TaskEngine,
    cache: Option<Cache>,
    routing: Routing,
    concurrency: usize,
    record: WorkerRecord,
    /// Room taken on the worker identity's tally: one per held task, and
    /// one more while a lease is being tried.
    taken: Taken,
}

/// A task the session holds, with its timers.
struct Held {
    task: Task,
    soft_at: Option<Instant>,
    hard_at: Option<Instant>,
    /// Set once a cancel was passed on: when koo ends it if still held.
    cancel_at: Option<Instant>,
    /// When it was pushed to the worker.
    pushed_at: Instant,
    /// Whether the worker said anything since the push: a report naming
    /// it, or a heartbeat.
    spoken: bool,
}

impl Held {
    /// Whether the task never started on a worker whose stream was seen
    /// closing at `vanished` (the rule of the module doc): nothing said
    /// about it, pushed less than `window` before, and given back fewer
    /// than [`MAX_GIVEN_BACK`] times.
    fn unstarted(&self, vanished: Instant, window: Duration) -> bool {
        !self.spoken
            && vanished.saturating_duration_since(self.pushed_at) < window
            && self.task.token.saturating_sub(self.task.attempts) < MAX_GIVEN_BACK
    }

    fn next_timer(&self) -> Option<Instant> {
        [self.soft_at, self.hard_at, self.cancel_at]
            .into_iter()
            .flatten()
            .min()
    }
}

/// Why a session's loop ended.
enum Ending {
    /// The worker hung up or its connection dropped: its leases end now.
    Gone,
    /// koo is stopping: tasks go back to their queues, attempts given back.
    Shutdown,
}

impl Session {
    /// A session for a worker that said hello: `name` (validated), what it
    /// serves and how many tasks it may hold; `peer` is its address, and
    /// `tally` what its identity holds (which bounds it too).
    pub fn new(
        engine: TaskEngine,
        cache: Option<Cache>,
        name: &str,
        routing: Routing,
        concurrency: u32,
        peer: String,
        tally: Arc<Tally>,
    ) -> Result<Self, TaskError> {
        check_name("hello.name", name)?;
        if concurrency == 0 || concurrency > MAX_CONCURRENCY {
            return Err(TaskError::invalid(
                "hello.concurrency",
                format!("must be 1 to {MAX_CONCURRENCY}, got {concurrency}"),
            ));
        }
        let now = crate::store::unix_millis(SystemTime::now());
        let id = format!(
            "{name}/{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let record = WorkerRecord {
            id,
            slots: concurrency,
            running: 0,
            queues: routing.queues.iter().map(|q| q.to_string()).collect(),
            names: routing.names(),
            started_ms: now,
            seen_ms: now,
            kind: "stream".to_owned(),
            name: name.to_owned(),
            held: Vec::new(),
            peer,
        };
        Ok(Self {
            engine,
            cache,
            routing,
            concurrency: concurrency as usize,
            record,
            taken: Taken::none(tally),
        })
    }

    /// The worker id (its name and a unique suffix).
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Runs the session until the worker hangs up or `stop` fires, reading
    /// `inbound` and writing to `out`. Every task held at the end goes back
    /// at once: its attempt given back when koo is stopping or when it
    /// never started (see the module doc), counted otherwise.
    pub async fn run(
        mut self,
        inbound: impl Stream<Item = Inbound> + Unpin,
        out: mpsc::Sender<Outbound>,
        stop: CancellationToken,
    ) -> Result<(), TaskError> {
        let mut held: HashMap<TaskId, Held> = HashMap::new();
        let ending = self.serve(inbound, &out, &stop, &mut held).await;
        let vanished = Instant::now();
        // The record goes first: a gone worker is not busy, and the tasks
        // it hands back may be running elsewhere a moment later, where
        // they are counted.
        if let Err(e) = self
            .engine
            .store()
            .retire_worker(&self.record.id, Deadline::after(CALL))
            .await
        {
            tracing::debug!(error = %e, "cannot remove a worker's presence record; it expires");
        }
        let window = heartbeat_interval(self.engine.config().lease);
        let (engine, worker) = (&self.engine, self.record.id.as_str());
        let ending_ref = &ending;
        futures::stream::iter(held)
            .for_each_concurrent(HAND_BACKS, |(id, h)| async move {
                let deadline = Deadline::after(CALL);
                let (ended, how) = match ending_ref {
                    Ok(Ending::Shutdown) => (
                        engine.release(&h.task, worker, deadline).await,
                        "koo is stopping: the task goes back to its queue, its attempt given back",
                    ),
                    Ok(Ending::Gone) if h.unstarted(vanished, window) => (
                        engine.release_unstarted(&h.task, worker, deadline).await,
                        "worker gone before it said anything about the task: it goes back to its queue, its attempt given back",
                    ),
                    Ok(Ending::Gone) | Err(_) => (
                        engine.abandon(&id, h.task.token, deadline).await,
                        "worker gone: its task goes back to its queue, the attempt counted",
                    ),
                };
                match ended {
                    Ok(()) => tracing::info!(task = %id, worker, "{how}"),
                    Err(TaskError::Fenced(_)) => {}
                    Err(e) => {
                        tracing::warn!(task = %id, error = %e, "cannot end a gone worker's lease; it lapses")
                    }
                }
            })
            .await;
        ending.map(|_| ())
    }

    async fn serve(
        &mut self,
        inbound: impl Stream<Item = Inbound> + Unpin,
        out: &mpsc::Sender<Outbound>,
        stop: &CancellationToken,
        held: &mut HashMap<TaskId, Held>,
    ) -> Result<Ending, TaskError> {
        let mut inbound = inbound.peekable();
        let config = self.engine.config().clone();
        let filter = self.routing.names.clone();
        let names: Vec<&str> = filter.iter().map(String::as_str).collect();
        let mut cancels = self.engine.cancels();
        // The rotation and the resting (empty) queues, woken by this
        // process's submits.
        let mut poller = Poller::new(
            self.routing.queues.clone(),
            config.poll_interval,
            0,
            self.engine.submits(),
        );
        let mut last_beat = Instant::now();
        let mut announced = Instant::now();
        let mut dirty = true;
        let announce_every = (config.lease / 3).min(Duration::from_secs(1));
        let mut announce = tokio::time::interval(announce_every);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // After a store failure, no lease is tried until then.
        let mut backoff_until: Option<Instant> = None;
        let mut freed = self.taken.tally().freed();
        loop {
            // Room of tasks that left since the last turn goes back to the
            // identity (its other streams may be waiting for it).
            self.taken.keep(held.len() as u32);
            // Whether the identity holds its bound (this stream waits for
            // room freed on its tally).
            let mut full = false;
            // Take work while there is room, the worker is alive (a worker
            // that missed its heartbeats gets nothing more) and koo is not
            // stopping.
            let alive = last_beat.elapsed() < config.lease;
            while held.len() < self.concurrency
                && alive
                && !stop.is_cancelled()
                && backoff_until.is_none_or(|t| Instant::now() >= t)
            {
                if closing(&mut inbound, out) {
                    return Ok(Ending::Gone);
                }
                let mut leased = None;
                let mut took = false;
                for (q, hinted) in poller.order() {
                    if poller.is_resting(q) {
                        continue;
                    }
                    // Room is taken on the identity only for a lease that is
                    // tried (a take given back wakes the identity's waiting
                    // streams, for nothing when every queue was skipped).
                    if !took {
                        freed.borrow_and_update();
                        if !self.taken.take_one() {
                            full = true;
                            break;
                        }
                        took = true;
                    }
                    let queue = &poller.queues()[q];
                    match self
                        .engine
                        .lease(queue, &self.record.id, &names, Deadline::after(CALL))
                        .await
                    {
                        Ok(Some(task)) => {
                            poller.leased(q, hinted);
                            leased = Some(task);
                            break;
                        }
                        Ok(None) => poller.mark_empty(q),
                        Err(e) => {
                            tracing::warn!(worker = %self.record.id, queue = %queue, error = %e, "cannot lease for an external worker; retrying in a second");
                            backoff_until = Some(Instant::now() + Duration::from_secs(1));
                            break;
                        }
                    }
                }
                let Some(task) = leased else {
                    self.taken.keep(held.len() as u32);
                    break;
                };
                if !self.hand_out(task, held, out).await {
                    return Ok(Ending::Gone);
                }
                dirty = true;
            }
            let timer = held.values().filter_map(Held::next_timer).min();
            let room = held.len() < self.concurrency && alive && !stop.is_cancelled() && !full;
            // The earliest moment a lease is worth another try: the end of a
            // store failure's back-off while it lasts (marks of empty queues
            // left from before the failure may be long past due, and must
            // not wake the loop into a busy retry), else when an empty
            // queue is worth another look.
            let recheck = match backoff_until {
                Some(t) if Instant::now() < t => Some(t),
                _ => poller.recheck_at(),
            };
            // Not biased: a worker whose messages arrive back to back must
            // not starve the timers (hard limits, cancel grace) or the
            // cancels.
            tokio::select! {
                _ = stop.cancelled() => return Ok(Ending::Shutdown),
                msg = inbound.next() => {
                    let Some(msg) = msg else { return Ok(Ending::Gone) };
                    match msg {
                        Inbound::Invalid(e) => return Err(e),
                        Inbound::Heartbeat => {
                            last_beat = Instant::now();
                            // the worker is alive with what it was pushed
                            held.values_mut().for_each(|h| h.spoken = true);
                            let before = held.len();
                            if !self.beat(held, out).await {
                                return Ok(Ending::Gone);
                            }
                            dirty |= held.len() != before;
                        }
                        other => {
                            let before = held.len();
                            // no next task for a closing stream
                            let open = !closing(&mut inbound, out);
                            if !self.report(other, held, out, &names, &mut poller, open).await {
                                return Ok(Ending::Gone);
                            }
                            dirty |= held.len() != before;
                        }
                    }
                }
                _ = sleep_until(timer), if timer.is_some() => {
                    if !self.fire_timers(held, out).await {
                        return Ok(Ending::Gone);
                    }
                    dirty = true;
                }
                got = cancels.recv() => {
                    if let Ok(id) = got
                        && let Some(h) = held.get_mut(&id)
                        && h.cancel_at.is_none()
                    {
                        h.cancel_at = Some(Instant::now() + config.cancel_grace);
                        let reason = "cancelled by request".to_owned();
                        if out.send(Outbound::Cancel { id, reason }).await.is_err() {
                            return Ok(Ending::Gone);
                        }
                    }
                }
                // a local submit wakes its queue
                () = poller.woken(), if room => {}
                _ = sleep_until(recheck), if room && recheck.is_some() => {
                    backoff_until = None;
                }
                // room freed by the identity's other streams or leases
                _ = freed.changed(), if full => {}
                _ = announce.tick() => {
                    if dirty || announced.elapsed() >= config.lease / 3 {
                        self.announce(held, last_beat).await;
                        announced = Instant::now();
                        dirty = false;
                    }
                }
                // a worker silent for a whole lease: its leases have lapsed
                // (the sweep takes the tasks back); tell it so
                _ = tokio::time::sleep_until(last_beat + config.lease), if !held.is_empty() => {
                    for (id, _) in held.drain() {
                        let reason = "no heartbeat for a whole lease: the lease lapsed".to_owned();
                        if out.send(Outbound::Revoked { id, reason }).await.is_err() {
                            return Ok(Ending::Gone);
                        }
                    }
                    dirty = true;
                }
            }
        }
    }

    /// Pushes a leased task to the worker and starts its timers; `false`
    /// when the worker is gone (the task is then given back by the caller's
    /// cleanup, as a held task).
    async fn hand_out(
        &self,
        task: Task,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
    ) -> bool {
        let now = Instant::now();
        let after = |ms: u64| (ms > 0).then(|| now + Duration::from_millis(ms));
        let h = Held {
            soft_at: after(task.soft_ms),
            hard_at: after(task.hard_ms),
            cancel_at: None,
            pushed_at: now,
            spoken: false,
            task: task.clone(),
        };
        held.insert(task.id.clone(), h);
        // The signer is read once per process; without it the stream still
        // works (its own reports need no secret).
        let secret = match self.engine.lease_secret(&task, Deadline::after(CALL)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "cannot compute a lease secret; the task is pushed without one");
                String::new()
            }
        };
        let task = Box::new(task);
        out.send(Outbound::Task { task, secret }).await.is_ok()
    }

    /// Extends every held lease; passes on cancels and revokes lost leases.
    async fn beat(&self, held: &mut HashMap<TaskId, Held>, out: &mpsc::Sender<Outbound>) -> bool {
        let deadline = Deadline::after(CALL);
        let beats = futures::future::join_all(held.iter().map(|(id, h)| async move {
            (
                id.clone(),
                self.engine.heartbeat(id, h.task.token, deadline).await,
            )
        }))
        .await;
        let grace = self.engine.config().cancel_grace;
        for (id, beat) in beats {
            let message = match beat {
                Ok(false) => continue,
                Ok(true) => match held.get_mut(&id) {
                    Some(h) if h.cancel_at.is_none() => {
                        h.cancel_at = Some(Instant::now() + grace);
                        Outbound::Cancel {
                            id,
                            reason: "cancelled by request".to_owned(),
                        }
                    }
                    _ => continue,
                },
                Err(TaskError::Fenced(_)) => {
                    held.remove(&id);
                    Outbound::Revoked {
                        id,
                        reason: "the lease lapsed or the task ended".to_owned(),
                    }
                }
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "heartbeat for an external worker failed; will retry");
                    continue;
                }
            };
            if out.send(message).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Handles a progress, complete or fail message; `false` when the worker
    /// is gone. The next task is leased with a completion only when the
    /// stream is `open`.
    async fn report(
        &self,
        msg: Inbound,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
        names: &[&str],
        poller: &mut Poller,
        open: bool,
    ) -> bool {
        let deadline = Deadline::after(CALL);
        let (id, token, secret, kind, finish) = match msg {
            Inbound::Progress {
                id,
                token,
                secret,
                progress,
            } => {
                let mut proof = Proof::given(&secret);
                if let Ok(task_id) = TaskId::parse(&id)
                    && let Some(h) = held.get_mut(&task_id)
                    && h.task.token == token
                {
                    h.spoken = true;
                    proof = Proof::Stream;
                }
                let outcome =
                    progress_task(&self.engine, &id, token, &progress, proof, deadline).await;
                return match outcome {
                    Ok(()) => true,
                    Err(e) => {
                        let kind = ReplyKind::Progress;
                        out.send(Outbound::Reply {
                            id,
                            kind,
                            outcome: Err(e),
                        })
                        .await
                        .is_ok()
                    }
                };
            }
            Inbound::Complete {
                id,
                token,
                secret,
                result,
            } => {
                let finish = Ok(Finish::Succeeded(result.to_string()));
                (id, token, secret, ReplyKind::Complete, finish)
            }
            Inbound::Fail {
                id,
                token,
                secret,
                failure,
            } => (id, token, secret, ReplyKind::Fail, failure.into_finish()),
            Inbound::Heartbeat | Inbound::Invalid(_) => return true,
        };
        let (outcome, next) = self
            .finish_held(
                &id, token, &secret, finish, held, names, poller, deadline, open,
            )
            .await;
        let reply = Outbound::Reply {
            id,
            kind,
            outcome: outcome.map(Some),
        };
        let replied = out.send(reply).await.is_ok();
        // a next task leased with the completion is held even when the
        // worker is gone, so that it is handed back (never started)
        match next {
            Some(task) => self.hand_out(task, held, out).await && replied,
            None => replied,
        }
    }

    /// Ends an attempt the worker reported. A task this session holds is
    /// ended with its lease, and when every other queue is empty the next
    /// task of its queue is leased in the same call (a busy worker's path)
    /// while the stream is `open`; a task the session does not hold is
    /// read first, and ended only with its lease's `secret` (see
    /// [`super::secret`]).
    #[allow(clippy::too_many_arguments)]
    async fn finish_held(
        &self,
        id: &str,
        token: u32,
        secret: &str,
        finish: Result<Finish, TaskError>,
        held: &mut HashMap<TaskId, Held>,
        names: &[&str],
        poller: &mut Poller,
        deadline: Deadline,
        open: bool,
    ) -> (Result<State, TaskError>, Option<Task>) {
        let finish = match finish {
            Ok(f) => f,
            Err(e) => return (Err(e), None),
        };
        let task_id = match TaskId::parse(id) {
            Ok(t) => t,
            Err(e) => return (Err(TaskError::invalid("task_id", e.to_string())), None),
        };
        let Some(h) = held.get(&task_id).filter(|h| h.task.token == token) else {
            let ended = finish_leased(
                &self.engine,
                self.cache.as_ref(),
                id,
                token,
                finish,
                Proof::given(secret),
                deadline,
            )
            .await;
            return (ended, None);
        };
        let task = h.task.clone();
        let finish = cache_result(self.cache.as_ref(), &task, finish).await;
        held.remove(&task_id);
        let q = poller.position(&task.id.queue());
        let chain =
            open && held.len() < self.concurrency && q.is_some_and(|q| poller.others_resting(q));
        let worker = &self.record.id;
        if chain {
            match self
                .engine
                .finish_and_lease(&task, token, worker, finish, names, deadline)
                .await
            {
                Ok((state, next)) => {
                    if next.is_none()
                        && let Some(q) = q
                    {
                        poller.mark_empty(q);
                    }
                    (Ok(state), next)
                }
                Err(e) => (Err(e), None),
            }
        } else {
            (
                self.engine
                    .finish(&task, token, worker, finish, deadline)
                    .await,
                None,
            )
        }
    }

    /// Fires the held tasks' due timers: soft-limit notices, and koo's own
    /// end of tasks past their hard limit or their cancel grace.
    async fn fire_timers(
        &self,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
    ) -> bool {
        let now = Instant::now();
        let due: Vec<TaskId> = held
            .iter()
            .filter(|(_, h)| h.next_timer().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(h) = held.get_mut(&id) else { continue };
            let (finish, reason) = if h.hard_at.is_some_and(|t| t <= now) {
                (
                    Finish::TimedOut,
                    "hard time limit reached: the task ended TIMED_OUT",
                )
            } else if h.cancel_at.is_some_and(|t| t <= now) {
                (
                    Finish::failed("the worker did not stop within the cancel grace", false),
                    "the task was cancelled and did not stop within the cancel grace",
                )
            } else {
                h.soft_at = None;
                if out.send(Outbound::SoftLimit(id)).await.is_err() {
                    return false;
                }
                continue;
            };
            let Some(h) = held.remove(&id) else { continue };
            match self
                .engine
                .finish(
                    &h.task,
                    h.task.token,
                    &self.record.id,
                    finish,
                    Deadline::after(CALL),
                )
                .await
            {
                Ok(_) | Err(TaskError::Fenced(_)) => {}
                // the lease lapses and the sweep ends the task
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "cannot end an external worker's task")
                }
            }
            let reason = reason.to_owned();
            if out.send(Outbound::Revoked { id, reason }).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Records this worker as alive, with what it holds.
    async fn announce(&mut self, held: &HashMap<TaskId, Held>, last_beat: Instant) {
        let record = &mut self.record;
        record.running = held.len() as u32;
        record.held = held.keys().map(|id| id.to_string()).collect();
        record.held.sort();
        record.seen_ms = crate::store::unix_millis(SystemTime::now())
            - i64::try_from(last_beat.elapsed().as_millis()).unwrap_or(i64::MAX);
        let lease = self.engine.config().lease;
        if let Err(e) = self
            .engine
            .store()
            .announce_worker(record, lease, Deadline::after(CALL))
            .await
        {
            tracing::debug!(error = %e, "cannot announce an external worker");
        }
    }
}

/// Whether a worker's stream is closing: its inbound half ended (or broke)
/// or koo's outbound half is gone. Looked at without waiting (a message
/// that is waiting stays there), before every lease.
fn closing<S: Stream + Unpin>(
    inbound: &mut futures::stream::Peekable<S>,
    out: &mpsc::Sender<Outbound>,
) -> bool {
    out.is_closed()
        || matches!(
            std::pin::Pin::new(inbound).peek().now_or_never(),
            Some(None)
        )
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::{Category, Priority, QueueName};

    fn held(attempts: u32, token: u32, pushed_at: Instant, spoken: bool) -> Held {
        let task = Task {
            id: TaskId::generate(&QueueName::parse("research").unwrap()),
            name: "koo.examples.job".into(),
            category: Category::Research,
            priority: Priority::Normal,
            args: "[]".into(),
            kwargs: "{}".into(),
            state: State::Running,
            depends_on: vec![],
            schedule: None,
            schedule_tick_ms: None,
            cache_result: None,
            attempts,
            token,
            max_retries: 3,
            worker: None,
            progress: None,
            result: None,
            error: None,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            soft_ms: 0,
            hard_ms: 0,
            result_ttl_ms: 0,
            log: vec![],
        };
        Held {
            task,
            soft_at: None,
            hard_at: None,
            cancel_at: None,
            pushed_at,
            spoken,
        }
    }

    /// The never-started rule: silent, within the window, and given back
    /// fewer than MAX_GIVEN_BACK times; anything else counts.
    #[test]
    fn unstarted_rule() {
        let window = Duration::from_secs(10);
        let pushed = Instant::now();
        let soon = pushed + Duration::from_secs(1);
        assert!(held(1, 1, pushed, false).unstarted(soon, window));
        // the worker spoke about it (a report or a heartbeat)
        assert!(!held(1, 1, pushed, true).unstarted(soon, window));
        // held for a whole heartbeat interval without a word
        assert!(!held(1, 1, pushed, false).unstarted(pushed + window, window));
        // given back MAX_GIVEN_BACK - 1 times already: once more
        let n = MAX_GIVEN_BACK;
        assert!(held(1, n, pushed, false).unstarted(soon, window));
        // given back MAX_GIVEN_BACK times: it counts now (a task that kills
        // every worker before it speaks still reaches its dead letter)
        assert!(!held(1, n + 1, pushed, false).unstarted(soon, window));
    }
}
