//! The run and wait times' flush: on Redis, a koo process adds up the
//! times of the attempts it ends and writes them about once a second (see
//! [`crate::store::tasks::TaskBackend::flush_times`]), so `GetTaskMetrics`
//! on another process shows them up to [`FLUSH_EVERY`] later. A process
//! killed with -9 loses at most one interval of figures (never a task).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::TaskEngine;
use crate::store::Deadline;

/// How often the times are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// How long one flush may take (at shutdown too: stopping waits no more).
const FLUSH_BOUND: Duration = Duration::from_secs(2);

impl TaskEngine {
    /// Writes the times every [`FLUSH_EVERY`] until `stop`, then once more.
    /// Whoever ends attempts after `stop` (workers given a grace) calls
    /// [`Self::flush_times`] again once they have stopped.
    pub async fn run_times_flush(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.flush_times().await;
            // a limit set through another koo process
            if let Err(e) = self.refresh_flow(Deadline::after(FLUSH_BOUND)).await {
                tracing::debug!(error = %e, "cannot read the limits' version");
            }
        }
        self.flush_times().await;
    }

    /// Writes the times this process has added up since the last flush
    /// (bounded by [`FLUSH_BOUND`]; a failure is logged: figures, not
    /// tasks, are lost).
    pub async fn flush_times(&self) {
        let deadline = Deadline::after(FLUSH_BOUND);
        if let Err(e) = self.inner.store.flush_times(deadline).await {
            tracing::warn!(error = %e, "cannot write the run and wait times");
        }
    }
}
