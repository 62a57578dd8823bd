//! Dependencies: a task PENDING on others is stored with them, released
//! (queued) when they all succeed, cancelled when one does not, and
//! repaired by the sweep when the process that should have released it died.

use std::time::Duration;

use super::TaskEngine;
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::store::Deadline;
use crate::store::tasks::DependReply;
use crate::tasks::error::TaskError;

impl TaskEngine {
    /// Stores a prepared task: queued (or scheduled) now, or PENDING on
    /// the dependencies that have not ended. The dependencies are
    /// registered first, so an end after that releases the task; one that
    /// ended in between is caught by the check after the store.
    #[tracing::instrument(name = "submit", level = "debug", skip_all, fields(task = %task.id, name = %task.name))]
    pub(super) async fn store_task(
        &self,
        mut task: Task,
        delay: Duration,
        deadline: Deadline,
    ) -> Result<Task, TaskError> {
        let c = &self.inner.config;
        let store = &self.inner.store;
        let mut waiting = Vec::new();
        for (i, dep) in task.depends_on.iter().enumerate() {
            let dep_id =
                TaskId::parse(dep).map_err(|e| TaskError::invalid("depends_on", e.to_string()))?;
            match store.depend_on(&dep_id, &task.id, deadline).await? {
                DependReply::Waiting => waiting.push(dep_id),
                DependReply::Ended(State::Succeeded) => {}
                DependReply::Missing => {
                    return Err(TaskError::invalid(
                        &format!("depends_on[{i}]"),
                        format!("no task {dep} (unknown, or its result expired)"),
                    ));
                }
                DependReply::Ended(state) => {
                    return Err(TaskError::FailedPrecondition(format!(
                        "dependency {dep} already ended {}: the task could never run",
                        state.as_str().to_uppercase()
                    )));
                }
            }
        }
        if waiting.is_empty() {
            let claim = delay.is_zero().then(|| self.claim_slot(&task)).flatten();
            let Some(claim) = claim else {
                return self.submit_plain(task, delay, deadline).await;
            };
            let (task, wake) = self.submit_handing(task, claim, deadline).await?;
            self.submitted(&task, wake);
            return Ok(task);
        }
        store
            .submit_pending(&task, &waiting, c.limits, deadline)
            .await?;
        self.inner.counters.submitted(&task.id.queue());
        task.state = State::Pending;
        for dep in &waiting {
            if let Ok(d) = self.get(dep.as_str(), deadline).await
                && d.state.is_final()
            {
                self.resolve(&task.id, dep.as_str(), d.state.as_str(), deadline)
                    .await?;
            }
        }
        Ok(task)
    }

    /// The submit of a task that waits for nothing, no slot taking it.
    async fn submit_plain(
        &self,
        task: Task,
        delay: Duration,
        deadline: Deadline,
    ) -> Result<Task, TaskError> {
        let limits = self.inner.config.limits;
        self.inner
            .store
            .submit(&task, delay, limits, deadline)
            .await?;
        self.submitted(&task, true);
        Ok(task)
    }

    /// Counts a stored submit and, with `wake`, wakes this process's idle
    /// workers for its queue.
    pub(super) fn submitted(&self, task: &Task, wake: bool) {
        if wake {
            self.made_ready(task.id.queue(), Some(&task.name));
        }
        self.inner.counters.submitted(&task.id.queue());
    }

    /// Dependency `dep` of PENDING task `id` ended in `state`: release or
    /// cancel the task, and, if it was cancelled, its own dependents.
    async fn resolve(
        &self,
        id: &TaskId,
        dep: &str,
        state: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let c = &self.inner.config;
        match self
            .inner
            .store
            .resolve_dependency(id, dep, state, c.limits, deadline)
            .await?
        {
            Some(State::Queued) => {
                self.made_ready(id.queue(), None);
            }
            Some(State::Cancelled) => {
                Box::pin(self.release_dependents(id, State::Cancelled, deadline)).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Task `id` ended in `state`: its dependents stop waiting on it (on
    /// Redis; the embedded store does this as the task ends). A process
    /// that dies before this is covered by the recovery sweep's repair.
    pub async fn release_dependents(
        &self,
        id: &TaskId,
        state: State,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        for dependent in self.inner.store.dependents(id, deadline).await? {
            let Ok(dependent) = TaskId::parse(&dependent) else {
                continue;
            };
            self.resolve(&dependent, id.as_str(), state.as_str(), deadline)
                .await?;
        }
        Ok(())
    }

    /// Releases a task's dependents after it ended; a failure is left to
    /// the recovery sweep's repair.
    pub(super) async fn release_after_end(&self, id: &TaskId, state: State, deadline: Deadline) {
        if let Err(e) = self.release_dependents(id, state, deadline).await {
            tracing::warn!(task = %id, error = %e, "cannot release dependents now; the sweep will");
        }
    }

    /// Repairs releases a dead process did not make: every PENDING task of
    /// `queue` (at most 100 a call) whose dependency has ended is resolved.
    pub(super) async fn repair_pending(
        &self,
        queue: &QueueName,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        for (id, deps) in self.inner.store.pending_tasks(queue, 100, deadline).await? {
            let Ok(task_id) = TaskId::parse(&id) else {
                continue;
            };
            for dep in deps {
                let state = match self.get(&dep, deadline).await {
                    Ok(d) if d.state.is_final() => d.state.as_str().to_owned(),
                    Ok(_) => continue,
                    Err(TaskError::NotFound(_) | TaskError::InvalidArgument { .. }) => {
                        "gone".to_owned()
                    }
                    Err(e) => return Err(e),
                };
                self.resolve(&task_id, &dep, &state, deadline).await?;
            }
        }
        Ok(())
    }
}
