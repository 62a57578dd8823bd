//! The task store's notion of now.
//!
//! On Redis every script reads the server's `TIME` (one clock for every koo
//! process); the embedded store reads the system clock. A test can instead
//! hand both backends a **manual** clock that stands still until it is
//! advanced: the model-based parity test (`tests/it/parity.rs`) lets leases
//! lapse and tasks come due on both backends at exactly the same instants,
//! without waiting in real time and without the few milliseconds that pass
//! between two calls deciding an outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

/// A clock: the real one, or a manual one for tests.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None`: the real clock. `Some`: the manual clock's now (ms since the
    /// epoch), shared by every copy.
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that reads `start_ms` until [`Clock::advance`] moves it.
    pub fn manual(start_ms: i64) -> Self {
        Self {
            manual: Some(Arc::new(AtomicI64::new(start_ms))),
        }
    }

    /// Moves a manual clock (and every copy of it) `by` ahead; the real
    /// clock cannot be moved (a no-op).
    pub fn advance(&self, by: Duration) {
        if let Some(now) = &self.manual {
            let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
            now.fetch_add(ms, Ordering::Relaxed);
        }
    }

    /// The manual clock's now, which a Redis script must use instead of
    /// `TIME`; `None` for the real clock (the script reads `TIME`).
    pub fn pinned_ms(&self) -> Option<i64> {
        self.manual.as_ref().map(|now| now.load(Ordering::Relaxed))
    }

    /// Now, ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.pinned_ms()
            .unwrap_or_else(|| super::unix_millis(SystemTime::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manual clock stands still until advanced, and copies share it; the
    /// real clock is not pinned.
    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual(1_000);
        let copy = clock.clone();
        assert_eq!(copy.now_ms(), 1_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(copy.now_ms(), 3_000);
        assert_eq!(copy.pinned_ms(), Some(3_000));
        let real = Clock::system();
        assert_eq!(real.pinned_ms(), None);
        real.advance(Duration::from_secs(60));
        assert!((real.now_ms() - super::super::unix_millis(SystemTime::now())).abs() < 1_000);
    }
}
