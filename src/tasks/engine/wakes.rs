//! Waking this process's idle workers on submits made in other processes
//! (on Redis; the embedded store's submits all come through this process).
//! The Redis side, and why a submit costs one `DEL` while no process
//! waits, is in `store/redis/tasks/wake.rs`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::TaskEngine;
use crate::domain::task::QueueName;
use crate::store::tasks::SubmitWatch;

/// How long one arming blocks before it is renewed.
const BLOCK: Duration = Duration::from_secs(1);

/// The pause after a failed arming (Redis down: the breaker and the
/// workers' own polls take over).
const RETRY: Duration = Duration::from_millis(500);

impl TaskEngine {
    /// Until `stop`: while a worker of this process waits idle for a task
    /// of one of `queues`, arms those queues in Redis, and on a wake tells
    /// the idle workers as a submit of this process would (the queue first).
    pub async fn run_wakes(self, queues: Vec<QueueName>, stop: CancellationToken) {
        let watches = self.inner.store.submit_watches(&queues);
        let loops = watches
            .into_iter()
            .map(|watch| self.clone().wake_loop(watch, stop.clone()));
        futures::future::join_all(loops).await;
    }

    async fn wake_loop(self, mut watch: SubmitWatch, stop: CancellationToken) {
        let mut board = self.inner.board.changed.subscribe();
        loop {
            // armed only while an idle worker would take what it wakes
            while !watch.queues().iter().any(|q| self.idle_slots(q) > 0) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = board.changed() => if changed.is_err() { return },
                }
            }
            let woken = tokio::select! {
                () = stop.cancelled() => return,
                woken = watch.next(BLOCK) => woken,
            };
            match woken {
                Ok(Some(queue)) => {
                    self.inner.counters.woken(&queue);
                    self.inner.submitted.send_replace(Some(queue));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot wait for wakes; trying again");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
    }
}
