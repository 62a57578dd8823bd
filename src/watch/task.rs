//! The single-task watch (`WatchTask`): a task as it is now, then after
//! each change, until it ends.
//!
//! The watcher follows the task's queue feed for events of that task only,
//! and re-reads the task on each: every event is shown with the state it
//! recorded (a lease moves a task through QUEUED and RUNNING in one step,
//! and both are shown), the other fields from the fresh read. When events
//! were dropped (its buffer overflowed), it re-reads, and shows the task
//! only if it changed.
//!
//! Two things keep the messages in order and each one true to itself:
//! - An event older than what was last shown is skipped. The watch
//!   subscribes before its first read, so the events just before that read
//!   arrive after it: shown, a task would step back (RUNNING, then QUEUED).
//! - A read may be ahead of its event (the task ended while the event was
//!   on its way). The message then has the event's state without what only
//!   a later moment had: no result, end time, error or worker, and not the
//!   attempt that ended after it ([`as_of_event`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Filter, Hub, Kind, Next, Overflow, Permit, Subscription, WatchError};
use crate::domain::task::{State, Task, TaskId};
use crate::store::Deadline;
use crate::tasks::engine::TaskError;

/// One single-task watcher. It counts against `KOO_MAX_WATCHERS` until
/// dropped.
pub struct TaskWatch {
    hub: Hub,
    sub: Subscription,
    /// The task as read when the watch began: the first item.
    first: Option<Task>,
    /// The task as last handed out.
    last: Option<Task>,
    /// When what was last handed out happened (Redis's clock, ms): the
    /// event's time, or for a read the latest time it records.
    last_at: i64,
    /// Whether what was last handed out came from an event (the stream's
    /// order then settles ties of one millisecond) rather than a read.
    last_was_event: bool,
    shutdown: CancellationToken,
    /// Deadline of each re-read.
    timeout: Duration,
    done: bool,
    _permit: Permit,
}

impl Hub {
    /// Admits and subscribes a watcher of task `id`, and reads the task. It
    /// ends on `shutdown`; each re-read has `timeout`.
    pub async fn watch_task(
        &self,
        id: &TaskId,
        shutdown: CancellationToken,
        timeout: Duration,
        deadline: Deadline,
    ) -> Result<TaskWatch, WatchError> {
        let permit = self.watchers().admit(Kind::Task)?;
        // Subscribe first, then read: nothing that happens after the read is
        // missed.
        let sub = self
            .subscribe(
                &[(id.queue(), None)],
                Filter::Task(id.as_str().to_owned()),
                Overflow::Resync,
                deadline,
            )
            .await?;
        let first = self.engine().get(id.as_str(), deadline).await?;
        Ok(TaskWatch {
            hub: self.clone(),
            sub,
            first: Some(first),
            last: None,
            last_at: 0,
            last_was_event: false,
            shutdown,
            timeout,
            done: false,
            _permit: permit,
        })
    }
}

impl TaskWatch {
    /// The task now (first), then after each change; `None` after its end
    /// state, after an error, or when koo stops.
    pub async fn next(&mut self) -> Option<Result<Task, WatchError>> {
        if self.done {
            return None;
        }
        let task = match self.first.take() {
            Some(first) => {
                self.last_at = recorded_at(&first);
                first
            }
            None => match self.next_change().await {
                Ok(Some(task)) => task,
                Ok(None) => return None,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            },
        };
        self.done = task.state.is_final();
        self.last = Some(task.clone());
        Some(Ok(task))
    }

