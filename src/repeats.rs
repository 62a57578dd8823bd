//! A failure that repeats, logged once per run of failures.
//!
//! Why: koo's background loops call the store every second or so, per
//! queue and per worker slot. While Redis is down each of them failed and
//! warned on every round (about 12 lines a second for one `koo serve` with
//! six queues and four slots, 45,000 an hour), burying the one line that
//! matters (the breaker's "Redis unreachable") and costing log volume. A
//! call site now keeps a [`Repeats`]: the first failure of a run is a
//! warning, the ones after it are debug lines, and the first success after
//! it says at INFO how many failed. A run that lasts past [`REMIND`] warns
//! again, so that a long outage is not silent.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How long a run of failures stays quiet before it warns again.
pub const REMIND: Duration = Duration::from_secs(600);

/// One call site's run of failures (a `static`; shared by every queue,
/// slot and engine of the process that reaches that site).
#[derive(Debug)]
pub struct Repeats {
    /// Failures since the last success.
    failed: AtomicU64,
    /// When the last warning was let through, in ms since [`epoch`]
    /// (0: none in this run).
    warned_ms: AtomicU64,
}

impl Repeats {
    pub const fn new() -> Self {
        Self {
            failed: AtomicU64::new(0),
            warned_ms: AtomicU64::new(0),
        }
    }

    /// Counts a failure; whether to log it as a warning (the first of a
    /// run, or the first [`REMIND`] after the last warning) rather than a
    /// debug line.
    pub fn failed(&self) -> bool {
        self.failed_at(since_epoch_ms())
    }

    /// [`Repeats::failed`] at `now_ms` (ms on a monotonic clock).
    fn failed_at(&self, now_ms: u64) -> bool {
        self.failed.fetch_add(1, Relaxed);
        let now = now_ms.max(1);
        let last = self.warned_ms.load(Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= REMIND.as_millis() as u64;
        // one caller of a burst wins the warning
        due && self
            .warned_ms
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
    }

    /// A success: how many failed since the last one (0 when none did, the
    /// common case, which costs one atomic read).
    pub fn succeeded(&self) -> u64 {
        if self.failed.load(Relaxed) == 0 {
            return 0;
        }
        self.warned_ms.store(0, Relaxed);
        self.failed.swap(0, Relaxed)
    }
}

impl Default for Repeats {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since this process first asked (monotonic).
fn since_epoch_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Logs a failure of a repeating call at `site` ([`Repeats`]): WARN for
/// the first of a run, DEBUG for the rest; the fields and message as
/// `tracing::warn!` takes them.
macro_rules! warn_once_per_run {
    ($site:expr, $($rest:tt)+) => {
        if $site.failed() {
            tracing::warn!($($rest)+);
        } else {
            tracing::debug!($($rest)+);
        }
    };
}
pub(crate) use warn_once_per_run;

#[cfg(test)]
mod tests {
    use super::*;

    /// The first failure warns, the next ones do not; a success reports
    /// the run and starts a new one.
    #[test]
    fn one_warning_per_run() {
        let r = Repeats::new();
        assert_eq!(r.succeeded(), 0);
        assert!(r.failed());
        assert!(!r.failed());
        assert!(!r.failed());
        assert_eq!(r.succeeded(), 3);
        assert_eq!(r.succeeded(), 0);
        assert!(r.failed(), "a new run warns again");
    }

    /// A run past REMIND warns again, once.
    #[test]
    fn a_long_run_warns_again() {
        let r = Repeats::new();
        let remind = REMIND.as_millis() as u64;
        assert!(r.failed_at(5));
        assert!(!r.failed_at(5 + remind - 1));
        assert!(r.failed_at(5 + remind));
        assert!(!r.failed_at(6 + remind));
        assert_eq!(r.succeeded(), 4);
    }
}
