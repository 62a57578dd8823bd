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
//!   worker said nothing about it — no `started`, progress, complete or
//!   fail naming it and no heartbeat since it was pushed — and the stream
//!   closed less than one heartbeat interval (a third of the lease) after
//!   the push. A worker that sends `started` as it begins a task (the
//!   Python SDK's does) makes the rule exact; for one that does not, koo
//!   cannot see whether it began a task, so silence within the first
//!   interval is taken as "never started" (a stream closing while koo
//!   pushed is the usual case). So that a task that kills every worker
//!   before it can speak still reaches its dead letter, the attempt is
//!   given back only while the task has been given back fewer than
//!   [`MAX_GIVEN_BACK`] times (its lease token, which grows with every
//!   lease, minus its attempts and its take-overs: `Task::given_back`);
//! - *lost*, the attempt counted, as a lapsed lease would be: every other
//!   task, and every task of a stream that ended on a message koo could
//!   not read or that broke the protocol (the worker was talking).
//!
//! A worker that stops on purpose need not leave it to that rule: it
//! *releases* each task it will not finish (`release`), which goes back at
//! once, its attempt given back (within the same [`MAX_GIVEN_BACK`]), and
//! from the first release the stream is pushed nothing more.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use futures::stream::Peekable;

pub use self::adopt::Claim;
use self::held::Held;
pub use self::messages::{Inbound, Outbound, ReplyKind};
use super::holds::{Taken, Tally};
use super::{CALL, MAX_CONCURRENCY, Routing, check_name};
use crate::cache::Cache;
use crate::domain::task::{Task, TaskId};
use crate::store::Deadline;
use crate::store::tasks::WorkerRecord;
use crate::tasks::engine::{TaskEngine, TaskError};
use crate::tasks::poller::{Poller, peer_found};

mod adopt;
mod handoff;
mod held;
mod held_tasks;

use self::held_tasks::{pass_cancel, revoke_all};
mod messages;
mod reports;

/// Most attempts of one task given back (by hand-backs of any kind)
/// before a never-started task of a vanished stream counts as lost.
pub const MAX_GIVEN_BACK: u32 = 4;
/// Tasks of one fill sent together at most (each lease is a store call of
/// its own).
const FILL_BATCH: usize = 32;
/// Hand-backs of one ended session in flight at once.
const HAND_BACKS: usize = 16;

/// How often a stream worker must send a heartbeat (told in the welcome):
/// a third of the lease, so that one lost heartbeat does not lapse it.
pub fn heartbeat_interval(lease: Duration) -> Duration {
    lease / 3
}

/// How long a worker may be silent and still be pushed tasks: two
/// heartbeat intervals. Its leases are revoked a whole lease after its last
/// heartbeat, so every task pushed to a worker that is then revoked waited
/// at least a third of a lease unread: a stopped worker that resumes can
/// tell those pushes from fresh ones (the Python SDK holds back a push read
/// more than a quarter of a lease after koo sent it).
pub fn push_cutoff(lease: Duration) -> Duration {
    lease * 2 / 3
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
    /// Set when the worker re-attaches its tasks: koo's own stop (see
    /// [`adopt`]).
    koo_stopping: Option<CancellationToken>,
    /// Tasks re-attached from the hello, until the loop starts.
    adopted: HashMap<TaskId, Held>,
    /// Their leases as taken over (new tokens and secrets), for the welcome.
    adopted_leases: Vec<Claim>,
    /// Messages for the worker before anything else: the revokes of
    /// claims refused, cancels of tasks adopted.
    notices: Vec<Outbound>,
}

