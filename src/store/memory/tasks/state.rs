//! The embedded store's state under its lock: Redis's shapes on purpose
//! (sorted sets of ids per queue, a capped event log per queue, counters
//! per outcome), so that the code above cannot tell the stores apart, and
//! the steps the transitions share (promoting due tasks, ending a task,
//! releasing its dependents, forgetting expired results).

use indexmap::IndexSet;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::time::Duration;

use crate::domain::task::{QueueName, State, Task};
use crate::domain::{Count, Counts, Outcome};
use crate::store::tasks::{BAND_WIDTH, TaskEvent, TaskLimits, WorkerRecord};

/// Width of one priority band in a ready score (see [`BAND_WIDTH`]).
pub(super) const BAND: i64 = BAND_WIDTH as i64;

/// Due tasks or lapsed leases one call handles, as on Redis.
pub(super) const BATCH: usize = 100;

/// Expired results purged per recovery call.
pub(super) const PURGE_BATCH: usize = 1000;

/// A sorted set of task ids (Redis's ZSET): ordered by score then id.
#[derive(Default)]
pub(super) struct ZSet {
    pub(super) by_score: BTreeSet<(i64, String)>,
    pub(super) scores: HashMap<String, i64>,
}

impl ZSet {
    pub(super) fn add(&mut self, id: &str, score: i64) {
        if let Some(old) = self.scores.insert(id.to_owned(), score) {
            self.by_score.remove(&(old, id.to_owned()));
        }
        self.by_score.insert((score, id.to_owned()));
    }

    /// Updates the score of a member only (`ZADD XX`).
    pub(super) fn update(&mut self, id: &str, score: i64) {
        if self.scores.contains_key(id) {
            self.add(id, score);
        }
    }

