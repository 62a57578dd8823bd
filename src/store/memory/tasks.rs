//! Task transitions on the embedded store: the same transitions, checks and
//! events as the Redis scripts (`../redis/lua/tasks/*.lua`), each one
//! critical section under one lock, so a single `koo serve` runs tasks with
//! no other process. A restart loses every task unless `KOO_DATA_DIR` is
//! set: then [`crate::persist`] saves and loads them (the image: `snapshot`).
//!
//! The shapes mirror Redis on purpose (sorted sets of ids per queue, a capped
//! event log per queue, counters per outcome), so that the engine, listing
//! and paging code above cannot tell the stores apart, and the tests that run
//! on both hold them to the same behaviour.
//!
//! The lock is a std mutex: it is never held across an `.await`, and every
//! critical section touches a handful of map entries (at most ~100 lapsed
//! leases or due tasks per recovery call, as on Redis).

mod snapshot;

pub use snapshot::{EventImage, QueueImage, TaskImage, TasksImage};

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::domain::{Count, Counts, Outcome, QueueStats};
use crate::store::tasks::{
    Beat, CancelReply, DependReply, RetryReply, TaskEvent, TaskLimits, Trimmed, WorkerRecord,
};
use crate::store::{Result, StoreError, unix_millis};

/// Width of one priority band in a ready score: `band * BAND + enqueue ms`,
/// as on Redis (higher priority first, FIFO within one).
const BAND: i64 = 1 << 42;

/// Tasks the embedded store holds at most (queued, running and finished
/// whose results have not expired): a submit beyond is RESOURCE_EXHAUSTED
/// rather than a process that grows until the kernel kills it.
pub const MAX_TASKS: usize = 1_000_000;

/// Due tasks or lapsed leases one call handles, as on Redis.
const BATCH: usize = 100;

/// Expired results purged per recovery call.
const PURGE_BATCH: usize = 1000;

/// A sorted set of task ids (Redis's ZSET): ordered by score then id.
#[derive(Default)]
struct ZSet {
    by_score: BTreeSet<(i64, String)>,
    scores: HashMap<String, i64>,
}

impl ZSet {
    fn add(&mut self, id: &str, score: i64) {
        if let Some(old) = self.scores.insert(id.to_owned(), score) {
            self.by_score.remove(&(old, id.to_owned()));
        }
        self.by_score.insert((score, id.to_owned()));
    }

    /// Updates the score of a member only (`ZADD XX`).
    fn update(&mut self, id: &str, score: i64) {
        if self.scores.contains_key(id) {
            self.add(id, score);
        }
    }

    fn remove(&mut self, id: &str) -> bool {
        match self.scores.remove(id) {
            Some(score) => self.by_score.remove(&(score, id.to_owned())),
            None => false,
        }
    }

    fn len(&self) -> u64 {
        self.scores.len() as u64
    }

    /// Members with a score at most `max`, lowest first, `limit` at most.
    fn up_to(&self, max: i64, limit: usize) -> Vec<String> {
        self.by_score
            .iter()
            .take_while(|(score, _)| *score <= max)
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Members by rank: `count` from `offset`, lowest first.
    fn by_rank(&self, offset: u64, count: usize) -> Vec<String> {
        self.by_score
            .iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(count)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Members with a score in `[min, max)`, highest first, with scores.
    fn rev_range(&self, min: i64, max: i64) -> impl Iterator<Item = (i64, &str)> {
        self.by_score
            .range((
                Bound::Included((min, String::new())),
                Bound::Excluded((max, String::new())),
            ))
            .rev()
            .map(|(score, id)| (*score, id.as_str()))
    }

    /// The lowest member with a score of at least `min`.
    fn first_from(&self, min: i64) -> Option<i64> {
        self.by_score
            .range((Bound::Included((min, String::new())), Bound::Unbounded))
            .next()
            .map(|(score, _)| *score)
    }

    /// Removes the lowest members beyond `cap`; the removed ids.
    fn trim(&mut self, cap: u64) -> Vec<String> {
        let mut removed = Vec::new();
        while self.len() > cap {
            let Some((score, id)) = self.by_score.pop_first() else {
                break;
            };
            let _ = score;
            self.scores.remove(&id);
            removed.push(id);
        }
        removed
    }
}

/// One queue's indexes, event log and counters.
#[derive(Default)]
struct Queue {
    ready: ZSet,
    scheduled: ZSet,
    leases: ZSet,
    /// PENDING ids, by submit time.
    pending: ZSet,
    history: ZSet,
    /// Summaries of ended tasks (JSON), which outlive their results.
    history_data: HashMap<String, String>,
    dead: ZSet,
    /// `(sequence, event)`, oldest first, capped at the events limit.
    events: VecDeque<(u64, TaskEvent)>,
    /// The newest event dropped by the cap: a reader resuming before it
    /// would miss events.
    trimmed_upto: u64,
    counts: Counts,
}

impl Queue {
    fn count(&mut self, count: Count) {
        self.counts.bump(count);
    }

    /// Counts a task's end in `state`.
    fn count_end(&mut self, state: State) {
        if let Some(c) = Count::ended(state) {
            self.counts.bump(c);
        }
    }
}

/// A stored task and its lease.
#[derive(Clone)]
struct Entry {
    task: Task,
    /// Why a cancel was asked for while it ran.
    cancel: Option<String>,
    /// The dependencies a PENDING task still waits on.
    waiting: HashSet<String>,
    /// Attempts when it was last retried by hand: the retry budget counts
    /// from there.
    attempt_base: u32,
    lease_until: i64,
    hard_until: i64,
    /// When a finished task's result expires (ms).
    expires_at: Option<i64>,
}

impl Entry {
    fn holds(&self, token: u32) -> bool {
        self.task.state == State::Running && self.task.token == token
    }

    fn live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }

    fn budget_spent(&self) -> bool {
        self.task.attempts.saturating_sub(self.attempt_base) > self.task.max_retries
    }
}

#[derive(Default)]
struct Tasks {
    tasks: HashMap<String, Entry>,
    queues: HashMap<QueueName, Queue>,
    /// `(expiry ms, id)` of finished tasks.
    expiring: BTreeSet<(i64, String)>,
    /// The sequence number of the newest event (of any queue).
    last_event: u64,
    /// Worker pools and when their records expire (ms).
    workers: HashMap<String, (WorkerRecord, i64)>,
    /// Idempotency claims and when they expire (ms).
    claims: HashMap<String, (String, i64)>,
    /// The tasks waiting on each task that has not ended.
    dependents: HashMap<String, Vec<String>>,
}

struct Shared {
    tasks: Mutex<Tasks>,
    /// The newest event's sequence number: readers wait on it.
    events: watch::Sender<u64>,
}

/// The embedded task store: a cheap-to-clone handle.
#[derive(Clone)]
pub struct MemoryTasks {
    shared: Arc<Shared>,
}

impl Default for MemoryTasks {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                tasks: Mutex::new(Tasks::default()),
                events: watch::Sender::new(0),
            }),
        }
    }
}