    /// The task after its next change; `None` when koo stops.
    async fn next_change(&mut self) -> Result<Option<Task>, WatchError> {
        let id = match &self.last {
            Some(t) => t.id.to_string(),
            None => return Ok(None),
        };
        loop {
            let event = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(None),
                next = self.sub.next() => match next {
                    Next::Event(e) => Some((e.state, e.event.at_ms, e.event.progress.is_some())),
                    // events were dropped: re-read
                    Next::Resync | Next::Gap(_) | Next::FellBehind => None,
                    Next::Closed if self.shutdown.is_cancelled() => return Ok(None),
                    Next::Closed => return Err(WatchError::Stopped),
                },
            };
            let last = self.last.as_ref().map(|l| (l.state, self.last_at));
            let event = match event {
                Some((state, at, progress)) => {
                    match judge(last, self.last_was_event, state, at, progress) {
                        Verdict::Old => continue,
                        // perhaps a replay, perhaps news: the read decides
                        Verdict::Tie => None,
                        Verdict::New => state.map(|s| (s, at)),
                    }
                }
                None => None,
            };
            let read = self
                .hub
                .engine()
                .get(&id, Deadline::after(self.timeout))
                .await;
            match read {
                Ok(task) => {
                    // an end a retry has undone (RetryTask ran it again): the
                    // read, not the end, is the task now
                    let event = event.filter(|(s, _)| !s.is_final() || task.state.is_final());
                    let task = match event {
                        Some((state, at)) => {
                            self.last_at = at;
                            self.last_was_event = true;
                            as_of_event(task, state, at)
                        }
                        None if self.last.as_ref().is_some_and(|l| {
                            l.state == task.state && l.progress == task.progress
                        }) =>
                        {
                            continue;
                        }
                        None => {
                            self.last_at = recorded_at(&task);
                            self.last_was_event = false;
                            task
                        }
                    };
                    return Ok(Some(task));
                }
                // The result expired right after the end: the final state
                // still goes out.
                Err(TaskError::NotFound(_)) if event.is_some_and(|(s, _)| s.is_final()) => {
                    let Some(mut task) = self.last.clone() else {
                        return Ok(None);
                    };
                    if let Some((state, _)) = event {
                        task.state = state;
                    }
                    return Ok(Some(task));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What an event is worth after `last` (the state last shown and when it
/// happened).
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Older than what was shown: skipped.
    Old,
    /// A state change of the same millisecond as a read, no further along
    /// (the same state, or one before it): perhaps one of the events just
    /// before the read, replayed, perhaps a change made in that very
    /// millisecond (an attempt failing as it was read). The read decides:
    /// shown only if it differs from what was shown.
    Tie,
    /// Shown.
    New,
}

/// Judges an event (its state, if known, its time, whether it reports
/// progress) after `last`, shown from an event (`last_was_event`: the
/// stream's order is then the truth, and a retry goes from RUNNING back to
/// SCHEDULED within one millisecond) or from a read. An end is never old:
/// whatever the clocks did, the final state goes out.
fn judge(
    last: Option<(State, i64)>,
    last_was_event: bool,
    state: Option<State>,
    at: i64,
    progress: bool,
) -> Verdict {
    let Some((last_state, last_at)) = last else {
        return Verdict::New;
    };
    if state.is_some_and(State::is_final) {
        return Verdict::New;
    }
    if at < last_at {
        return Verdict::Old;
    }
    let tie = at == last_at
        && !last_was_event
        && !progress
        && state.is_some_and(|s| stage(s) <= stage(last_state));
    if tie { Verdict::Tie } else { Verdict::New }
}

/// How far along an attempt a state is, to order the events of one
/// millisecond (a hand-off queues and leases a task in one step).
fn stage(state: State) -> u8 {
    match state {
        State::Pending | State::Scheduled => 0,
        State::Queued => 1,
        State::Running => 2,
        _ => 3,
    }
}

/// The latest time a read records (Redis's clock, ms): its submit, latest
/// start or end, or its last ended attempt's end (a task waiting for its
/// retry ended one after it started).
fn recorded_at(task: &Task) -> i64 {
    let attempt_end = task.log.last().and_then(|e| ended_ms(e)).unwrap_or(0);
    task.created_ms
        .max(task.started_ms.unwrap_or(0))
        .max(task.finished_ms.unwrap_or(0))
        .max(attempt_end)
}

/// `task` as read, shown with the state of an event at `at`. When the read
/// is further along (the task moved on while the event was on its way),
/// what happened after `at` is left out: the attempts that ended after it
/// (their log entries, and the error they set), an end after it (result,
/// end time, error), and the worker before a start.
fn as_of_event(mut task: Task, state: State, at: i64) -> Task {
    if task.state == state {
        return task;
    }
    let after = |ms: Option<i64>| ms.is_some_and(|ms| ms > at);
    // a RUNNING event's own attempt, ended in the same millisecond, is
    // after it too (a SCHEDULED one's attempt ended before it)
    let running = state == State::Running;
    let logged = task.log.len();
    task.log
        .retain(|entry| !ended_ms(entry).is_some_and(|ms| ms > at || (running && ms == at)));
    // an end the read has and the event's state has not came after it,
    // whatever the milliseconds say
    let ended_after = after(task.finished_ms) || (task.state.is_final() && !state.is_final());
    if ended_after {
        task.result = None;
        task.finished_ms = None;
    }
    if ended_after || task.log.len() < logged {
        task.error = None;
    }
    if stage(state) < stage(State::Running) {
        task.worker = None;
    }
    task.state = state;
    task
}

/// When an attempt-log entry's attempt ended (Redis's clock, ms).
fn ended_ms(entry: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(entry)
        .ok()?
        .get("ended_ms")?
        .as_i64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::{Category, Priority};

    fn ended() -> Task {
        Task {
            id: TaskId::generate(&Category::Research.default_queue()),
            name: "n".into(),
            category: Category::Research,
            priority: Priority::High,
            args: "[]".into(),
            kwargs: "{}".into(),
            state: State::Succeeded,
            cache_result: None,
            depends_on: Vec::new(),
            schedule: None,
            schedule_tick_ms: None,
            attempts: 2,
            token: 2,
            takeovers: 0,
            max_retries: 3,
            worker: None,
            progress: None,
            result: Some("1".into()),
            error: None,
            created_ms: 100,
            started_ms: Some(200),
            finished_ms: Some(300),
            soft_ms: 0,
            hard_ms: 0,
            result_ttl_ms: 1,
            log: vec![
                "{\"attempt\":1,\"ended_ms\":150}".into(),
                "{\"attempt\":2,\"ended_ms\":300}".into(),
            ],
            trace: None,
            debounce_key: None,
            expire_ms: None,
            rate_limit_key: None,
            concurrency_key: None,
        }
    }

    #[test]
    fn a_read_ahead_of_its_event_drops_the_later_moment() {
        // the second attempt ran at 250 and ended at 300
        let running = as_of_event(ended(), State::Running, 250);
        assert_eq!(running.state, State::Running);
        assert_eq!((running.result, running.finished_ms), (None, None));
        // the attempt that ended after the event is not in its log
        assert_eq!(
            running.log,
            vec!["{\"attempt\":1,\"ended_ms\":150}".to_owned()]
        );
        assert_eq!(running.started_ms, Some(200));
        // an attempt that ended after the event takes its error along,
        // whatever the read's state
        let mut read = ended();
        read.state = State::Scheduled;
        read.finished_ms = None;
        read.error = Some("{\"message\":\"second failed\"}".into());
        let running = as_of_event(read, State::Running, 250);
        assert_eq!((running.error, running.log.len()), (None, 1));
        let mut read = ended();
        read.state = State::Running;
        read.worker = Some("w".into());
        read.finished_ms = None;
        let queued = as_of_event(read, State::Queued, 190);
        assert_eq!((queued.state, queued.worker), (State::Queued, None));
        // a progress report in the very millisecond its attempt ended
        let running = as_of_event(ended(), State::Running, 300);
        assert_eq!((running.result, running.log.len()), (None, 1));
        // a read of the event's own state is shown whole
        let same = as_of_event(ended(), State::Succeeded, 300);
        assert_eq!(
            (same.result, same.finished_ms, same.log.len()),
            (Some("1".into()), Some(300), 2)
        );
    }

    #[test]
    fn events_before_what_was_shown_are_old_and_ties_after_a_read_are_reread() {
        let last = Some((State::Running, 200));
        let (read, event) = (false, true);
        let cases = [
            // the watch's first read was RUNNING: the QUEUED before it is old
            (last, read, State::Queued, 150, false, Verdict::Old),
            // the same millisecond as the read: replayed, or a change made then
            (last, read, State::Queued, 200, false, Verdict::Tie),
            (last, read, State::Running, 200, false, Verdict::Tie),
            // a progress report of the same millisecond is news
            (last, read, State::Running, 200, true, Verdict::New),
            (last, read, State::Scheduled, 201, false, Verdict::New),
            // after an event, one of the same millisecond is the next step
            // (a retry's RUNNING, then SCHEDULED)
            (last, event, State::Scheduled, 200, false, Verdict::New),
            (last, event, State::Scheduled, 199, false, Verdict::Old),
            // a clock stepped back does not hold the end back
            (last, read, State::Succeeded, 10, false, Verdict::New),
            (None, read, State::Queued, 0, false, Verdict::New),
        ];
        for (last, from_event, state, at, progress, want) in cases {
            let got = judge(last, from_event, Some(state), at, progress);
            assert_eq!(got, want, "{last:?} {from_event} {state:?} at {at}");
        }
    }
}
