//! The task store's notion of now.
//!
//! On Redis every script reads the server's `TIME` (one clock for every koo
//! process) plus this clock's offset, which each invocation passes as
//! `ARGV[1]` (see `redis/script.rs`); the embedded store reads the system
//! clock plus the offset. The offset is zero unless a test moves it ahead
//! with [`Clock::advance`]: the model-based parity test
//! (`tests/it/parity.rs`) lets leases lapse, tasks come due and hard limits
//! pass on both backends alike without waiting in real time.
//!
//! What the offset moves: every time a transition computes from now (lease
//! and hard deadlines, due times, `created_ms`, `started_ms`,
//! `finished_ms`, history and event times, a queue's oldest wait), the
//! expiry of idempotency claims on both stores (on Redis a claim's TTL is
//! stretched by the offset and it counts as live while more than the
//! offset is left: `idem_claim.lua`), and, on the embedded store, every
//! other expiry. What it cannot move: Redis's own expiry of task results
//! and worker records (keys with a TTL) runs on Redis's real clock, so a
//! test that advances the clock past a result TTL sees the embedded store
//! forget and Redis remember; compare those with short real TTLs, or not
//! across a clock jump.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

/// A clock: the real one, plus an offset that only tests move.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The real clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Moves this clock (and every copy of it) `by` ahead.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// How far ahead of the real clock this one is, ms.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Now, ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        super::unix_millis(SystemTime::now()).saturating_add(self.offset_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies share the offset; the real clock has none.
    #[test]
    fn advancing_moves_every_copy() {
        let clock = Clock::system();
        let copy = clock.clone();
        assert_eq!(copy.offset_ms(), 0);
        clock.advance(Duration::from_secs(2));
        assert_eq!(copy.offset_ms(), 2000);
        assert!(copy.now_ms() >= super::super::unix_millis(SystemTime::now()) + 1999);
    }
}
