//! What callers do to tasks they do not hold: cancel, retry, requeue dead
//! letters, trim ended ones.

use std::time::Duration;

use super::TaskEngine;
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::store::Deadline;
use crate::store::tasks::{CancelReply, RetryReply, Trimmed};
use crate::tasks::error::TaskError;

impl TaskEngine {
    /// Cancels a task: waiting, it ends CANCELLED at once; running, its
    /// worker is told to stop (at once in this process, at its next
    /// heartbeat elsewhere) and the task ends CANCELLED unless it succeeds
    /// first. The task as it is after the call.
    #[tracing::instrument(level = "debug", skip_all, fields(task = %id))]
    pub async fn cancel(
        &self,
        id: &str,
        reason: &str,
        deadline: Deadline,
    ) -> Result<Task, TaskError> {
        let task_id =
            TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
        if reason.len() > 1024 {
            return Err(TaskError::invalid("reason", "must be at most 1024 bytes"));
        }
        let reason = if reason.is_empty() {
            "cancelled by request"
        } else {
            reason
        };
        match self
            .inner
            .store
            .cancel(&task_id, reason, self.inner.config.limits, deadline)
            .await?
        {
            CancelReply::Missing => return Err(TaskError::NotFound(task_id)),
            CancelReply::Ended(state) => {
                return Err(TaskError::FailedPrecondition(format!(
                    "task {id} already ended {}",
                    state.as_str().to_uppercase()
                )));
            }
            CancelReply::Requested => {
                // The reply shows the task as the cancel found it (running,
                // told to stop): read before this process's own worker is
                // told, which may end the task at once.
                let task = self.get(id, deadline).await;
                let _ = self.inner.cancels.send(super::CancelAsked {
                    id: task_id.clone(),
                    reason: reason.into(),
                });
                return task;
            }
            CancelReply::Cancelled => {
                self.release_after_end(&task_id, State::Cancelled, deadline)
                    .await;
            }
        }
        self.get(id, deadline).await
    }

    /// Runs a FAILED, TIMED_OUT or CANCELLED task again under its id, with
    /// a fresh retry budget; its attempt log keeps the earlier attempts.
    #[tracing::instrument(level = "debug", skip_all, fields(task = %id))]
    pub async fn retry(&self, id: &str, deadline: Deadline) -> Result<Task, TaskError> {
        let task_id =
            TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
        self.dependencies_succeeded(id, deadline).await?;
        match self
            .inner
            .store
            .retry(&task_id, self.inner.config.limits, deadline)
            .await?
        {
            RetryReply::Missing => Err(TaskError::NotFound(task_id)),
            RetryReply::NotEnded(state) => Err(TaskError::FailedPrecondition(format!(
                "task {id} is {}: only FAILED, TIMED_OUT or CANCELLED tasks can be retried",
                state.as_str().to_uppercase()
            ))),
            RetryReply::Queued => {
                self.made_ready(task_id.queue(), None);
                self.get(id, deadline).await
            }
        }
    }

    /// A task that waits on others runs only once each of them succeeded
    /// (as a submit would have it): the retry of one (cancelled because a
    /// dependency failed, say) is refused while any has not, naming it, so
    /// that its dependency is retried first. A dependency that succeeded
    /// stays so (only ended failures are retried), so checking first
    /// leaves no window. A task leased once (its fencing token above zero)
    /// was queued, so its dependencies had all succeeded then and still
    /// have: it is not checked again, and a dependency whose record has
    /// since expired does not hold it back.
    async fn dependencies_succeeded(&self, id: &str, deadline: Deadline) -> Result<(), TaskError> {
        let task = match self.get(id, deadline).await {
            Ok(task) => task,
            // the retry itself says it is gone
            Err(TaskError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if task.token > 0 {
            return Ok(());
        }
        for dep in &task.depends_on {
            let why = match self.get(dep, deadline).await {
                Ok(d) if d.state == State::Succeeded => continue,
                Ok(d) => format!(
                    "which is {}: it runs only after {dep} succeeded (retry {dep} first)",
                    d.state.as_str().to_uppercase()
                ),
                Err(TaskError::NotFound(_)) => format!(
                    "which is gone (its record expired) without {id} having run: \
                     submit both again"
                ),
                Err(e) => return Err(e),
            };
            return Err(TaskError::FailedPrecondition(format!(
                "task {id} waits on task {dep}, {why}"
            )));
        }
        Ok(())
    }

    /// Queues dead letters again (as [`Self::retry`]): up to `limit` of each
    /// of `queues`, oldest first. The ids requeued. A dead letter has run
    /// (failed or timed out), so its dependencies had succeeded: none is
    /// held back by one.
    #[tracing::instrument(level = "debug", skip_all, fields(queues = queues.len(), limit = limit))]
    pub async fn requeue_dead_letters(
        &self,
        queues: &[QueueName],
        limit: usize,
        deadline: Deadline,
    ) -> Result<Vec<String>, TaskError> {
        let mut requeued = Vec::new();
        for queue in queues {
            for id in self
                .inner
                .store
                .dead_letters(queue, limit, deadline)
                .await?
            {
                match self.retry(&id, deadline).await {
                    Ok(_) => requeued.push(id),
                    // gone or already requeued meanwhile
                    Err(TaskError::NotFound(_) | TaskError::FailedPrecondition(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(requeued)
    }

    /// Removes tasks that ended more than `older_than` ago from history and
    /// storage in `queues`; what was removed. Dead letters younger than the
    /// dead-letter TTL stay unless `include_dead` (older ones have expired:
    /// their entries go either way).
    #[tracing::instrument(level = "debug", skip_all, fields(queues = queues.len(), include_dead = include_dead))]
    pub async fn cleanup(
        &self,
        queues: &[QueueName],
        older_than: Duration,
        include_dead: bool,
        deadline: Deadline,
    ) -> Result<Vec<(QueueName, Trimmed)>, TaskError> {
        let now = crate::store::unix_millis(std::time::SystemTime::now());
        let ago =
            |d: Duration| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let limits = self.inner.config.limits;
        let before_ms = ago(older_than);
        let expired_ms = ago(limits.dead_ttl);
        let dead_before_ms = if include_dead {
            before_ms.max(expired_ms)
        } else {
            expired_ms
        };
        let mut out = Vec::with_capacity(queues.len());
        for queue in queues {
            let mut total = Trimmed::default();
            // at most 1000 history entries per call; a backlog takes more
            for _ in 0..1000 {
                let t = self
                    .inner
                    .store
                    .trim(queue, before_ms, dead_before_ms, limits, deadline)
                    .await?;
                total.history += t.history;
                total.dead += t.dead;
                total.events += t.events;
                if t.history < 1000 {
                    break;
                }
            }
            out.push((queue.clone(), total));
        }
        Ok(out)
    }
}