fn now_ms() -> i64 {
    unix_millis(SystemTime::now())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The lease's score: its deadline, or the hard limit when that is sooner.
fn lease_score(lease_until: i64, hard_until: i64) -> i64 {
    if hard_until > 0 {
        lease_until.min(hard_until)
    } else {
        lease_until
    }
}

/// Appends an event to `queue`'s log, dropping the oldest beyond the cap.
fn push_event(
    queue: &mut Queue,
    last_event: &mut u64,
    limits: TaskLimits,
    task: &Task,
    progress: Option<&str>,
    now: i64,
) {
    *last_event += 1;
    queue.events.push_back((
        *last_event,
        TaskEvent {
            stream_id: last_event.to_string(),
            id: task.id.to_string(),
            name: task.name.clone(),
            state: task.state.as_str().to_owned(),
            progress: progress.map(str::to_owned),
            at_ms: now,
        },
    ));
    while queue.events.len() as u64 > limits.events.max(1) {
        if let Some((seq, _)) = queue.events.pop_front() {
            queue.trimmed_upto = seq;
        }
    }
}

impl Tasks {
    /// Moves up to [`BATCH`] due scheduled tasks of `queue` to ready.
    fn promote_due(&mut self, queue: &QueueName, limits: TaskLimits, now: i64) -> u64 {
        let q = self.queues.entry(queue.clone()).or_default();
        let due = q.scheduled.up_to(now, BATCH);
        for id in &due {
            q.scheduled.remove(id);
            // only a task still waiting moves
            let Some(e) = self.tasks.get_mut(id) else {
                continue;
            };
            if e.task.state != State::Scheduled {
                continue;
            }
            e.task.state = State::Queued;
            q.ready.add(id, e.task.priority.band() as i64 * BAND + now);
            push_event(q, &mut self.last_event, limits, &e.task, None, now);
        }
        due.len() as u64
    }

    /// Records a final state: history (capped), dead letters for failures,
    /// and the result's expiry (a dead letter's: the longer of the result
    /// TTL and the dead-letter TTL; one trimmed by the cap expires like a
    /// result), as `record_end` in `lib.lua`.
    fn end(&mut self, queue: &QueueName, id: &str, limits: TaskLimits, now: i64) {
        let q = self.queues.entry(queue.clone()).or_default();
        let Some(e) = self.tasks.get_mut(id) else {
            return;
        };
        let state = e.task.state;
        let mut ttl = e.task.result_ttl_ms as i64;
        let mut over = Vec::new();
        if matches!(state, State::Failed | State::TimedOut) {
            q.dead.add(id, now);
            over = q.dead.trim(limits.history);
            ttl = ttl.max(millis(limits.dead_ttl));
        }
        q.history.add(id, now);
        q.history_data.insert(
            id.to_owned(),
            serde_json::json!({
                "name": e.task.name,
                "state": state.as_str(),
                "attempts": e.task.attempts,
                "finished_ms": now,
                "category": e.task.category.as_str(),
                "schedule": e.task.schedule,
            })
            .to_string(),
        );
        for old in q.history.trim(limits.history) {
            q.history_data.remove(&old);
        }
        let at = now.saturating_add(ttl);
        e.expires_at = Some(at);
        self.expiring.insert((at, id.to_owned()));
        for old in over {
            self.expire_as_result(&old);
        }
        self.release_dependents(id, state, limits, now);
    }

    /// A dead letter trimmed by the cap expires `result_ttl` after it
    /// ended (at the next purge when that has passed).
    fn expire_as_result(&mut self, id: &str) {
        let Some(e) = self
            .tasks
            .get_mut(id)
            .filter(|e| matches!(e.task.state, State::Failed | State::TimedOut))
        else {
            return;
        };
        let Some(finished) = e.task.finished_ms else {
            return;
        };
        let at = finished.saturating_add(e.task.result_ttl_ms as i64);
        e.expires_at = Some(at);
        self.expiring.insert((at, id.to_owned()));
    }

    /// Task `id` ended in `state`: its PENDING dependents stop waiting on
    /// it, and are queued when nothing is left to wait on, or end
    /// CANCELLED when it did not succeed (which releases theirs in turn).
    fn release_dependents(&mut self, id: &str, state: State, limits: TaskLimits, now: i64) {
        for dependent in self.dependents.remove(id).unwrap_or_default() {
            let Some(e) = self
                .tasks
                .get_mut(&dependent)
                .filter(|e| e.task.state == State::Pending)
            else {
                continue;
            };
            e.waiting.remove(id);
            let queue = e.task.id.queue();
            let q = self.queues.entry(queue.clone()).or_default();
            if state != State::Succeeded {
                q.pending.remove(&dependent);
                e.task.state = State::Cancelled;
                e.task.finished_ms = Some(now);
                e.task.error = Some(
                    serde_json::json!({
                        "message": format!("dependency {id} ended {}", state.as_str().to_uppercase()),
                        "retryable": false,
                    })
                    .to_string(),
                );
                q.count(Count::Cancelled);
                push_event(q, &mut self.last_event, limits, &e.task, None, now);
                self.end(&queue, &dependent, limits, now);
            } else if e.waiting.is_empty() {
                q.pending.remove(&dependent);
                e.task.state = State::Queued;
                q.ready
                    .add(&dependent, e.task.priority.band() as i64 * BAND + now);
                push_event(q, &mut self.last_event, limits, &e.task, None, now);
            }
        }
    }

    /// Forgets up to [`PURGE_BATCH`] tasks whose results have expired.
    fn purge_expired(&mut self, now: i64) {
        for _ in 0..PURGE_BATCH {
            match self.expiring.first() {
                Some((at, _)) if *at <= now => {}
                _ => return,
            }
            let Some((at, id)) = self.expiring.pop_first() else {
                return;
            };
            if self
                .tasks
                .get(&id)
                .is_some_and(|e| e.expires_at == Some(at))
            {
                self.tasks.remove(&id);
            }
        }
    }
}

impl MemoryTasks {
    fn lock(&self) -> MutexGuard<'_, Tasks> {
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells event readers that events were appended up to `last`.
    fn announce(&self, last: u64) {
        self.shared.events.send_if_modified(|seen| {
            let changed = *seen != last;
            *seen = last;
            changed
        });
    }

    /// Stores a new task: queued now, or scheduled `delay` from now.
    pub fn submit(&self, task: &Task, delay: Duration, limits: TaskLimits) -> Result<()> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = now_ms();
        let id = task.id.as_str();
        if s.tasks.contains_key(id) {
            return Err(StoreError::Backend(format!("task {id} already exists")));
        }
        if s.tasks.len() >= MAX_TASKS {
            return Err(StoreError::OutOfMemory(format!(
                "the embedded store holds {MAX_TASKS} tasks, its limit: wait for results to expire, or use Redis (REDIS_URL)"
            )));
        }
        let delay = millis(delay);
        let mut task = task.clone();
        task.created_ms = now;
        task.state = if delay > 0 {
            State::Scheduled
        } else {
            State::Queued
        };
        let queue = task.id.queue();
        let q = s.queues.entry(queue).or_default();
        if delay > 0 {
            q.scheduled.add(id, now.saturating_add(delay));
        } else {
            q.ready.add(id, task.priority.band() as i64 * BAND + now);
        }
        q.count(Count::Submitted);
        push_event(q, &mut s.last_event, limits, &task, None, now);
        s.tasks.insert(
            id.to_owned(),
            Entry {
                task,
                cancel: None,
                waiting: HashSet::new(),
                attempt_base: 0,
                lease_until: 0,
                hard_until: 0,
                expires_at: None,
            },
        );
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        Ok(())
    }

    /// Registers `dependent` as waiting on `id`, unless `id` has ended.
    pub fn depend_on(&self, id: &TaskId, dependent: &TaskId) -> DependReply {
        let mut s = self.lock();
        let now = now_ms();
        let state = match s.tasks.get(id.as_str()).filter(|e| e.live(now)) {
            None => return DependReply::Missing,
            Some(e) => e.task.state,
        };
        if state.is_final() {
            return DependReply::Ended(state);
        }
        s.dependents
            .entry(id.to_string())
            .or_default()
            .push(dependent.to_string());
        DependReply::Waiting
    }

    /// Stores a new task PENDING on `waiting`; if those all ended meanwhile,
    /// it is released at once.
    pub fn submit_pending(
        &self,
        task: &Task,
        waiting: &[TaskId],
        limits: TaskLimits,
    ) -> Result<()> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = now_ms();
        let id = task.id.as_str();
        if s.tasks.contains_key(id) {
            return Err(StoreError::Backend(format!("task {id} already exists")));
        }
        if s.tasks.len() >= MAX_TASKS {
            return Err(StoreError::OutOfMemory(format!(
                "the embedded store holds {MAX_TASKS} tasks, its limit: wait for results to expire, or use Redis (REDIS_URL)"
            )));
        }
        let mut task = task.clone();
        task.created_ms = now;
        task.state = State::Pending;
        let q = s.queues.entry(task.id.queue()).or_default();
        q.pending.add(id, now);
        q.count(Count::Submitted);
        push_event(q, &mut s.last_event, limits, &task, None, now);
        s.tasks.insert(
            id.to_owned(),
            Entry {
                task,
                cancel: None,
                waiting: waiting.iter().map(|w| w.to_string()).collect(),
                attempt_base: 0,
                lease_until: 0,
                hard_until: 0,
                expires_at: None,
            },
        );
        // a dependency that ended between its registration and now
        for dep in waiting {
            if let Some(state) = s
                .tasks
                .get(dep.as_str())
                .map(|e| e.task.state)
                .filter(|st| st.is_final())
            {
                s.dependents
                    .entry(dep.to_string())
                    .or_default()
                    .push(id.to_owned());
                s.release_dependents(dep.as_str(), state, limits, now);
            }
        }
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        Ok(())
    }

    /// Leases the best ready task of `queue` whose name is in `names` (`*`
    /// serves all), counting the attempt.
    pub fn lease(
        &self,
        queue: &QueueName,
        worker: &str,
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
    ) -> Option<Task> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = now_ms();
        s.promote_due(queue, limits, now);
        let q = s.queues.entry(queue.clone()).or_default();
        let serves = |name: &str| names.iter().any(|n| *n == "*" || *n == name);
        // the first ready task served, in order; stale entries (gone, or
        // moved on) seen on the way are dropped
        let mut stale = Vec::new();
        let mut chosen = None;
        for (_, id) in q.ready.by_score.iter().take(limits.lease_scan as usize) {
            match s.tasks.get(id) {
                Some(e) if e.task.state == State::Queued => {
                    if serves(&e.task.name) {
                        chosen = Some(id.clone());
                        break;
                    }
                }
                _ => stale.push(id.clone()),
            }
        }
        for id in &stale {
            q.ready.remove(id);
        }
        let mut leased = None;
        if let Some(id) = chosen
            && let Some(e) = s.tasks.get_mut(&id)
        {
            q.ready.remove(&id);
            e.task.attempts += 1;
            // the fencing token grows with every lease
            e.task.token += 1;
            e.task.state = State::Running;
            e.task.worker = Some(worker.to_owned());
            e.task.started_ms = Some(now);
            // progress belongs to an attempt
            e.task.progress = None;
            e.lease_until = now.saturating_add(millis(lease));
            e.hard_until = if e.task.hard_ms > 0 {
                now.saturating_add(e.task.hard_ms as i64)
            } else {
                0
            };
            q.leases.add(&id, lease_score(e.lease_until, e.hard_until));
            push_event(q, &mut s.last_event, limits, &e.task, None, now);
            leased = Some(e.task.clone());
        }
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        leased
    }

    /// Extends a lease; `false` when the holder of `token` has been fenced.
    pub fn heartbeat(&self, id: &TaskId, token: u32, lease: Duration) -> Beat {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(e) = s.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return Beat::Lost;
        };
        e.lease_until = now_ms().saturating_add(millis(lease));
        let score = lease_score(e.lease_until, e.hard_until);
        let cancel = e.cancel.is_some();
        if let Some(q) = s.queues.get_mut(&id.queue()) {
            q.leases.update(id.as_str(), score);
        }
        if cancel {
            Beat::CancelRequested
        } else {
            Beat::Held
        }
    }

    /// Cancels a task that has not ended, as `cancel.lua` does.
    pub fn cancel(&self, id: &TaskId, reason: &str, limits: TaskLimits) -> CancelReply {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = now_ms();
        let queue = id.queue();
        let Some(e) = s.tasks.get_mut(id.as_str()).filter(|e| e.live(now)) else {
            return CancelReply::Missing;
        };
        let q = s.queues.entry(queue.clone()).or_default();
        match e.task.state {
            State::Running => {
                if e.cancel.is_none() {
                    e.cancel = Some(reason.to_owned());
                    push_event(q, &mut s.last_event, limits, &e.task, None, now);
                }
                drop(guard);
                self.announce(self.lock().last_event);
                return CancelReply::Requested;
            }
            State::Queued | State::Scheduled | State::Pending => {}
            ended => return CancelReply::Ended(ended),
        }
        q.ready.remove(id.as_str());
        q.scheduled.remove(id.as_str());
        q.pending.remove(id.as_str());
        e.task.state = State::Cancelled;
        e.task.finished_ms = Some(now);
        e.task.error = Some(
            serde_json::json!({ "message": format!("cancelled: {reason}"), "retryable": false })
                .to_string(),
        );
        q.count(Count::Cancelled);
        push_event(q, &mut s.last_event, limits, &e.task, None, now);
        s.end(&queue, id.as_str(), limits, now);
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        CancelReply::Cancelled
    }

    /// Queues an ended task again with a fresh retry budget, as `retry.lua`
    /// does.
    pub fn retry(&self, id: &TaskId, limits: TaskLimits) -> RetryReply {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = now_ms();
        let Some(e) = s.tasks.get_mut(id.as_str()).filter(|e| e.live(now)) else {
            // its result expired: a dead letter that can no longer run is
            // dropped
            if let Some(q) = s.queues.get_mut(&id.queue()) {
                q.dead.remove(id.as_str());
            }
            return RetryReply::Missing;
        };
        if !matches!(
            e.task.state,
            State::Failed | State::TimedOut | State::Cancelled
        ) {
            return RetryReply::NotEnded(e.task.state);
        }
        let q = s.queues.entry(id.queue()).or_default();
        q.history.remove(id.as_str());
        q.history_data.remove(id.as_str());
        q.dead.remove(id.as_str());
        e.expires_at = None;
        e.attempt_base = e.task.attempts;
        e.cancel = None;
        e.task.state = State::Queued;
        e.task.finished_ms = None;
        e.task.error = None;
        e.task.result = None;
        e.task.progress = None;
        q.ready
            .add(id.as_str(), e.task.priority.band() as i64 * BAND + now);
        q.count(Count::Requeued);
        push_event(q, &mut s.last_event, limits, &e.task, None, now);
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        RetryReply::Queued
    }

    /// Claims idempotency key `key` with `value` for `ttl`: `None` when
    /// claimed now, else the claim that holds it.
    pub fn claim_idempotency(&self, key: &str, value: &str, ttl: Duration) -> Option<String> {
        let mut s = self.lock();
        let now = now_ms();
        if s.claims.len() >= MAX_TASKS {
            s.claims.retain(|_, (_, until)| *until > now);
        }
        match s.claims.get(key) {
            Some((held, until)) if *until > now => Some(held.clone()),
            _ => {
                s.claims.insert(
                    key.to_owned(),
                    (value.to_owned(), now.saturating_add(millis(ttl))),
                );
                None
            }
        }
    }

    /// Which of `keys` are claimed idempotency keys.
    pub fn idempotency_claimed(&self, keys: &[String]) -> Vec<bool> {
        let s = self.lock();
        let now = now_ms();
        keys.iter()
            .map(|k| s.claims.get(k).is_some_and(|(_, until)| *until > now))
            .collect()
    }

    /// Replaces claim `old` of `key` with `new` (empty: deletes it) if it
    /// still holds `old`.
    pub fn swap_idempotency(&self, key: &str, old: &str, new: &str, ttl: Duration) -> bool {
        let mut s = self.lock();
        let now = now_ms();
        match s.claims.get(key) {
            Some((held, until)) if *until > now && held == old => {}
            _ => return false,
        }
        if new.is_empty() {
            s.claims.remove(key);
        } else {
            s.claims.insert(
                key.to_owned(),
                (new.to_owned(), now.saturating_add(millis(ttl))),
            );
        }
        true
    }

    /// Up to `count` of `queue`'s dead-lettered ids, oldest first.
    pub fn dead_letters(&self, queue: &QueueName, count: usize) -> Vec<String> {
        self.lock()
            .queues
            .get(queue)
            .map(|q| q.dead.by_rank(0, count))
            .unwrap_or_default()
    }

    /// Hands a running task back to its queue at once, giving its attempt
    /// back; `false` when fenced.
    pub fn release(&self, id: &TaskId, token: u32, log: &str, limits: TaskLimits) -> Result<bool> {
        let mut entry: serde_json::Map<String, serde_json::Value> = serde_json::from_str(log)
            .map_err(|e| {
                StoreError::Backend(format!("attempt log entry is not a JSON object: {e}"))
            })?;
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = now_ms();
        let Some(e) = s.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return Ok(false);
        };
        let q = s.queues.entry(id.queue()).or_default();
        q.leases.remove(id.as_str());
        entry.insert("ended_ms".into(), now.into());
        e.task
            .log
            .push(serde_json::Value::Object(entry).to_string());
        e.task.attempts = e.task.attempts.saturating_sub(1);
        e.task.state = State::Queued;
        e.task.worker = None;
        e.task.progress = None;
        e.lease_until = 0;
        q.ready.add(
            id.as_str(),
            e.task.priority.band() as i64 * BAND + e.task.created_ms,
        );
        push_event(q, &mut s.last_event, limits, &e.task, None, now);
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        Ok(true)
    }

    /// Records progress (JSON); `false` when fenced.
    pub fn progress(&self, id: &TaskId, token: u32, progress: &str, limits: TaskLimits) -> bool {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(e) = s.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return false;
        };
        e.task.progress = Some(progress.to_owned());
        let q = s.queues.entry(id.queue()).or_default();
        push_event(
            q,
            &mut s.last_event,
            limits,
            &e.task,
            Some(progress),
            now_ms(),
        );
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        true
    }

    /// Ends the attempt held with `token`; the new state, or `None` when
    /// fenced. `log` is the attempt's log entry (a JSON object).
    pub fn finish(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        limits: TaskLimits,
    ) -> Result<Option<State>> {
        // everything that can fail comes before the first write
        let mut entry: serde_json::Map<String, serde_json::Value> = serde_json::from_str(log)
            .map_err(|e| {
                StoreError::Backend(format!("attempt log entry is not a JSON object: {e}"))
            })?;
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = now_ms();
        let queue = id.queue();
        let Some(e) = s.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return Ok(None);
        };
        let q = s.queues.entry(queue.clone()).or_default();
        let outcome = match outcome {
            Outcome::Retry { error, .. } if e.budget_spent() => Outcome::Failed(error.clone()),
            other => other.clone(),
        };
        // a cancel asked for while it ran: any end but success is the cancel's
        let outcome = match (&e.cancel, outcome) {
            (Some(reason), o) if !matches!(o, Outcome::Succeeded(_)) => Outcome::Cancelled(
                serde_json::json!({ "message": format!("cancelled: {reason}"), "retryable": false })
                    .to_string(),
            ),
            (_, o) => o,
        };
        q.leases.remove(id.as_str());
        entry.insert("ended_ms".into(), now.into());
        if let Outcome::Retry { delay, .. } = &outcome {
            entry.insert(
                "retry_at_ms".into(),
                now.saturating_add(millis(*delay)).into(),
            );
        }
        e.task
            .log
            .push(serde_json::Value::Object(entry).to_string());
        e.task.worker = None;
        e.lease_until = 0;
        let state = match outcome {
            Outcome::Retry { error, delay } => {
                q.count(Count::Retried);
                e.task.state = State::Scheduled;
                e.task.error = Some(error);
                q.scheduled
                    .add(id.as_str(), now.saturating_add(millis(delay)));
                push_event(q, &mut s.last_event, limits, &e.task, None, now);
                State::Scheduled
            }
            Outcome::Succeeded(result) => {
                e.task.state = State::Succeeded;
                e.task.result = Some(result);
                // a success supersedes the errors of earlier attempts
                e.task.error = None;
                State::Succeeded
            }
            Outcome::Failed(error) => {
                e.task.state = State::Failed;
                e.task.error = Some(error);
                State::Failed
            }
            Outcome::TimedOut(error) => {
                e.task.state = State::TimedOut;
                e.task.error = Some(error);
                State::TimedOut
            }
            Outcome::Cancelled(error) => {
                e.task.state = State::Cancelled;
                e.task.error = Some(error);
                State::Cancelled
            }
        };
        if state.is_final() {
            e.task.finished_ms = Some(now);
            q.count_end(state);
            push_event(q, &mut s.last_event, limits, &e.task, None, now);
            s.end(&queue, id.as_str(), limits, now);
        }
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        Ok(Some(state))
    }

    /// Recovers `queue`'s lapsed leases (back to ready while retries remain
    /// and acks are late, else FAILED; past the hard limit TIMED_OUT), queues
    /// its due scheduled tasks, and forgets expired results. How many tasks
    /// moved.
    pub fn recover(&self, queue: &QueueName, acks_late: bool, limits: TaskLimits) -> u64 {
        let mut guard = self.lock();
        let s = &mut *guard;
        let now = now_ms();
        s.purge_expired(now);
        let due = s.promote_due(queue, limits, now);
        let q = s.queues.entry(queue.clone()).or_default();
        let lapsed = q.leases.up_to(now, BATCH);
        let mut ended = Vec::new();
        for id in &lapsed {
            q.leases.remove(id);
            let Some(e) = s
                .tasks
                .get_mut(id)
                .filter(|e| e.task.state == State::Running)
            else {
                continue;
            };
            let state = if e.cancel.is_some() {
                State::Cancelled
            } else if e.hard_until > 0 && e.hard_until <= now {
                State::TimedOut
            } else if acks_late && !e.budget_spent() {
                State::Queued
            } else {
                State::Failed
            };
            e.task.log.push(
                serde_json::json!({
                    "attempt": e.task.attempts,
                    "worker": e.task.worker,
                    "ended_ms": now,
                    "outcome": "lost",
                    "error": "worker lost: lease lapsed",
                })
                .to_string(),
            );
            e.task.worker = None;
            e.lease_until = 0;
            e.task.state = state;
            q.count(Count::Lost);
            if state == State::Queued {
                q.ready.add(id, e.task.priority.band() as i64 * BAND + now);
            } else {
                q.count_end(state);
                let why = match (&e.cancel, state) {
                    (Some(reason), State::Cancelled) => format!("cancelled: {reason}"),
                    (_, State::TimedOut) => "hard time limit reached".to_owned(),
                    _ => "worker lost: lease lapsed".to_owned(),
                };
                e.task.error =
                    Some(serde_json::json!({ "message": why, "retryable": false }).to_string());
                e.task.finished_ms = Some(now);
                ended.push(id.clone());
            }
            push_event(q, &mut s.last_event, limits, &e.task, None, now);
        }
        for id in &ended {
            s.end(queue, id, limits, now);
        }
        let last = s.last_event;
        drop(guard);
        self.announce(last);
        lapsed.len() as u64 + due
    }

    /// Removes `queue`'s tasks that ended before `before_ms` (history,
    /// stored results; at most 1000 per call) except dead letters that
    /// ended at or after `dead_before_ms`, and forgets expired results, as
    /// `trim.lua` does. The event log is capped as it is written.
    pub fn trim(&self, queue: &QueueName, before_ms: i64, dead_before_ms: i64) -> Trimmed {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.purge_expired(now_ms());
        let Some(q) = s.queues.get_mut(queue) else {
            return Trimmed::default();
        };
        let kept = |id: &str| {
            q.dead
                .scores
                .get(id)
                .is_some_and(|at| *at >= dead_before_ms)
        };
        let old: Vec<String> = q
            .history
            .by_score
            .iter()
            .take_while(|(at, _)| *at < before_ms)
            .filter(|(_, id)| !kept(id))
            .take(1000)
            .map(|(_, id)| id.clone())
            .collect();
        let dead = q.dead.up_to(dead_before_ms - 1, usize::MAX);
        for id in &old {
            q.history.remove(id);
            q.history_data.remove(id);
        }
        for id in &dead {
            q.dead.remove(id);
        }
        for id in old.iter().chain(&dead) {
            if s.tasks.get(id).is_some_and(|e| e.task.state.is_final()) {
                s.tasks.remove(id);
            }
        }
        Trimmed {
            history: old.len() as u64,
            dead: dead.len() as u64,
            events: 0,
        }
    }

    /// Records a worker pool as alive for `ttl`.
    pub fn announce_worker(&self, record: &WorkerRecord, ttl: Duration) {
        let mut s = self.lock();
        let now = now_ms();
        s.workers.retain(|_, (_, until)| *until > now);
        s.workers.insert(
            record.id.clone(),
            (record.clone(), now.saturating_add(millis(ttl))),
        );
    }

    /// Removes a stopping worker pool's record.
    pub fn retire_worker(&self, id: &str) {
        self.lock().workers.remove(id);
    }

    /// The worker pools whose records have not expired, oldest report first.
    pub fn list_workers(&self) -> Vec<WorkerRecord> {
        let s = self.lock();
        let now = now_ms();
        let mut live: Vec<WorkerRecord> = s
            .workers
            .values()
            .filter(|(_, until)| *until > now)
            .map(|(r, _)| r.clone())
            .collect();
        live.sort_by(|a, b| a.seen_ms.cmp(&b.seen_ms).then_with(|| a.id.cmp(&b.id)));
        live
    }

    /// Counts of what the store holds.
    pub fn usage(&self) -> serde_json::Value {
        let s = self.lock();
        let events: usize = s.queues.values().map(|q| q.events.len()).sum();
        let history: u64 = s.queues.values().map(|q| q.history.len()).sum();
        serde_json::json!({
            "kind": "embedded",
            "tasks": s.tasks.len(),
            "max_tasks": MAX_TASKS,
            "history_entries": history,
            "events": events,
        })
    }

    /// Reads a task and its attempt log; `None` once it has expired.
    pub fn get(&self, id: &TaskId) -> Option<Task> {
        let s = self.lock();
        s.tasks
            .get(id.as_str())
            .filter(|e| e.live(now_ms()))
            .map(|e| e.task.clone())
    }

    /// Up to `count` active tasks of `queue` from position `offset` of set
    /// `set` (0 running, 1 queued, 2 scheduled), and where to go on.
    pub fn list_active(
        &self,
        queue: &QueueName,
        mut set: usize,
        mut offset: u64,
        count: usize,
    ) -> (Vec<Task>, Option<(usize, u64)>) {
        let s = self.lock();
        let Some(q) = s.queues.get(queue) else {
            return (Vec::new(), None);
        };
        let sets = [&q.leases, &q.ready, &q.scheduled, &q.pending];
        let mut tasks = Vec::new();
        while set < sets.len() && tasks.len() < count {
            let want = count - tasks.len();
            let ids = sets[set].by_rank(offset, want);
            let got = ids.len();
            tasks.extend(
                ids.iter()
                    .filter_map(|id| s.tasks.get(id))
                    .map(|e| e.task.clone()),
            );
            if got < want {
                set += 1;
                offset = 0;
            } else {
                offset += got as u64;
            }
        }
        (tasks, (set < sets.len()).then_some((set, offset)))
    }

    /// History entries of `queue`, as [`super::super::tasks::TaskStore::history_page`].
    pub fn history_page(
        &self,
        queue: &QueueName,
        max_ms: i64,
        below_id: Option<&str>,
        min_ms: i64,
        count: usize,
    ) -> Vec<(String, i64, String)> {
        let s = self.lock();
        let Some(q) = s.queues.get(queue) else {
            return Vec::new();
        };
        // ties at max_ms not yet shown, then older entries
        let ties = q
            .history
            .rev_range(max_ms, max_ms.saturating_add(1))
            .filter(|(_, id)| below_id.is_none_or(|b| *id < b));
        let older = q.history.rev_range(min_ms, max_ms).take(count);
        let mut entries: Vec<(i64, &str)> =
            ties.chain(older).filter(|(ms, _)| *ms >= min_ms).collect();
        entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(a.1)));
        entries.truncate(count);
        entries
            .into_iter()
            .filter_map(|(ms, id)| {
                let summary = q.history_data.get(id)?;
                Some((id.to_owned(), ms, summary.clone()))
            })
            .collect()
    }

    /// `queue`'s depths, oldest wait and outcome counters.
    pub fn queue_stats(&self, queue: &QueueName) -> QueueStats {
        let s = self.lock();
        let Some(q) = s.queues.get(queue) else {
            return QueueStats::default();
        };
        let oldest = (0..4i64)
            .filter_map(|b| {
                q.ready
                    .first_from(b * BAND)
                    .filter(|score| *score < (b + 1) * BAND)
                    .map(|score| score - b * BAND)
            })
            .min();
        QueueStats {
            ready: q.ready.len(),
            scheduled: q.scheduled.len(),
            running: q.leases.len(),
            dead: q.dead.len(),
            pending: q.pending.len(),
            oldest_wait: oldest
                .map(|queued| Duration::from_millis((now_ms() - queued).max(0) as u64)),
            counts: q.counts,
        }
    }

    /// A reader of `queue`'s events after position `after`, or from now on.
    pub fn event_reader(
        &self,
        queue: &QueueName,
        after: Option<&str>,
    ) -> Result<MemoryEventReader> {
        let last = match after {
            Some(position) => {
                let last = position.parse::<u64>().map_err(|_| {
                    StoreError::InvalidCursor(format!(
                        "event position {} was not issued by the embedded store",
                        crate::quote::quote(position)
                    ))
                })?;
                let trimmed = self.lock().queues.get(queue).map_or(0, |q| q.trimmed_upto);
                if trimmed > last {
                    return Err(StoreError::Expired(format!(
                        "events after position {position} are no longer kept; watch again without a resume token"
                    )));
                }
                last
            }
            None => self.lock().last_event,
        };
        Ok(MemoryEventReader {
            tasks: self.clone(),
            queue: queue.clone(),
            last,
            changes: self.shared.events.subscribe(),
        })
    }
}