/// Why a session's loop ended.
enum Ending {
    /// The worker hung up or its connection dropped: its leases end now.
    Gone,
    /// koo stopped the stream (it is stopping, or the worker's
    /// credentials were revoked): tasks go back to their queues, attempts
    /// given back.
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
            koo_stopping: None,
            adopted: HashMap::new(),
            adopted_leases: Vec::new(),
            notices: Vec::new(),
        })
    }

    /// The worker id (its name and a unique suffix).
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// Runs the session until the worker hangs up or `stop` fires, reading
    /// `inbound` and writing to `out`. Every task held at the end goes back
    /// at once: its attempt given back when koo is stopping or when it
    /// never started (see the module doc), counted otherwise; except when
    /// koo stops under a worker that re-attaches its tasks: their leases
    /// stay, and the number kept is returned (`Some`, zero included).
    pub async fn run(
        mut self,
        inbound: impl Stream<Item = Inbound> + Unpin,
        out: mpsc::Sender<Outbound>,
        stop: CancellationToken,
    ) -> Result<Option<usize>, TaskError> {
        let (mut held, notices) = adopt::take_adopted(&mut self);
        let ending = if reports::send_all(&out, notices).await {
            self.serve(inbound, &out, &stop, &mut held).await
        } else {
            Ok(Ending::Gone)
        };
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
        if matches!(ending, Ok(Ending::Shutdown)) && self.leaves_leases() {
            // the worker runs them on, and re-attaches them to the next koo (the
            // embedded store's save at shutdown keeps them running too)
            if !held.is_empty() {
                self.engine.keep_leases(held.keys());
                tracing::info!(worker = %self.record.id, tasks = held.len(), "koo is stopping: a re-attaching worker's tasks keep their leases");
            }
            return Ok(Some(held.len()));
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
                        "stream stopped by koo (koo is stopping, or the worker's credentials were revoked): the task goes back to its queue, its attempt given back",
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
        ending.map(|_| None)
    }

    /// The session's loop: takes work while there is room, and waits for
    /// the worker's messages, the held tasks' timers, cancels, submits and
    /// room freed on the identity. Its steps are methods of their own; what
    /// stays here is the one `select!` that ties them together.
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
        let served: Arc<[String]> = filter.iter().cloned().collect();
        let mut cancels = self.engine.cancels();
        let mut pace = Pace::new(self, config.poll_interval);
        let rests = pace.poller.rests();
        let announce_every = (config.lease / 3).min(Duration::from_secs(1));
        let mut announce = tokio::time::interval(announce_every);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Room of tasks that left since the last turn goes back to the
            // identity (its other streams may be waiting for it).
            self.taken.keep(held.len() as u32);
            let cutoff = push_cutoff(config.lease);
            let alive = pace.last_beat.elapsed() < cutoff;
            let full = match self
                .fill(&mut inbound, out, stop, held, &mut pace, &names, alive)
                .await
            {
                Some(full) => full,
                None => return Ok(Ending::Gone),
            };
            let timer = held.values().filter_map(Held::next_timer).min();
            let room = held.len() < self.concurrency && alive && !stop.is_cancelled() && !full;
            let recheck = pace.recheck_at();
            let mut idle = self.wait_idle(&pace, room, &served);
            let mut handed = None;
            // Not biased: a worker whose messages arrive back to back must
            // not starve the timers (hard limits, cancel grace) or the
            // cancels. An announce tick changes nothing the session waits
            // on: it is served in place, the session staying on the board
            // (a submit in that instant is still handed off).
            let went_on = loop {
                let step = tokio::select! {
                    _ = stop.cancelled() => {
                        // what a submit handed meanwhile goes back first
                        if let Some(slot) = idle.take() {
                            self.hand_back(slot.leave().await).await;
                        }
                        return Ok(Ending::Shutdown);
                    }
                    msg = inbound.next() => {
                        let Some(msg) = msg else { return Ok(Ending::Gone) };
                        if let Inbound::Invalid(e) = msg {
                            return Err(e);
                        }
                        // no next task for a closing stream
                        let open = !closing(&mut inbound, out);
                        Some(self.on_message(msg, held, out, &names, &mut pace, open).await)
                    }
                    _ = sleep_until(timer), if timer.is_some() => {
                        pace.dirty = true;
                        Some(self.fire_timers(held, out).await)
                    }
                    got = cancels.recv() => Some(match got {
                        Ok(asked) => pass_cancel(asked, held, out, config.cancel_grace).await,
                        Err(_) => true,
                    }),
                    // a local submit wakes its queue; a peer's look found a task
                    () = pace.poller.woken(), if room => Some(true),
                    () = peer_found(rests.as_deref()), if room => Some(true),
                    _ = sleep_until(recheck), if room && recheck.is_some() => {
                        pace.backoff_until = None;
                        Some(true)
                    }
                    // a submit of this process stored a task and leased it for us
                    got = handoff::next_handed(&mut idle) => {
                        handed = got;
                        idle = None;
                        Some(true)
                    }
                    // room freed by the identity's other streams or leases
                    _ = pace.freed.changed(), if full => Some(true),
                    _ = announce.tick() => {
                        if pace.dirty || pace.announced.elapsed() >= config.lease / 3 {
                            self.announce(held, pace.last_beat).await;
                            pace.announced = Instant::now();
                            pace.dirty = false;
                        }
                        None
                    }
                    // a worker silent past the push cutoff takes nothing
                    // more: the next turn takes it off the board
                    _ = sleep_until(Some(pace.last_beat + cutoff)), if room => Some(true),
                    // a worker silent for a whole lease: its leases have lapsed
                    // (the sweep takes the tasks back); tell it so
                    _ = tokio::time::sleep_until(pace.last_beat + config.lease), if !held.is_empty() => {
                        pace.dirty = true;
                        Some(revoke_all(held, out).await)
                    }
                };
                if let Some(went_on) = step {
                    break went_on;
                }
            };
            // off the board; a submit that claimed the session meanwhile
            // hands its task over now
            if let Some(slot) = idle.take() {
                handed = slot.leave().await;
            }
            if !self.take_handed(handed, held, out, &mut pace).await || !went_on {
                return Ok(Ending::Gone);
            }
        }
    }

    /// Takes work while there is room, the worker is `alive` (a worker that
    /// missed its heartbeats gets nothing more), koo is not stopping and no
    /// store failure's back-off lasts: `None` when the stream is closing or
    /// gone, else whether the identity holds its bound (this stream then
    /// waits for room freed on its tally).
    #[allow(clippy::too_many_arguments)]
    async fn fill<S: Stream<Item = Inbound> + Unpin>(
        &mut self,
        inbound: &mut Peekable<S>,
        out: &mpsc::Sender<Outbound>,
        stop: &CancellationToken,
        held: &mut HashMap<TaskId, Held>,
        pace: &mut Pace,
        names: &[&str],
        alive: bool,
    ) -> Option<bool> {
        let mut full = false;
        // the tasks leased in one fill go out together (one message to a
        // worker that accepts batches)
        let mut pushes = Vec::new();
        while held.len() < self.concurrency
            && alive
            && !stop.is_cancelled()
            && pace.backoff_until.is_none_or(|t| Instant::now() >= t)
        {
            if closing(inbound, out) {
                return None;
            }
            let Some(task) = self.lease_one(pace, names, &mut full).await else {
                self.taken.keep(held.len() as u32);
                break;
            };
            pushes.push(self.hold(task, held).await);
            pace.dirty = true;
            // a big fill does not keep its first tasks waiting for the last
            if pushes.len() == FILL_BATCH
                && !reports::send_all(out, std::mem::take(&mut pushes)).await
            {
                return None;
            }
        }
        reports::send_all(out, pushes).await.then_some(full)
    }

    /// One lease round over the poller's queues, skipping resting ones.
    /// Room is taken on the identity only for a lease that is tried (a take
    /// given back wakes the identity's waiting streams, for nothing when
    /// every queue was skipped); `full` is set when there is none.
    async fn lease_one(
        &mut self,
        pace: &mut Pace,
        names: &[&str],
        full: &mut bool,
    ) -> Option<Task> {
        let mut took = false;
        let told = pace.poller.take_told();
        for (q, hinted) in pace.poller.order() {
            if !hinted && pace.poller.is_resting(q) {
                continue;
            }
            if !took {
                pace.freed.borrow_and_update();
                if !self.taken.take_one() {
                    *full = true;
                    return None;
                }
                took = true;
            }
            // (one look at a time among identical workers: see the poller;
            // claimed once this one surely looks)
            if !hinted && !pace.poller.claim(q) {
                continue;
            }
            let queue = &pace.poller.queues()[q];
            match self
                .engine
                .lease_or_hold(queue, &self.record.id, names, Deadline::after(CALL))
                .await
            {
                Ok(leased) => {
                    if let Some(task) = pace.poller.took(q, leased) {
                        if !hinted || told {
                            pace.poller.found(q);
                        }
                        pace.poller.leased(q, hinted);
                        return Some(task);
                    }
                }
                Err(e) => {
                    tracing::warn!(worker = %self.record.id, queue = %queue, error = %e, "cannot lease for an external worker; retrying in a second");
                    pace.backoff_until = Some(Instant::now() + Duration::from_secs(1));
                    return None;
                }
            }
        }
        None
    }

    /// A worker that hands a task back is stopping: it is pushed nothing
    /// more (a task pushed now would only come back, a give-back each time).
    fn stop_pushing(&mut self) {
        self.concurrency = 0;
    }

    /// The worker is stopping: it is pushed nothing more, and koo's own
    /// stop hands its tasks back (it will not re-attach them). Always
    /// `true`: no store call.
    fn draining(&mut self) -> bool {
        tracing::info!(worker = %self.record.id, "external worker stopping: it is pushed nothing more");
        self.stop_pushing();
        self.koo_stopping = None;
        true
    }

    /// A heartbeat, a report or a batch of them from the worker; `false`
    /// when it is gone.
    async fn on_message(
        &mut self,
        msg: Inbound,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
        names: &[&str],
        pace: &mut Pace,
        open: bool,
    ) -> bool {
        let before = held.len();
        let went_on = match msg {
            Inbound::Heartbeat => self.heartbeat(held, out, pace).await,
            Inbound::Started(ids) => started(&ids, held),
            Inbound::Draining => self.draining(),
            msg @ Inbound::Progress { .. } => self.progress(msg, held, out).await,
            msg @ Inbound::Release { .. } => {
                self.stop_pushing();
                self.release(msg, held, out).await
            }
            msg @ (Inbound::Complete { .. } | Inbound::Fail { .. }) => {
                self.outcomes(vec![msg], held, out, names, &mut pace.poller, open)
                    .await
            }
            Inbound::Batch(msgs) => self.batch(msgs, held, out, names, pace, open).await,
            Inbound::Invalid(_) => true,
        };
        pace.dirty |= held.len() != before;
        went_on
    }

    /// A batch's messages in order, as if sent one by one, except that each
    /// run of complete and fail messages is ended concurrently, and a
    /// heartbeat is acted on once per batch; `false` when the worker is
    /// gone.
    async fn batch(
        &mut self,
        msgs: Vec<Inbound>,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
        names: &[&str],
        pace: &mut Pace,
        open: bool,
    ) -> bool {
        let mut run: Vec<Inbound> = Vec::new();
        let mut beaten = false;
        // a worker that hands anything back is stopping: the outcomes
        // before it in the batch lease nothing more for it either
        if msgs.iter().any(|m| matches!(m, Inbound::Release { .. })) {
            self.stop_pushing();
        }
        for msg in msgs {
            let outcome = matches!(msg, Inbound::Complete { .. } | Inbound::Fail { .. });
            // a second outcome for a task of the run ends after the first,
            // as it would have one by one (it is then fenced)
            let again = outcome && run.iter().any(|r| outcome_id(r) == outcome_id(&msg));
            if outcome && !again {
                run.push(msg);
                continue;
            }
            if !run.is_empty() {
                let run = std::mem::take(&mut run);
                if !self
                    .outcomes(run, held, out, names, &mut pace.poller, open)
                    .await
                {
                    return false;
                }
            }
            if again {
                run.push(msg);
                continue;
            }
            let went_on = match msg {
                Inbound::Heartbeat if beaten => true,
                Inbound::Heartbeat => {
                    beaten = true;
                    self.heartbeat(held, out, pace).await
                }
                Inbound::Started(ids) => started(&ids, held),
                Inbound::Draining => self.draining(),
                msg @ Inbound::Release { .. } => {
                    self.stop_pushing();
                    self.release(msg, held, out).await
                }
                msg => self.progress(msg, held, out).await,
            };
            if !went_on {
                return false;
            }
        }
        run.is_empty()
            || self
                .outcomes(run, held, out, names, &mut pace.poller, open)
                .await
    }

    /// A heartbeat: the worker is alive with what it was pushed; every
    /// lease it holds is extended. `false` when it is gone.
    async fn heartbeat(
        &self,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
        pace: &mut Pace,
    ) -> bool {
        pace.last_beat = Instant::now();
        held.values_mut().for_each(|h| h.spoken = true);
        self.beat(held, out).await
    }
}

