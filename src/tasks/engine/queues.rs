//! Queues as operators see them: pause, resume, list with their figures.
//!
//! A pause is stored with the queue ([`crate::store::tasks::TaskBackend::set_pause`]),
//! so that every koo process's lease (built-in slots, stream workers,
//! unary leases) sees it in the same transition that would hand a task
//! out: there is no window in which a process that has not heard of the
//! pause still leases.

use super::TaskEngine;
use crate::domain::task::QueueName;
use crate::domain::{Pause, QueueStats};
use crate::store::Deadline;
use crate::tasks::error::TaskError;

/// The longest pause reason kept.
const MAX_REASON: usize = 1024;

impl TaskEngine {
    /// Pauses `queue` (for `by`, because of `reason`): its figures after.
    #[tracing::instrument(level = "debug", skip_all, fields(queue))]
    pub async fn pause_queue(
        &self,
        queue: &str,
        by: &str,
        reason: &str,
        deadline: Deadline,
    ) -> Result<(QueueName, QueueStats), TaskError> {
        let queue = self.known_queue(queue)?;
        if reason.len() > MAX_REASON {
            return Err(TaskError::invalid(
                "reason",
                format!("must be at most {MAX_REASON} bytes (got {})", reason.len()),
            ));
        }
        let pause = Pause {
            by: by.to_owned(),
            reason: reason.to_owned(),
            at_ms: crate::store::unix_millis(std::time::SystemTime::now()),
        };
        self.inner
            .store
            .set_pause(&queue, Some(&pause), deadline)
            .await?;
        tracing::info!(%queue, by, reason, "queue paused");
        self.queue_figures(queue, deadline).await
    }

    /// Resumes `queue`: its figures after. Workers of this process look at
    /// it at once; other processes' within their poll interval.
    #[tracing::instrument(level = "debug", skip_all, fields(queue))]
    pub async fn resume_queue(
        &self,
        queue: &str,
        deadline: Deadline,
    ) -> Result<(QueueName, QueueStats), TaskError> {
        let queue = self.known_queue(queue)?;
        self.inner.store.set_pause(&queue, None, deadline).await?;
        tracing::info!(%queue, "queue resumed");
        // as a submit does: a worker resting on the queue looks again now
        self.inner.submitted.send_replace(Some(queue.clone()));
        self.queue_figures(queue, deadline).await
    }

    /// Every queue (the category queues, then the extra ones) with its
    /// figures and pause.
    pub async fn list_queues(
        &self,
        deadline: Deadline,
    ) -> Result<Vec<(QueueName, QueueStats)>, TaskError> {
        self.queue_stats(&self.inner.config.queues(), deadline)
            .await
    }

    async fn queue_figures(
        &self,
        queue: QueueName,
        deadline: Deadline,
    ) -> Result<(QueueName, QueueStats), TaskError> {
        let stats = self.inner.store.queue_stats(&queue, deadline).await?;
        Ok((queue, stats))
    }

    /// `queue` if it is one of the configured queues.
    pub(crate) fn known_queue(&self, queue: &str) -> Result<QueueName, TaskError> {
        let known = self.inner.config.queues();
        match known.iter().find(|q| q.as_str() == queue) {
            Some(q) => Ok(q.clone()),
            None => {
                let names: Vec<&str> = known.iter().map(QueueName::as_str).collect();
                Err(TaskError::invalid(
                    "queue",
                    format!(
                        "unknown queue {}: one of {}",
                        crate::quote::quote(queue),
                        names.join(", ")
                    ),
                ))
            }
        }
    }
}
