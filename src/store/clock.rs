//! The task store's notion of now.
//!
//! On Redis every script reads the server's `TIME` (one clock for every koo
//! process); the embedded store reads the system clock. Tests move time
//! without waiting for it in two ways:
//! - an **offset** ([`Clock::advance`] on [`Clock::system`]): the real clock
//!   shifted ahead, e.g. past a lease, on one backend at a time;
//! - a **manual** clock ([`Clock::manual`]) that stands still until it is
//!   advanced: the model-based parity test (`tests/it/parity.rs`) hands one
//!   to both backends, so that leases lapse and tasks come due at exactly
//!   the same instant on both, whatever few milliseconds pass between two
//!   calls.
//!
//! Every script invocation passes the clock as `ARGV[1]` (see
//! `redis/script.rs`: the offset, `0` in production, or `@` and the pinned
//! now); the generated prelude turns it into `now` and `CLOCK_OFFSET` (how
//! far the store's now is ahead of Redis's `TIME`).
//!
//! What the clock moves: every time a transition computes from now (lease
//! and hard deadlines, due times, `started_ms`, `finished_ms`, history and
//! event times, a queue's oldest wait), the expiry of idempotency claims on
//! both stores (on Redis a claim's TTL is stretched by `CLOCK_OFFSET` and it
//! counts as live while more than that is left: `idem_claim.lua`) and, on
//! the embedded store, every other expiry. What it cannot move: Redis's own
//! expiry of task results and worker records (keys with a TTL) runs on
//! Redis's real clock, so a test that moves the clock past a result TTL sees
//! the embedded store forget and Redis remember; compare those with short
//! real TTLs, or not across a clock jump.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

/// A clock: the real one (shifted by an offset only tests move), or a
/// manual one for tests.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// How far ahead of the real clock this one is, ms (shared by copies).
    offset_ms: Arc<AtomicI64>,
    /// `Some`: a manual clock's now (ms since the epoch), shared by copies.
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
            offset_ms: Arc::default(),
            manual: Some(Arc::new(AtomicI64::new(start_ms))),
        }
    }

    /// Moves this clock (and every copy of it) `by` ahead.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        match &self.manual {
            Some(now) => now.fetch_add(ms, Ordering::Relaxed),
            None => self.offset_ms.fetch_add(ms, Ordering::Relaxed),
        };
    }

    /// How far ahead of the real clock a real clock is, ms (0 for a
    /// manual one, whose now is [`Clock::pinned_ms`]).
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// A manual clock's now, which a Redis script must use instead of
    /// `TIME`; `None` for the real clock.
    pub fn pinned_ms(&self) -> Option<i64> {
        self.manual.as_ref().map(|now| now.load(Ordering::Relaxed))
    }

    /// How far this clock is ahead of the real one, ms: the offset, or for a
    /// manual clock its now less the real now (negative once real time has
    /// passed it).
    pub fn ahead_of_real_ms(&self) -> i64 {
        match self.pinned_ms() {
            Some(now) => now - super::unix_millis(SystemTime::now()),
            None => self.offset_ms(),
        }
    }

    /// Now, ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.pinned_ms().unwrap_or_else(|| {
            super::unix_millis(SystemTime::now()).saturating_add(self.offset_ms())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_now() -> i64 {
        super::super::unix_millis(SystemTime::now())
    }

    /// Copies share the offset; the real clock has none.
    #[test]
    fn advancing_moves_every_copy() {
        let clock = Clock::system();
        let copy = clock.clone();
        assert_eq!(copy.offset_ms(), 0);
        assert_eq!(copy.pinned_ms(), None);
        clock.advance(Duration::from_secs(2));
        assert_eq!(copy.offset_ms(), 2000);
        assert!(copy.now_ms() >= real_now() + 1999);
    }

    /// A manual clock stands still until advanced, and copies share it.
    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual(1_000);
        let copy = clock.clone();
        assert_eq!(copy.now_ms(), 1_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(copy.now_ms(), 3_000);
        assert_eq!(copy.pinned_ms(), Some(3_000));
        assert_eq!(copy.offset_ms(), 0);
    }
}
