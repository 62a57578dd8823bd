//! Leases: taking a task, keeping it (heartbeats, progress), and ending
//! the attempt (finish, hand back, abandon), each fenced by the lease token.

use std::sync::Arc;
use std::time::Duration;

use super::TaskEngine;
use crate::domain::Outcome;
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::store::Deadline;
use crate::store::tasks::{Beat, LeaseAsk, Leased, TakeOver};
use crate::tasks::error::TaskError;
use crate::tasks::remote::secret::Signer;

/// `Ok` when the store accepted a call made under a lease, else `Fenced`.
fn fenced_unless(accepted: bool, id: &TaskId) -> Result<(), TaskError> {
    if accepted {
        Ok(())
    } else {
        Err(TaskError::Fenced(id.clone()))
    }
}

/// How a leased task ended, as its worker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// With a result (JSON).
    Succeeded(String),
    /// With an error; `retryable` asks for a retry, after `delay` or else
    /// the task's backoff.
    Failed {
        /// What went wrong.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
        /// Anything else the worker reported (a JSON object), kept with the
        /// error.
        details: Option<serde_json::Value>,
        /// How long to wait before the next attempt, when the worker knows
        /// better than the backoff (a rate limit's `Retry-After`); ignored
        /// when no retry remains.
        delay: Option<Duration>,
    },
    /// Stopped at the hard time limit.
    TimedOut,
}

impl Finish {
    /// A failure without details.
    pub fn failed(message: impl Into<String>, retryable: bool) -> Self {
        Self::Failed {
            message: message.into(),
            retryable,
            details: None,
            delay: None,
        }
    }
}

impl TaskEngine {
    /// The lease secrets' signer: its key read from the store (created
    /// there by the first koo process that needs it) once per process.
    pub async fn signer(&self, deadline: Deadline) -> Result<Arc<Signer>, TaskError> {
        if let Some(s) = self.inner.signer.get() {
            return Ok(s);
        }
        let key = self
            .inner
            .store
            .lease_key(&Signer::fresh_key()?, deadline)
            .await?;
        Ok(self.inner.signer.adopt(&key))
    }

    /// Writes this process's key of lease secrets back when the shared
    /// store lost it, or adopts the one stored since: after Redis restarts
    /// empty, every process converges on one key within one refresh.
    pub async fn refresh_signer(&self, deadline: Deadline) -> Result<(), TaskError> {
        let Some(current) = self.inner.signer.get() else {
            return Ok(());
        };
        if self.inner.store.is_shared() {
            let key = self
                .inner
                .store
                .lease_key(current.stored(), deadline)
                .await?;
            self.inner.signer.adopt(&key);
        }
        Ok(())
    }

    /// The secret of `task`'s current lease (see [`super::remote::secret`]).
    pub async fn lease_secret(&self, task: &Task, deadline: Deadline) -> Result<String, TaskError> {
        Ok(self.signer(deadline).await?.of_lease(task))
    }

    /// Leases a task of `queue` whose name is in `names` (`*`: any).
    #[tracing::instrument(level = "debug", skip_all, fields(queue = %queue, worker = %worker))]
    pub async fn lease(
        &self,
        queue: &QueueName,
        worker: &str,
        names: &[&str],
        deadline: Deadline,
    ) -> Result<Option<Task>, TaskError> {
        Ok(self
            .lease_or_hold(queue, worker, names, deadline)
            .await?
            .task())
    }

    /// [`Self::lease`], saying why nothing was leased: nothing waits, or
    /// limits hold what waits (until when, when a time frees it), so that
    /// a worker rests the queue until then rather than polling it.
    pub async fn lease_or_hold(
        &self,
        queue: &QueueName,
        worker: &str,
        names: &[&str],
        deadline: Deadline,
    ) -> Result<Leased, TaskError> {
        let c = &self.inner.config;
        let leased = self
            .inner
            .store
            .lease_or_hold(queue, worker, c.lease, names, self.lease_limits(), deadline)
            .await?;
        if let Leased::Task(task) = &leased {
            self.inner.counters.leased(task);
        }
        Ok(leased)
    }