    pub(super) fn remove(&mut self, id: &str) -> bool {
        match self.scores.remove(id) {
            Some(score) => self.by_score.remove(&(score, id.to_owned())),
            None => false,
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.scores.len() as u64
    }

    /// Members with a score at most `max`, lowest first, `limit` at most.
    pub(super) fn up_to(&self, max: i64, limit: usize) -> Vec<String> {
        self.by_score
            .iter()
            .take_while(|(score, _)| *score <= max)
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Members by rank: `count` from `offset`, lowest first.
    pub(super) fn by_rank(&self, offset: u64, count: usize) -> Vec<String> {
        self.by_score
            .iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(count)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Members with a score in `[min, max)`, highest first, with scores.
    pub(super) fn rev_range(&self, min: i64, max: i64) -> impl Iterator<Item = (i64, &str)> {
        self.by_score
            .range((
                Bound::Included((min, String::new())),
                Bound::Excluded((max, String::new())),
            ))
            .rev()
            .map(|(score, id)| (*score, id.as_str()))
    }

    /// The lowest member with a score of at least `min`.
    pub(super) fn first_from(&self, min: i64) -> Option<i64> {
        self.by_score
            .range((Bound::Included((min, String::new())), Bound::Unbounded))
            .next()
            .map(|(score, _)| *score)
    }

    /// Removes the lowest members beyond `cap`; the removed ids.
    pub(super) fn trim(&mut self, cap: u64) -> Vec<String> {
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
pub(super) struct Queue {
    pub(super) ready: ZSet,
    pub(super) scheduled: ZSet,
    pub(super) leases: ZSet,
    /// PENDING ids, by submit time.
    pub(super) pending: ZSet,
    pub(super) history: ZSet,
    /// Summaries of ended tasks (JSON), which outlive their results.
    pub(super) history_data: HashMap<String, String>,
    pub(super) dead: ZSet,
    /// `(sequence, event)`, oldest first, capped at the events limit.
    pub(super) events: VecDeque<(u64, TaskEvent)>,
    /// The newest event dropped by the cap: a reader resuming before it
    /// would miss events.
    pub(super) trimmed_upto: u64,
    pub(super) counts: Counts,
    /// Run and wait times of the window (not kept in snapshots).
    pub(super) times: super::times::Times,
    /// Set while the queue is paused (kept in snapshots).
    pub(super) paused: Option<crate::domain::Pause>,
    /// Debounce keys and the unstarted task holding each (kept in
    /// snapshots; see `debounce.rs`).
    pub(super) debounce: HashMap<String, String>,
    /// Waiting ids that expire, by expiry (ms), as `expiring` on Redis
    /// (not [`Tasks::expiring`], which is about ended tasks' results).
    pub(super) expiring: ZSet,
}

impl Queue {
    pub(super) fn count(&mut self, count: Count) {
        self.counts.bump(count);
    }

    /// Counts a task's end in `state`.
    pub(super) fn count_end(&mut self, state: State) {
        if let Some(c) = Count::ended(state) {
            self.counts.bump(c);
        }
    }
}

/// A stored task and its lease.
#[derive(Clone)]
pub(super) struct Entry {
    pub(super) task: Task,
    /// Why a cancel was asked for while it ran.
    pub(super) cancel: Option<String>,
    /// The dependencies a PENDING task still waits on.
    pub(super) waiting: HashSet<String>,
    /// Attempts when it was last retried by hand: the retry budget counts
    /// from there.
    pub(super) attempt_base: u32,
    pub(super) lease_until: i64,
    pub(super) hard_until: i64,
    /// When a finished task's result expires (ms).
    pub(super) expires_at: Option<i64>,
    /// A task with a fair key: the turn it last drew (see `flow.rs`), to
    /// go back to on a release.
    pub(super) vt: Option<i64>,
}

impl Entry {
    /// A new task's record, waiting on `waiting`.
    pub(super) fn new(task: Task, waiting: HashSet<String>) -> Self {
        Self {
            task,
            cancel: None,
            waiting,
            attempt_base: 0,
            lease_until: 0,
            hard_until: 0,
            expires_at: None,
            vt: None,
        }
    }

    pub(super) fn holds(&self, token: u32) -> bool {
        self.task.state == State::Running && self.task.token == token
    }

    pub(super) fn live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }

    pub(super) fn budget_spent(&self) -> bool {
        self.task.attempts.saturating_sub(self.attempt_base) > self.task.max_retries
    }

    /// What a finish reporting `outcome` ends in: a retry whose budget is
    /// spent fails; with a cancel asked for, anything but success is the
    /// cancel's (see `TaskBackend::finish`).
    pub(super) fn decide(&self, outcome: &Outcome) -> Outcome {
        let outcome = match outcome {
            Outcome::Retry { error, .. } if self.budget_spent() => Outcome::Failed(error.clone()),
            other => other.clone(),
        };
        match (&self.cancel, outcome) {
            (Some(reason), o) if !matches!(o, Outcome::Succeeded(_)) => Outcome::Cancelled(
                serde_json::json!({ "message": format!("cancelled: {reason}"), "retryable": false })
                    .to_string(),
            ),
            (_, o) => o,
        }
    }
}

#[derive(Default)]
pub(super) struct Tasks {
    pub(super) tasks: HashMap<String, Entry>,
    pub(super) queues: HashMap<QueueName, Queue>,
    /// `(expiry ms, id)` of finished tasks.
    pub(super) expiring: BTreeSet<(i64, String)>,
    /// The sequence number of the newest event (of any queue).
    pub(super) last_event: u64,
    /// Worker pools and when their records expire (ms).
    pub(super) workers: HashMap<String, (WorkerRecord, i64)>,
    /// Idempotency claims and when they expire (ms).
    pub(super) claims: HashMap<String, (String, i64)>,
    /// The key of lease secrets, once created (saved with the tasks, so
    /// that a worker re-attaching a running task to the restarted koo still
    /// proves its lease).
    pub(super) lease_key: Option<String>,
    /// The tasks waiting on each task that has not ended.
    /// A set in registration order, as `:dependents` on Redis (a set):
    /// registering twice lists a dependent once, in O(1).
    pub(super) dependents: HashMap<String, IndexSet<String>>,
    /// While `Some`, ends are not released to their dependents at once but
    /// collected here, with the caps to release them under (see
    /// [`Tasks::deferring_releases`]).
    pub(super) deferred_releases: Option<(TaskLimits, Vec<(String, State)>)>,
    /// Limits, their buckets, back-offs, running sets and fair turns.
    pub(super) flow: super::flow::Flow,
}

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The lease's score: its deadline, or the hard limit when that is sooner.
pub(super) fn lease_score(lease_until: i64, hard_until: i64) -> i64 {
    if hard_until > 0 {
        lease_until.min(hard_until)
    } else {
        lease_until
    }
}

/// Appends an event to `queue`'s log, dropping the oldest beyond the cap.
pub(super) fn push_event(
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
    pub(super) fn promote_due(&mut self, queue: &QueueName, limits: TaskLimits, now: i64) -> u64 {
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
            q.ready.add(id, self.flow.enter_ready(queue, e, now));
            push_event(q, &mut self.last_event, limits, &e.task, None, now);
        }
        due.len() as u64
    }

    /// Records a final state: history (capped), dead letters for failures,
    /// and the result's expiry (a dead letter's: the longer of the result
    /// TTL and the dead-letter TTL; one trimmed by the cap expires like a
    /// result), as `record_end` in `lib.lua`.
    /// `ran`: whether the task ran since it was last queued (not so for a
    /// cancel or a failed dependency), else its history names no start.
    pub(super) fn end(
        &mut self,
        queue: &QueueName,
        id: &str,
        limits: TaskLimits,
        now: i64,
        ran: bool,
    ) {
        self.forget_debounce(queue, id);
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
        let mut summary = serde_json::json!({
            "name": e.task.name,
            "state": state.as_str(),
            "attempts": e.task.attempts,
            "finished_ms": now,
            "category": e.task.category.as_str(),
        });
        // as on Redis: a task no schedule submitted has no `schedule` key
        if let Some(schedule) = &e.task.schedule {
            summary["schedule"] = schedule.as_str().into();
        }
        // nor one that never started a `started_ms`
        if let Some(started) = e.task.started_ms.filter(|_| ran) {
            summary["started_ms"] = started.into();
        }
        q.history_data.insert(id.to_owned(), summary.to_string());
        for old in q.history.trim(limits.history) {
            q.history_data.remove(&old);
        }
        let at = now.saturating_add(ttl);
        e.expires_at = Some(at);
        self.expiring.insert((at, id.to_owned()));
        for old in over {
            self.expire_as_result(&old);
        }
        match &mut self.deferred_releases {
            Some((_, later)) => later.push((id.to_owned(), state)),
            None => self.release_dependents(id, state, limits, now),
        }
    }

    /// Runs `f` with the release of dependents put off until it returns:
    /// finish-then-lease leases before the finished task's dependents are
    /// released, as on Redis (where the caller releases them after the
    /// call), so that one call never leases a dependent its own finish
    /// released.
    pub(super) fn deferring_releases<T>(
        &mut self,
        limits: TaskLimits,
        now: i64,
        f: impl FnOnce(&mut Self) -> T,
    ) -> T {
        self.deferred_releases = Some((limits, Vec::new()));
        let out = f(self);
        self.release_deferred(now);
        out
    }

    /// Releases the dependents of the ends [`Self::deferring_releases`]
    /// put off (under the caps it was given), and stops deferring.
    pub(super) fn release_deferred(&mut self, now: i64) {
        if let Some((limits, ends)) = self.deferred_releases.take() {
            for (id, state) in ends {
                self.release_dependents(&id, state, limits, now);
            }
        }
    }

    /// A dead letter trimmed by the cap expires `result_ttl` after it
    /// ended (at the next purge when that has passed).
    pub(super) fn expire_as_result(&mut self, id: &str) {
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
    pub(super) fn release_dependents(
        &mut self,
        id: &str,
        state: State,
        limits: TaskLimits,
        now: i64,
    ) {
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
                q.expiring.remove(&dependent);
                // past its own expiry it ends as expired, whichever of the
                // two ends it first (as resolve.lua)
                let message = if e.task.expire_ms.is_some_and(|at| at <= now) {
                    "cancelled: expired".to_owned()
                } else {
                    format!("dependency {id} ended {}", state.as_str().to_uppercase())
                };
                e.task.state = State::Cancelled;
                e.task.finished_ms = Some(now);
                e.task.error =
                    Some(serde_json::json!({ "message": message, "retryable": false }).to_string());
                q.count(Count::Cancelled);
                push_event(q, &mut self.last_event, limits, &e.task, None, now);
                self.end(&queue, &dependent, limits, now, false);
            } else if e.waiting.is_empty() {
                q.pending.remove(&dependent);
                e.task.state = State::Queued;
                q.ready
                    .add(&dependent, self.flow.enter_ready(&queue, e, now));
                push_event(q, &mut self.last_event, limits, &e.task, None, now);
            }
        }
    }

    /// Forgets up to [`PURGE_BATCH`] tasks whose results have expired.
    pub(super) fn purge_expired(&mut self, now: i64) {
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
