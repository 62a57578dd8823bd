//! The single-task watch (`WatchTask`): a task as it is now, then after
//! each change, until it ends.
//!
//! The watcher follows the task's queue feed for events of that task only,
//! and re-reads the task on each: every event is shown with the state it
//! recorded (a lease moves a task through QUEUED and RUNNING in one step,
//! and both are shown), the other fields from the fresh read. When events
//! were dropped (its buffer overflowed), it re-reads, and shows the task
//! only if it changed.

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
            Some(first) => first,
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
            let next_state = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(None),
                next = self.sub.next() => match next {
                    Next::Event(e) => e.state,
                    // events were dropped: re-read
                    Next::Resync | Next::Gap(_) | Next::FellBehind => None,
                    Next::Closed if self.shutdown.is_cancelled() => return Ok(None),
                    Next::Closed => return Err(WatchError::Stopped),
                },
            };
            let read = self
                .hub
                .engine()
                .get(&id, Deadline::after(self.timeout))
                .await;
            match read {
                Ok(mut task) => {
                    if let Some(st) = next_state {
                        task.state = st;
                    } else if self
                        .last
                        .as_ref()
                        .is_some_and(|l| l.state == task.state && l.progress == task.progress)
                    {
                        continue;
                    }
                    return Ok(Some(task));
                }
                // The result expired right after the end: the final state
                // still goes out.
                Err(TaskError::NotFound(_)) if next_state.is_some_and(State::is_final) => {
                    let Some(mut task) = self.last.clone() else {
                        return Ok(None);
                    };
                    task.state = next_state.unwrap_or(task.state);
                    return Ok(Some(task));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
