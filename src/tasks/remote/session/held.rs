//! A task a stream holds, with its timers, and the rule that says whether
//! it never started on a worker whose stream vanished.

use std::time::Duration;

use tokio::time::Instant;

use super::MAX_GIVEN_BACK;
use crate::domain::task::Task;
use crate::store::Deadline;
use crate::tasks::engine::{TaskEngine, TaskError};

/// A task the session holds, with its timers.
pub(super) struct Held {
    pub(super) task: Task,
    pub(super) soft_at: Option<Instant>,
    pub(super) hard_at: Option<Instant>,
    /// Set once a cancel was passed on: when koo ends it if still held.
    pub(super) cancel_at: Option<Instant>,
    /// When it was pushed to the worker.
    pub(super) pushed_at: Instant,
    /// Whether the worker said anything since the push: a report naming
    /// it, or a heartbeat.
    pub(super) spoken: bool,
}

impl Held {
    /// Whether the task never started on a worker whose stream was seen
    /// closing at `vanished` (the rule of the module doc): nothing said
    /// about it, pushed less than `window` before, and given back fewer
    /// than [`MAX_GIVEN_BACK`] times.
    pub(super) fn unstarted(&self, vanished: Instant, window: Duration) -> bool {
        !self.spoken
            && vanished.saturating_duration_since(self.pushed_at) < window
            && self.task.given_back() < MAX_GIVEN_BACK
    }

    pub(super) fn next_timer(&self) -> Option<Instant> {
        [self.soft_at, self.hard_at, self.cancel_at]
            .into_iter()
            .flatten()
            .min()
    }
}

/// Hands a task back to its queue as a stopping worker does, its attempt
/// given back; once it was given back [`MAX_GIVEN_BACK`] times, its
/// attempt is counted instead, as a lapsed lease's (so that a task that
/// always stops its worker reaches its dead letter). Whether it counted.
pub(super) async fn hand_back(
    engine: &TaskEngine,
    task: &Task,
    worker: &str,
    deadline: Deadline,
) -> Result<bool, TaskError> {
    if task.given_back() >= MAX_GIVEN_BACK {
        engine.abandon(&task.id, task.token, deadline).await?;
        return Ok(true);
    }
    engine.release(task, worker, deadline).await?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(attempts: u32, token: u32, pushed_at: Instant, spoken: bool) -> Held {
        let task = Task::sample(attempts, token);
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
        // take-overs (re-attaches) grow the token but are no give-backs
        let mut moved = held(1, n + 1, pushed, false);
        moved.task.takeovers = n;
        assert!(moved.unstarted(soon, window));
    }
}
