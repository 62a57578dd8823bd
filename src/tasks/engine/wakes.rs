//! Waking this process's idle workers on submits made in other processes
//! (on Redis; the embedded store's submits all come through this process).
//! The Redis side, and why a submit costs two `GET`s while no process
//! waits, is in `store/redis/tasks/wake.rs`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::TaskEngine;
use crate::domain::task::QueueName;
use crate::store::tasks::{SubmitWatch, Woken};

/// How long one arming blocks before it is renewed.
const BLOCK: Duration = Duration::from_secs(1);

/// The pause after a failed arming, doubled after each failure in a row
/// up to [`MAX_RETRY`] (Redis down, or a Redis user without `BLPOP`: the
/// workers' own polls go on meanwhile).
const RETRY: Duration = Duration::from_millis(500);

/// The longest pause between failed armings (so arming resumes within this
/// after Redis comes back).
const MAX_RETRY: Duration = Duration::from_secs(5);

impl TaskEngine {
    /// Until `stop`: while a worker of this process waits idle for a task
    /// of one of `queues`, arms those queues (and the task names the idle
    /// workers serve) in Redis, and on a wake tells one idle worker of each
    /// kind that serves the name to look at the queue.
    pub async fn run_wakes(self, queues: Vec<QueueName>, stop: CancellationToken) {
        let watches = self.inner.store.submit_watches(&queues);
        let loops = watches
            .into_iter()
            .map(|watch| self.clone().wake_loop(watch, stop.clone()));
        futures::future::join_all(loops).await;
    }

    async fn wake_loop(self, mut watch: SubmitWatch, stop: CancellationToken) {
        let mut board = self.inner.board.changed.subscribe();
        let mut failed = 0u32;
        loop {
            // armed only while an idle worker would take what it wakes
            while watch.queues().iter().all(|q| self.idle_names(q).is_empty()) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = board.changed() => if changed.is_err() { return },
                }
            }
            let woken = tokio::select! {
                () = stop.cancelled() => return,
                woken = watch.next(BLOCK, |q| self.idle_names(q)) => woken,
            };
            let woken = match woken {
                Ok(woken) => woken,
                Err(e) => {
                    // said once per spell of failures (the health monitor
                    // reports Redis itself being down)
                    if failed == 0 {
                        tracing::warn!(error = %e, queues = ?watch.queues(), "cannot wait for wakes from other koo processes; idle workers here find their tasks at their next poll until it works again");
                    }
                    let pause = RETRY.saturating_mul(1 << failed.min(6)).min(MAX_RETRY);
                    failed = failed.saturating_add(1);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            };
            if failed > 0 {
                tracing::info!(queues = ?watch.queues(), "waiting for wakes from other koo processes again");
                failed = 0;
            }
            if let Some(Woken { queue, name }) = woken {
                self.inner.counters.woken(&queue);
                // (`*`: pushed for workers that serve any name)
                let name = name.filter(|n| n != "*");
                self.made_ready(queue, name.as_deref());
            }
        }
    }
}
