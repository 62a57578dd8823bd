//! The recovery sweep: lapsed leases back to their queues, due tasks
//! promoted, and dependency releases a dead process did not make.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::TaskEngine;
use crate::domain::task::QueueName;
use crate::store::Deadline;

impl TaskEngine {
    /// Recovers lapsed leases of `queues` every sweep interval until `stop`.
    pub async fn run_recovery(self, queues: Vec<QueueName>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.config.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.sweep(&queues).await;
        }
    }

    /// One recovery sweep of `queues`: lapsed leases back to their queues
    /// (or to a final state), due tasks promoted, and the dependency
    /// releases a dead process did not make.
    #[tracing::instrument(level = "debug", skip_all, fields(queues = queues.len()))]
    async fn sweep(&self, queues: &[QueueName]) {
        let c = &self.inner.config;
        for queue in queues {
            // One call handles at most 100 lapsed leases and 100 due
            // tasks; a backlog is worked off in a few more calls.
            for _ in 0..50 {
                let deadline = Deadline::after(c.sweep_interval.max(Duration::from_secs(1)));
                match self
                    .inner
                    .store
                    .recover(queue, c.acks_late, c.limits, deadline)
                    .await
                {
                    Ok(n) if n < 100 => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(queue = %queue, error = %e, "cannot recover lapsed leases");
                        break;
                    }
                }
            }
            let deadline = Deadline::after(c.sweep_interval.max(Duration::from_secs(1)));
            if let Err(e) = self.repair_pending(queue, deadline).await {
                tracing::warn!(queue = %queue, error = %e, "cannot check pending tasks' dependencies");
            }
        }
    }
}