/// Marks the held tasks among `ids` as begun: from now on their attempts
/// count if the stream ends (an id the stream does not hold, say one
/// revoked meanwhile, is ignored). Always `true`: no store call, nothing
/// that can fail.
fn started(ids: &[String], held: &mut HashMap<TaskId, Held>) -> bool {
    for id in ids {
        if let Some(h) = TaskId::parse(id).ok().and_then(|id| held.get_mut(&id)) {
            h.spoken = true;
        }
    }
    true
}

/// The task a complete or fail message names.
fn outcome_id(msg: &Inbound) -> Option<&str> {
    match msg {
        Inbound::Complete { id, .. } | Inbound::Fail { id, .. } => Some(id),
        _ => None,
    }
}

/// The serve loop's state besides the held tasks.
struct Pace {
    /// The rotation and the resting (empty) queues, woken by this
    /// process's submits.
    poller: Poller,
    /// When the worker last sent a heartbeat.
    last_beat: Instant,
    /// When the presence record was last written.
    announced: Instant,
    /// Whether the presence record is out of date.
    dirty: bool,
    /// After a store failure, no lease is tried until then.
    backoff_until: Option<Instant>,
    /// Room freed on the identity's tally.
    freed: tokio::sync::watch::Receiver<u64>,
}

impl Pace {
    fn new(session: &Session, poll: Duration) -> Self {
        let queues = session.routing.queues.clone();
        let engine = &session.engine;
        let rests = engine.shared_rests(&queues, &session.routing.names);
        Self {
            poller: Poller::pooled(queues, poll, 0, engine.submits(), rests),
            last_beat: Instant::now(),
            announced: Instant::now(),
            dirty: true,
            backoff_until: None,
            freed: session.taken.tally().freed(),
        }
    }

    /// The earliest moment a lease is worth another try: the end of a
    /// store failure's back-off while it lasts (marks of empty queues left
    /// from before the failure may be long past due, and must not wake the
    /// loop into a busy retry), else when an empty queue is worth another
    /// look.
    fn recheck_at(&self) -> Option<Instant> {
        match self.backoff_until {
            Some(t) if Instant::now() < t => Some(t),
            _ => self.poller.recheck_at(),
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