    /// Extends the lease held with `token`; the cancel's reason when a
    /// cancel was asked for (the holder should stop the task).
    #[tracing::instrument(level = "debug", skip_all, fields(task = %id))]
    pub async fn heartbeat(
        &self,
        id: &TaskId,
        token: u32,
        deadline: Deadline,
    ) -> Result<Option<String>, TaskError> {
        match self
            .inner
            .store
            .heartbeat(id, token, self.inner.config.lease, deadline)
            .await?
        {
            Beat::Held => Ok(None),
            Beat::CancelRequested(reason) => Ok(Some(reason)),
            Beat::Lost => Err(TaskError::Fenced(id.clone())),
        }
    }

    /// Takes over `task`'s lease for `worker` (a worker re-attaching a
    /// task it runs to a new stream): the task under its new token and
    /// worker, and the reason of a cancel asked for meanwhile. Its former
    /// holder is fenced out from now on.
    pub async fn take_over(
        &self,
        task: &Task,
        worker: &str,
        deadline: Deadline,
    ) -> Result<(Task, Option<String>), TaskError> {
        let lease = self.inner.config.lease;
        match self
            .inner
            .store
            .take_over(&task.id, task.token, worker, lease, deadline)
            .await?
        {
            TakeOver::Taken { token, cancel } => {
                let mut task = task.clone();
                task.token = token;
                task.worker = Some(worker.to_owned());
                Ok((task, cancel))
            }
            TakeOver::Lost => Err(TaskError::Fenced(task.id.clone())),
        }
    }

    /// Records progress (JSON `{percent, message, metadata}`).
    #[tracing::instrument(level = "debug", skip_all, fields(task = %id))]
    pub async fn progress(
        &self,
        id: &TaskId,
        token: u32,
        progress: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let ok = self
            .inner
            .store
            .progress(id, token, progress, self.inner.config.limits, deadline)
            .await?;
        fenced_unless(ok, id)
    }

    /// Ends the attempt held with `token`; the state the task moved to.
    #[tracing::instrument(level = "debug", skip_all, fields(task = %task.id, worker = %worker))]
    pub async fn finish(
        &self,
        task: &Task,
        token: u32,
        worker: &str,
        finish: Finish,
        deadline: Deadline,
    ) -> Result<State, TaskError> {
        let (outcome, entry) = self.outcome(task, worker, &finish);
        let state = self
            .inner
            .store
            .finish(
                &task.id,
                token,
                &outcome,
                &entry,
                self.inner.config.limits,
                deadline,
            )
            .await?
            .ok_or_else(|| TaskError::Fenced(task.id.clone()))?;
        let (state, waited_on) = state;
        self.inner.counters.finished(task, state);
        if waited_on {
            self.release_after_end(&task.id, state, deadline).await;
        }
        Ok(state)
    }

    /// [`Self::finish`], then a lease of the next task of the same queue
    /// whose name is in `names`, in one round trip (a busy worker's path).
    #[tracing::instrument(level = "debug", skip_all, fields(task = %task.id, worker = %worker))]
    pub async fn finish_and_lease(
        &self,
        task: &Task,
        token: u32,
        worker: &str,
        finish: Finish,
        names: &[&str],
        deadline: Deadline,
    ) -> Result<(State, Leased), TaskError> {
        let c = &self.inner.config;
        let (outcome, entry) = self.outcome(task, worker, &finish);
        let next = LeaseAsk {
            worker,
            lease: c.lease,
            names,
        };
        let ((state, waited_on), leased) = self
            .inner
            .store
            .finish_and_lease(
                &task.id,
                token,
                &outcome,
                &entry,
                &next,
                self.lease_limits(),
                deadline,
            )
            .await?
            .ok_or_else(|| TaskError::Fenced(task.id.clone()))?;
        self.inner.counters.finished(task, state);
        if let Leased::Task(next) = &leased {
            self.inner.counters.leased(next);
        }
        if waited_on {
            self.release_after_end(&task.id, state, deadline).await;
        }
        Ok((state, leased))
    }

