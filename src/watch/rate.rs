//! When the event reader lets deliveries gather (see `feed`): under a
//! steady flow, after a read that found only a few events, the reader
//! waits [`GATHER`] so that every watcher gets events in batches; a
//! sporadic event goes out at once.
//!
//! The flow is judged over short windows (10 ms), so that a burst's verdict
//! outlives the burst by at most two windows (a flow judged high stays so
//! down to half the bar, so that a steady flow's uneven windows keep it): judged over 100 ms, the lone
//! tasks that followed a burst of 5,000 waited the 5 ms gather for a tenth
//! of a second (the round trip's p99 in `scripts/bench-tasks` was 6 ms,
//! against 1.3 ms without a burst before it).

use std::time::Duration;

/// Under a steady flow of deliveries (more than [`GATHER_ABOVE`] a second:
/// events times the watchers that get them), how
/// long the reader lets more gather after a read that found only a few:
/// every watcher then gets events in batches (one wake-up and one write for
/// many, where a wake-up per event per watcher would cost koo the CPU its
/// workers need), for at most this much latency. A sporadic event (a
/// dashboard following one task at a time) goes out at once.
pub(super) const GATHER: Duration = Duration::from_millis(5);

/// The delivery rate (events handed to watchers, per second, per queue)
/// above which the reader gathers. Below it the wake-ups cost little, and a
/// client following tasks one at a time keeps its latency.
const GATHER_ABOVE: u64 = 20_000;

/// The delivery rate of one feed, over windows of [`Rate::WINDOW`].
pub(super) struct Rate {
    window: tokio::time::Instant,
    events: u64,
    /// Whether the last whole window ran above [`GATHER_ABOVE`].
    high: bool,
}

impl Rate {
    const WINDOW: Duration = Duration::from_millis(10);

    pub(super) fn new() -> Self {
        Self {
            window: tokio::time::Instant::now(),
            events: 0,
            high: false,
        }
    }

    /// Counts `n` deliveries; whether the flow is steady enough to gather.
    pub(super) fn add(&mut self, n: usize) -> bool {
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(self.window);
        if elapsed >= Self::WINDOW {
            // a window that ended long ago says nothing about now; a high
            // flow stays judged high down to half the bar, so that one
            // short window of a steady flow does not end its batches
            let rate = self.events * 1000 / Self::WINDOW.as_millis() as u64;
            let bar = if self.high {
                GATHER_ABOVE / 2
            } else {
                GATHER_ABOVE
            };
            self.high = elapsed < 2 * Self::WINDOW && rate > bar;
            self.window = now;
            self.events = 0;
        }
        self.events += n as u64;
        self.high
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flow of a window decides the next one; a burst's verdict ends
    /// within two windows of quiet; a window that ended long ago says
    /// nothing.
    #[tokio::test(start_paused = true)]
    async fn a_bursts_verdict_ends_within_two_windows() {
        let mut rate = Rate::new();
        // 300 deliveries in one 10 ms window: 30,000 a second
        assert!(!rate.add(300), "not judged before the window ends");
        tokio::time::advance(Rate::WINDOW).await;
        assert!(rate.add(1), "the burst's window was above the bar");
        tokio::time::advance(Rate::WINDOW).await;
        assert!(!rate.add(1), "one quiet window ends it");
        // a burst, then a long pause: stale, not judged
        assert!(!rate.add(1000));
        tokio::time::advance(3 * Rate::WINDOW).await;
        assert!(!rate.add(1));
        // below the bar: 150 in a window is 15,000 a second
        assert!(!rate.add(150));
        tokio::time::advance(Rate::WINDOW).await;
        assert!(!rate.add(1));
    }

    /// A high flow stays high through a window down to half the bar, and
    /// ends below it.
    #[tokio::test(start_paused = true)]
    async fn a_steady_flow_keeps_its_verdict_through_a_dip() {
        let mut rate = Rate::new();
        rate.add(300);
        tokio::time::advance(Rate::WINDOW).await;
        assert!(rate.add(150), "judged high");
        tokio::time::advance(Rate::WINDOW).await;
        assert!(rate.add(80), "15,000 a second: still high");
        tokio::time::advance(Rate::WINDOW).await;
        assert!(!rate.add(1), "8,000 a second: under half the bar");
    }
}
