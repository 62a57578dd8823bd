//! The embedded store's transitions, each a method on the locked state
//! ([`Tasks`]) given the store's now: what each does is specified once, on
//! [`crate::store::tasks::TaskBackend`]; these follow the Redis scripts
//! (`../../redis/lua/tasks/*.lua`) step for step.

use std::collections::HashSet;
use std::time::Duration;

use super::MAX_TASKS;
use super::expiry::expire_retry;
use super::flow::{Call, Flow, Verdict};
use super::state::{BATCH, Entry, Tasks, lease_score, millis, push_event};
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::domain::{Count, Outcome, Pause};
use crate::store::tasks::{
    Beat, CancelReply, DependReply, Leased, Recovered, RetryReply, TakeOver, TaskLimits, Trimmed,
};
use crate::store::{Result, StoreError};

impl Tasks {
    /// See [`TaskBackend::submit`](crate::store::tasks::TaskBackend::submit).
    pub(super) fn submit(
        &mut self,
        task: &Task,
        delay: Duration,
        limits: TaskLimits,
        now: i64,
    ) -> Result<()> {
        let id = task.id.as_str();
        if self.tasks.contains_key(id) {
            return Err(StoreError::Backend(format!("task {id} already exists")));
        }
        if self.tasks.len() >= MAX_TASKS {
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
        let mut entry = Entry::new(task, HashSet::new());
        let q = self.queues.entry(queue.clone()).or_default();
        if delay > 0 {
            q.scheduled.add(id, now.saturating_add(delay));
        } else {
            q.ready
                .add(id, self.flow.enter_ready(&queue, &mut entry, now));
        }
        if let Some(at) = entry.task.expire_ms {
            q.expiring.add(id, at);
        }
        q.count(Count::Submitted);
        push_event(q, &mut self.last_event, limits, &entry.task, None, now);
        self.tasks.insert(id.to_owned(), entry);
        Ok(())
    }
    /// See [`TaskBackend::submit_pending`](crate::store::tasks::TaskBackend::submit_pending).
    /// Dependencies that ended meanwhile release it at once.
    pub(super) fn submit_pending(
        &mut self,
        task: &Task,
        waiting: &[TaskId],
        limits: TaskLimits,
        now: i64,
    ) -> Result<()> {
        // nothing to wait on: queued, as submit.lua does with no dependencies
        if waiting.is_empty() {
            return self.submit(task, Duration::ZERO, limits, now);
        }
        let id = task.id.as_str();
        if self.tasks.contains_key(id) {
            return Err(StoreError::Backend(format!("task {id} already exists")));
        }
        if self.tasks.len() >= MAX_TASKS {
            return Err(StoreError::OutOfMemory(format!(
                "the embedded store holds {MAX_TASKS} tasks, its limit: wait for results to expire, or use Redis (REDIS_URL)"
            )));
        }
        let mut task = task.clone();
        task.created_ms = now;
        task.state = State::Pending;
        let q = self.queues.entry(task.id.queue()).or_default();
        q.pending.add(id, now);
        if let Some(at) = task.expire_ms {
            q.expiring.add(id, at);
        }
        q.count(Count::Submitted);
        push_event(q, &mut self.last_event, limits, &task, None, now);
        let waiting_on = waiting.iter().map(|w| w.to_string()).collect();
        self.tasks
            .insert(id.to_owned(), Entry::new(task, waiting_on));
        // a dependency that ended between its registration and now
        for dep in waiting {
            if let Some(state) = self
                .tasks
                .get(dep.as_str())
                .map(|e| e.task.state)
                .filter(|st| st.is_final())
            {
                self.dependents
                    .entry(dep.to_string())
                    .or_default()
                    .insert(id.to_owned());
                self.release_dependents(dep.as_str(), state, limits, now);
            }
        }
        Ok(())
    }
    /// See [`TaskBackend::depend_on`](crate::store::tasks::TaskBackend::depend_on).
    pub(super) fn depend_on(&mut self, id: &TaskId, dependent: &TaskId, now: i64) -> DependReply {
        let state = match self.tasks.get(id.as_str()).filter(|e| e.live(now)) {
            None => return DependReply::Missing,
            Some(e) => e.task.state,
        };
        if state.is_final() {
            return DependReply::Ended(state);
        }
        // a set, as `:dependents` on Redis: registering twice (a retried
        // call) lists it once
        self.dependents
            .entry(id.to_string())
            .or_default()
            .insert(dependent.to_string());
        DependReply::Waiting
    }
    /// See [`TaskBackend::lease`](crate::store::tasks::TaskBackend::lease).
    pub(super) fn lease(
        &mut self,
        queue: &QueueName,
        worker: &str,
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        now: i64,
    ) -> Leased {
        self.promote_due(queue, limits, now);
        // a paused queue hands out nothing (due tasks still became QUEUED)
        if self.queues.get(queue).is_some_and(|q| q.paused.is_some()) {
            return Leased::Empty;
        }
        let Scan {
            chosen,
            stale,
            expired,
            call,
        } = scan_ready(self, queue, names, limits, now);
        let q = self.queues.entry(queue.clone()).or_default();
        for id in &stale {
            q.ready.remove(id);
        }
        if let Some(id) = &chosen {
            // it starts in time: it no longer expires (until it waits again)
            q.expiring.remove(id);
        }
        for id in &expired {
            self.end_expired(queue, id, limits, now);
        }
        self.apply_flow(queue, &call, limits, now);
        let mut leased = call.outcome();
        // started: a later submit with its debounce key makes a new task
        if let Some(id) = &chosen {
            self.forget_debounce(queue, id);
        }
        let q = self.queues.entry(queue.clone()).or_default();
        if let Some(id) = chosen
            && let Some(e) = self.tasks.get_mut(&id)
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
            push_event(q, &mut self.last_event, limits, &e.task, None, now);
            self.flow.admit(queue, &e.task, e.vt, limits, now);
            // as on Redis: the leased task comes without its attempt log
            leased = Leased::Task(Box::new(Task {
                log: Vec::new(),
                ..e.task.clone()
            }));
        }
        leased
    }
    /// See [`TaskBackend::heartbeat`](crate::store::tasks::TaskBackend::heartbeat).
    pub(super) fn heartbeat(&mut self, id: &TaskId, token: u32, lease: Duration, now: i64) -> Beat {
        let Some(e) = self.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return Beat::Lost;
        };
        e.lease_until = now.saturating_add(millis(lease));
        let score = lease_score(e.lease_until, e.hard_until);
        let cancel = e.cancel.clone();
        if let Some(q) = self.queues.get_mut(&id.queue()) {
            q.leases.update(id.as_str(), score);
        }
        match cancel {
            Some(reason) => Beat::CancelRequested(reason),
            None => Beat::Held,
        }
    }
    /// See [`TaskBackend::take_over`](crate::store::tasks::TaskBackend::take_over).
    pub(super) fn take_over(
        &mut self,
        id: &TaskId,
        token: u32,
        worker: &str,
        lease: Duration,
        now: i64,
    ) -> TakeOver {
        let Some(e) = self.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return TakeOver::Lost;
        };
        // (a token at its end fences every claim, as on Redis, whose next
        // token would not parse)
        let Some(next) = token.checked_add(1) else {
            return TakeOver::Lost;
        };
        e.task.token = next;
        e.task.takeovers = e.task.takeovers.saturating_add(1);
        e.task.worker = Some(worker.to_owned());
        let token = e.task.token;
        match self.heartbeat(id, token, lease, now) {
            Beat::Held => TakeOver::Taken {
                token,
                cancel: None,
            },
            Beat::CancelRequested(reason) => TakeOver::Taken {
                token,
                cancel: Some(reason),
            },
            Beat::Lost => TakeOver::Lost,
        }
    }

    /// See [`TaskBackend::cancel`](crate::store::tasks::TaskBackend::cancel).
    pub(super) fn cancel(
        &mut self,
        id: &TaskId,
        reason: &str,
        limits: TaskLimits,
        now: i64,
    ) -> CancelReply {
        let queue = id.queue();
        let Some(e) = self.tasks.get_mut(id.as_str()).filter(|e| e.live(now)) else {
            return CancelReply::Missing;
        };
        let q = self.queues.entry(queue.clone()).or_default();
        match e.task.state {
            State::Running => {
                if e.cancel.is_none() {
                    e.cancel = Some(reason.to_owned());
                    push_event(q, &mut self.last_event, limits, &e.task, None, now);
                }
                return CancelReply::Requested;
            }
            State::Queued | State::Scheduled | State::Pending => {}
            ended => return CancelReply::Ended(ended),
        }
        q.ready.remove(id.as_str());
        q.scheduled.remove(id.as_str());
        q.pending.remove(id.as_str());
        q.expiring.remove(id.as_str());
        e.task.state = State::Cancelled;
        e.task.finished_ms = Some(now);
        e.task.error = Some(
            serde_json::json!({ "message": format!("cancelled: {reason}"), "retryable": false })
                .to_string(),
        );
        q.count(Count::Cancelled);
        push_event(q, &mut self.last_event, limits, &e.task, None, now);
        self.end(&queue, id.as_str(), limits, now, false);
        CancelReply::Cancelled
    }
    /// See [`TaskBackend::set_pause`](crate::store::tasks::TaskBackend::set_pause):
    /// an existing pause stays as it was; the pause now in force.
    pub(super) fn set_pause(&mut self, queue: &QueueName, pause: Option<&Pause>) -> Option<Pause> {
        let q = self.queues.entry(queue.clone()).or_default();
        match pause {
            Some(p) => Some(q.paused.get_or_insert_with(|| p.clone()).clone()),
            None => {
                q.paused = None;
                None
            }
        }
    }
    /// See [`TaskBackend::retry`](crate::store::tasks::TaskBackend::retry).
    pub(super) fn retry(&mut self, id: &TaskId, limits: TaskLimits, now: i64) -> RetryReply {
        let Some(e) = self.tasks.get_mut(id.as_str()).filter(|e| e.live(now)) else {
            // its result expired: a dead letter that can no longer run is
            // dropped
            if let Some(q) = self.queues.get_mut(&id.queue()) {
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
        let q = self.queues.entry(id.queue()).or_default();
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
        // an operator's requeue runs it whenever it can: its expiry is dropped
        e.task.expire_ms = None;
        q.ready
            .add(id.as_str(), self.flow.enter_ready(&id.queue(), e, now));
        q.count(Count::Requeued);
        push_event(q, &mut self.last_event, limits, &e.task, None, now);
        RetryReply::Queued
    }
    /// See [`TaskBackend::release`](crate::store::tasks::TaskBackend::release).
    pub(super) fn release(
        &mut self,
        id: &TaskId,
        token: u32,
        log: &str,
        limits: TaskLimits,
        now: i64,
    ) -> Result<bool> {
        let mut entry: serde_json::Map<String, serde_json::Value> = serde_json::from_str(log)
            .map_err(|e| {
                StoreError::Backend(format!("attempt log entry is not a JSON object: {e}"))
            })?;
        let Some(e) = self.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return Ok(false);
        };
        let q = self.queues.entry(id.queue()).or_default();
        q.leases.remove(id.as_str());
        self.flow.stop(&e.task);
        entry.insert("ended_ms".into(), now.into());
        e.task
            .log
            .push(serde_json::Value::Object(entry).to_string());
        e.task.attempts = e.task.attempts.saturating_sub(1);
        e.task.state = State::Queued;
        e.task.worker = None;
        e.task.progress = None;
        e.lease_until = 0;
        // back at its place: its turn, or its submit time
        q.ready.add(id.as_str(), Flow::back_in_ready(e));
        // waiting again: it may expire again (the lease ends it if it has)
        if let Some(at) = e.task.expire_ms {
            q.expiring.add(id.as_str(), at);
        }
        push_event(q, &mut self.last_event, limits, &e.task, None, now);
        Ok(true)
    }
    /// See [`TaskBackend::progress`](crate::store::tasks::TaskBackend::progress).
    pub(super) fn progress(
        &mut self,
        id: &TaskId,
        token: u32,
        progress: &str,
        limits: TaskLimits,
        now: i64,
    ) -> bool {
        let Some(e) = self.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return false;
        };
        e.task.progress = Some(progress.to_owned());
        let q = self.queues.entry(id.queue()).or_default();
        push_event(
            q,
            &mut self.last_event,
            limits,
            &e.task,
            Some(progress),
            now,
        );
        true
    }
    /// See [`TaskBackend::finish`](crate::store::tasks::TaskBackend::finish).
    /// Dependents are released here, as the task ends.
    pub(super) fn finish(
        &mut self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        limits: TaskLimits,
        now: i64,
    ) -> Result<Option<State>> {
        // everything that can fail comes before the first write
        let mut entry: serde_json::Map<String, serde_json::Value> = serde_json::from_str(log)
            .map_err(|e| {
                StoreError::Backend(format!("attempt log entry is not a JSON object: {e}"))
            })?;
        let queue = id.queue();
        let Some(e) = self.tasks.get_mut(id.as_str()).filter(|e| e.holds(token)) else {
            return Ok(None);
        };
        let q = self.queues.entry(queue.clone()).or_default();
        let outcome = expire_retry(e.decide(outcome), e.task.expire_ms, now);
        q.leases.remove(id.as_str());
        self.flow.stop(&e.task);
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
        q.times.record(&e.task, true, now);
        let state = match outcome {
            Outcome::Retry { error, delay } => {
                q.count(Count::Retried);
                e.task.state = State::Scheduled;
                e.task.error = Some(error);
                q.scheduled
                    .add(id.as_str(), now.saturating_add(millis(delay)));
                // waiting out its backoff, it may expire again
                if let Some(at) = e.task.expire_ms {
                    q.expiring.add(id.as_str(), at);
                }
                push_event(q, &mut self.last_event, limits, &e.task, None, now);
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
            push_event(q, &mut self.last_event, limits, &e.task, None, now);
            self.end(&queue, id.as_str(), limits, now, true);
        }
        Ok(Some(state))
    }
    /// See [`TaskBackend::recover`](crate::store::tasks::TaskBackend::recover).
    /// Expired results are forgotten here too.
    pub(super) fn recover(
        &mut self,
        queue: &QueueName,
        acks_late: bool,
        limits: TaskLimits,
        now: i64,
    ) -> Recovered {
        self.purge_expired(now);
        self.flow.prune(queue, now);
        let due = self.promote_due(queue, limits, now);
        // counted apart, as on Redis (see recover.lua); their dependents are
        // released after the batch, here
        let expired = self.sweep_expired(queue, limits, now);
        let q = self.queues.entry(queue.clone()).or_default();
        let lapsed = q.leases.up_to(now, BATCH);
        let mut ended = Vec::new();
        for id in &lapsed {
            q.leases.remove(id);
            let Some(e) = self
                .tasks
                .get_mut(id)
                .filter(|e| e.task.state == State::Running)
            else {
                continue;
            };
            let state = if e.cancel.is_some() {
                State::Cancelled
            } else if e.hard_until > 0 && e.hard_until <= now && e.lease_until >= e.hard_until {
                // the limit came while the lease held; see recover.lua
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
            self.flow.stop(&e.task);
            q.times.record(&e.task, false, now);
            e.task.state = state;
            q.count(Count::Lost);
            if state == State::Queued {
                q.ready.add(id, self.flow.enter_ready(queue, e, now));
                // waiting again, it may expire again (the lease ends it if it has)
                if let Some(at) = e.task.expire_ms {
                    q.expiring.add(id, at);
                }
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
            push_event(q, &mut self.last_event, limits, &e.task, None, now);
        }
        for id in &ended {
            self.end(queue, id, limits, now, true);
        }
        Recovered {
            handled: lapsed.len() as u64 + due,
            expired,
            release: Vec::new(),
        }
    }
    /// See [`TaskBackend::trim`](crate::store::tasks::TaskBackend::trim).
    /// Expired results are forgotten here too; the event log is capped as it is
    /// written.
    pub(super) fn trim(
        &mut self,
        queue: &QueueName,
        before_ms: i64,
        dead_before_ms: i64,
        now: i64,
    ) -> Trimmed {
        self.purge_expired(now);
        let Some(q) = self.queues.get_mut(queue) else {
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
            if self.tasks.get(id).is_some_and(|e| e.task.state.is_final()) {
                self.tasks.remove(id);
            }
        }
        Trimmed {
            history: old.len() as u64,
            dead: dead.len() as u64,
            events: 0,
        }
    }
}

/// What a lease's scan of the ready set found.
struct Scan {
    /// The task to lease.
    chosen: Option<String>,
    /// Entries whose task is gone or moved on: dropped.
    stale: Vec<String>,
    /// Queued tasks past their expiry: ended, never leased.
    expired: Vec<String>,
    /// What the limits held or ended on the way.
    call: Call,
}

/// The first ready task served among the first `lease_scan` queued ones,
/// in order, as lease.lua scans. Stale entries (gone, or moved on) seen on
/// the way do not count against the scan; nor do the first [`BATCH`]
/// expired ones (more do, which bounds the call's work), so a pile of them
/// cannot hide the live tasks behind it. An expired task is never chosen:
/// one that no task waits on is to be ended; one that others wait on is
/// left to the sweep (as on Redis, where the sweep's repair releases them).
/// A candidate the worker serves is then put to the limits
/// ([`Tasks::verdict`]): one they hold (or a cap ends) is passed over, and
/// like expired ones the first [`BATCH`] of those take no place of the
/// scan; the queue's own rate limit ends the scan.
fn scan_ready(s: &Tasks, queue: &QueueName, names: &[&str], limits: TaskLimits, now: i64) -> Scan {
    let serves = |name: &str| names.iter().any(|n| *n == "*" || *n == name);
    let mut scan = Scan {
        chosen: None,
        stale: Vec::new(),
        expired: Vec::new(),
        call: Call::default(),
    };
    let Some(q) = s.queues.get(queue) else {
        return scan;
    };
    let (mut looked, mut expired_seen) = (0, 0);
    for (_, id) in q.ready.by_score.iter() {
        if looked >= limits.lease_scan {
            break;
        }
        match s.tasks.get(id) {
            Some(e) if e.task.state != State::Queued => scan.stale.push(id.clone()),
            None => scan.stale.push(id.clone()),
            Some(e) if e.task.expire_ms.is_some_and(|at| at <= now) => {
                expired_seen += 1;
                if !s.dependents.contains_key(id) {
                    scan.expired.push(id.clone());
                }
                if expired_seen > BATCH {
                    looked += 1;
                }
            }
            Some(e) if !serves(&e.task.name) => looked += 1,
            // held by a limit (or ended by a cap): the scan goes on
            Some(e) => match s.verdict(&mut scan.call, queue, &e.task, limits, now) {
                Verdict::Admit => {
                    scan.chosen = Some(id.clone());
                    break;
                }
                Verdict::QueueHeld => break,
                Verdict::Hold | Verdict::Cancel => {
                    looked += u64::from(scan.call.counts_against_scan());
                }
            },
        }
    }
    scan
}