    /// What the store records for a finish: the outcome and the attempt's
    /// log entry.
    pub(super) fn outcome(&self, task: &Task, worker: &str, finish: &Finish) -> (Outcome, String) {
        let error = |message: &str, retryable: bool, details: Option<&serde_json::Value>| {
            let mut e = serde_json::json!({ "message": message, "retryable": retryable });
            if let Some(d) = details {
                e["details"] = d.clone();
            }
            e.to_string()
        };
        let (outcome, log) = match finish {
            Finish::Succeeded(result) => (Outcome::Succeeded(result.clone()), "succeeded"),
            Finish::Failed {
                message,
                retryable: true,
                details,
                delay,
            } => (
                Outcome::Retry {
                    error: error(message, true, details.as_ref()),
                    delay: delay.unwrap_or_else(|| self.inner.config.backoff.delay(task.attempts)),
                },
                "failed",
            ),
            Finish::Failed {
                message,
                retryable: false,
                details,
                ..
            } => (
                Outcome::Failed(error(message, false, details.as_ref())),
                "failed",
            ),
            Finish::TimedOut => (
                Outcome::TimedOut(error("hard time limit reached", false, None)),
                "timed_out",
            ),
        };
        let message = match finish {
            Finish::Failed { message, .. } => Some(message.as_str()),
            Finish::TimedOut => Some("hard time limit reached"),
            Finish::Succeeded(_) => None,
        };
        let entry = serde_json::json!({
            "attempt": task.attempts,
            "worker": worker,
            "started_ms": task.started_ms,
            "outcome": log,
            "error": message,
        })
        .to_string();
        (outcome, entry)
    }

    /// Hands a running task back to its queue at once, its attempt given
    /// back (the worker is stopping before the task ended).
    #[tracing::instrument(level = "debug", skip_all, fields(task = %task.id, worker = %worker))]
    pub async fn release(
        &self,
        task: &Task,
        worker: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let why = "the worker stopped before the task ended; it runs again";
        self.give_back(task, worker, why, deadline).await
    }

    /// Hands back, its attempt given back, a task pushed to an external
    /// worker whose stream vanished before the worker said a word about it:
    /// it never started there (see `remote::Session` for the rule).
    #[tracing::instrument(level = "debug", skip_all, fields(task = %task.id, worker = %worker))]
    pub async fn release_unstarted(
        &self,
        task: &Task,
        worker: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let why = "pushed to a worker whose stream closed before it said anything about the task: never started; it runs again";
        self.give_back(task, worker, why, deadline).await
    }

    /// The `release` transition: queued again in its original place, the
    /// attempt given back, logged as `handed_back` with `why`.
    async fn give_back(
        &self,
        task: &Task,
        worker: &str,
        why: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let entry = serde_json::json!({
            "attempt": task.attempts,
            "worker": worker,
            "started_ms": task.started_ms,
            "outcome": "handed_back",
            "error": why,
        })
        .to_string();
        let ok = self
            .inner
            .store
            .release(
                &task.id,
                task.token,
                &entry,
                self.inner.config.limits,
                deadline,
            )
            .await?;
        fenced_unless(ok, &task.id)?;
        // back in its queue: one of this process's idle slots or waiting
        // workers of each kind looks again now, not at its next poll (a
        // task handed to a slot or a stream that left comes back this way)
        self.made_ready(task.id.queue(), Some(&task.name));
        Ok(())
    }

    /// Ends the lease held with `token` now, as if it had lapsed: the
    /// attempt counts and the task goes back to its queue (or to a final
    /// state when its retries are spent), logged as lost. For a worker whose
    /// connection dropped: the recovery sweep would do the same a lease later.
    #[tracing::instrument(level = "debug", skip_all, fields(task = %id))]
    pub async fn abandon(
        &self,
        id: &TaskId,
        token: u32,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let c = &self.inner.config;
        let store = &self.inner.store;
        match store.heartbeat(id, token, Duration::ZERO, deadline).await? {
            Beat::Lost => return Err(TaskError::Fenced(id.clone())),
            Beat::Held | Beat::CancelRequested(_) => {}
        }
        store
            .recover(&id.queue(), c.acks_late, c.limits, deadline)
            .await?;
        Ok(())
    }
}