/// Follows one queue's event log in the embedded store.
pub struct MemoryEventReader {
    tasks: MemoryTasks,
    queue: QueueName,
    last: u64,
    changes: watch::Receiver<u64>,
}

impl MemoryEventReader {
    /// The position after the last event read.
    pub fn position(&self) -> String {
        self.last.to_string()
    }

    /// The next events, at most `max`, waiting up to `block` for some
    /// (empty after that).
    pub async fn next(&mut self, block: Duration, max: usize) -> Vec<TaskEvent> {
        let until = tokio::time::Instant::now() + block;
        loop {
            // Marked seen before reading, so that an event appended after the
            // read wakes the wait below.
            self.changes.borrow_and_update();
            let events = self.read(max);
            if !events.is_empty() {
                return events;
            }
            match tokio::time::timeout_at(until, self.changes.changed()).await {
                Ok(Ok(())) => {}
                // timed out, or the store is gone
                _ => return Vec::new(),
            }
        }
    }

    fn read(&mut self, max: usize) -> Vec<TaskEvent> {
        let s = self.tasks.lock();
        let Some(q) = s.queues.get(&self.queue) else {
            return Vec::new();
        };
        let from = q.events.partition_point(|(seq, _)| *seq <= self.last);
        let events: Vec<TaskEvent> = q
            .events
            .range(from..)
            .take(max)
            .map(|(_, e)| e.clone())
            .collect();
        if let Some(e) = events.last() {
            self.last = e.stream_id.parse().unwrap_or(self.last);
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zset_orders_by_score_then_member_and_trims_the_lowest() {
        let mut z = ZSet::default();
        z.add("b", 2);
        z.add("a", 2);
        z.add("c", 1);
        z.add("c", 3);
        assert_eq!(z.by_rank(0, 10), ["a", "b", "c"]);
        assert_eq!(z.up_to(2, 10), ["a", "b"]);
        z.update("zz", 0);
        assert_eq!(z.len(), 3, "update never adds");
        let hist: Vec<_> = z
            .rev_range(2, 4)
            .map(|(s, id)| (s, id.to_owned()))
            .collect();
        assert_eq!(
            hist,
            [(3, "c".to_owned()), (2, "b".into()), (2, "a".into())]
        );
        assert_eq!(z.trim(1), ["a", "b"]);
        assert!(z.remove("c"));
        assert!(!z.remove("c"));
        assert_eq!(z.len(), 0);
    }
}
