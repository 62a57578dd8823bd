//! The recovery sweep: lapsed leases back to their queues, due tasks
//! promoted, waiting tasks past their expiry ended (so that they show up
//! CANCELLED within a sweep even in a paused or idle queue), and dependency
//! releases a dead process did not make (or that an expiry in a lease
//! call left to it, on Redis).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::TaskEngine;
use crate::domain::task::{QueueName, State};
use crate::repeats::Repeats;
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
    /// (or to a final state) and due tasks promoted, in every queue first;
    /// then the dependency releases nobody made (a dead process, or an end
    /// this sweep made: a dependency in one queue that lapsed into FAILED
    /// frees its dependents in another in the same pass). Returns how many
    /// leases and due tasks each queue's recovery handled.
    #[tracing::instrument(level = "debug", skip_all, fields(queues = queues.len()))]
    pub async fn sweep(&self, queues: &[QueueName]) -> Vec<u64> {
        let c = &self.inner.config;
        let deadline = || Deadline::after(c.sweep_interval.max(Duration::from_secs(1)));
        let mut handled = Vec::with_capacity(queues.len());
        for queue in queues {
            // One call handles at most 100 lapsed leases and 100 due
            // tasks; a backlog is worked off in a few more calls.
            let mut total = 0;
            for _ in 0..50 {
                match self
                    .inner
                    .store
                    .recover(queue, c.acks_late, c.limits, deadline())
                    .await
                {
                    Ok(r) => {
                        recovered_again(&RECOVER, queue, "recovering lapsed leases");
                        total += r.handled;
                        // an expired task others wait on: released now (on
                        // Redis they may be in other queues' slots), not
                        // left to the bounded pending repair below
                        for id in &r.release {
                            self.release_after_end(id, State::Cancelled, deadline())
                                .await;
                        }
                        if r.handled < 100 && r.expired < 100 {
                            break;
                        }
                    }
                    Err(e) => {
                        crate::repeats::warn_once_per_run!(RECOVER, queue.as_str(), queue = %queue, error = %e, "cannot recover lapsed leases (repeats are logged at debug until it works again)");
                        break;
                    }
                }
            }
            handled.push(total);
        }
        for queue in queues {
            match self.repair_pending(queue, deadline()).await {
                Ok(_) => recovered_again(&REPAIR, queue, "checking pending tasks' dependencies"),
                Err(e) => {
                    crate::repeats::warn_once_per_run!(REPAIR, queue.as_str(), queue = %queue, error = %e, "cannot check pending tasks' dependencies (repeats are logged at debug until it works again)");
                }
            }
        }
        handled
    }
}

/// Runs of failures of the sweep's two calls (see [`crate::repeats`]).
static RECOVER: Repeats = Repeats::new();
static REPAIR: Repeats = Repeats::new();

/// After a run of failures at `site` for `queue`, says that `what` works
/// again.
fn recovered_again(site: &Repeats, queue: &QueueName, what: &str) {
    let failed = site.succeeded(queue.as_str());
    if failed > 0 {
        tracing::info!(%queue, failed, "{what} works again");
    }
}
