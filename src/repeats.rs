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

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How long a run of failures stays quiet before it warns again.
pub const REMIND: Duration = Duration::from_secs(600);

/// One call site's runs of failures, one run per key (a queue: one queue
/// failing while the others work is its own run, not a run that every
/// other queue's success ends and restarts). A `static`, shared by every
/// slot and engine of the process that reaches the site.
#[derive(Debug)]
pub struct Repeats {
    /// Keys with a run going: the common case (none) costs a success one
    /// atomic read, no lock.
    running: AtomicUsize,
    runs: Mutex<BTreeMap<String, Run>>,
}

/// One key's run.
#[derive(Debug, Default)]
struct Run {
    /// Failures since the key's last success.
    failed: u64,
    /// When the run last warned (ms on [`since_epoch_ms`]'s clock).
    warned_ms: u64,
}

impl Repeats {
    pub const fn new() -> Self {
        Self {
            running: AtomicUsize::new(0),
            runs: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts a failure for `key`; whether to log it as a warning (the
    /// first of the key's run, or the first [`REMIND`] after its last
    /// warning) rather than a debug line.
    pub fn failed(&self, key: &str) -> bool {
        self.failed_at(key, since_epoch_ms())
    }

    /// [`Repeats::failed`] at `now_ms` (ms on a monotonic clock).
    fn failed_at(&self, key: &str, now_ms: u64) -> bool {
        let mut runs = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let run = runs.entry(key.to_owned()).or_insert_with(|| {
            self.running.fetch_add(1, Relaxed);
            Run::default()
        });
        run.failed += 1;
        let due =
            run.failed == 1 || now_ms.saturating_sub(run.warned_ms) >= REMIND.as_millis() as u64;
        if due {
            run.warned_ms = now_ms;
        }
        due
    }

    /// A success for `key`: how many failed since its last one (0 when
    /// none did).
    pub fn succeeded(&self, key: &str) -> u64 {
        if self.running.load(Relaxed) == 0 {
            return 0;
        }
        let mut runs = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match runs.remove(key) {
            Some(run) => {
                self.running.fetch_sub(1, Relaxed);
                run.failed
            }
            None => 0,
        }
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

/// Logs a failure of a repeating call at `site` ([`Repeats`]) for `key`:
/// WARN for the first of the key's run, DEBUG for the rest; the fields and
/// message as `tracing::warn!` takes them.
macro_rules! warn_once_per_run {
    ($site:expr, $key:expr, $($rest:tt)+) => {
        if $site.failed($key) {
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
        assert_eq!(r.succeeded("q"), 0);
        assert!(r.failed("q"));
        assert!(!r.failed("q"));
        assert!(!r.failed("q"));
        assert_eq!(r.succeeded("q"), 3);
        assert_eq!(r.succeeded("q"), 0);
        assert!(r.failed("q"), "a new run warns again");
    }

    /// One key failing while another works is one run: the other's
    /// successes neither end it nor report it.
    #[test]
    fn keys_have_runs_of_their_own() {
        let r = Repeats::new();
        assert!(r.failed("broken"));
        for _ in 0..5 {
            assert_eq!(r.succeeded("fine"), 0);
            assert!(!r.failed("broken"), "the run goes on");
        }
        assert!(r.failed("other"), "another key's first failure warns");
        assert_eq!(r.succeeded("broken"), 6);
        assert_eq!(r.succeeded("other"), 1);
        assert_eq!(r.running.load(Relaxed), 0);
    }

    /// A run past REMIND warns again, once.
    #[test]
    fn a_long_run_warns_again() {
        let r = Repeats::new();
        let remind = REMIND.as_millis() as u64;
        assert!(r.failed_at("q", 5));
        assert!(!r.failed_at("q", 5 + remind - 1));
        assert!(r.failed_at("q", 5 + remind));
        assert!(!r.failed_at("q", 6 + remind));
        assert_eq!(r.succeeded("q"), 4);
    }

    /// Failures and successes from many threads: every run that warned
    /// is reported once, and none is left running.
    #[test]
    fn concurrent_failures_and_successes_stay_consistent() {
        let r = std::sync::Arc::new(Repeats::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let key = format!("q{}", t % 2);
                    let (mut warned, mut reported) = (0u64, 0u64);
                    for i in 0..1000 {
                        if i % 10 == 9 {
                            reported += r.succeeded(&key);
                        } else if r.failed(&key) {
                            warned += 1;
                        }
                    }
                    (warned, reported)
                })
            })
            .collect();
        let (mut failures_reported, mut warnings) = (0, 0);
        for t in threads {
            let (w, rep) = t.join().unwrap();
            warnings += w;
            failures_reported += rep;
        }
        failures_reported += r.succeeded("q0") + r.succeeded("q1");
        assert_eq!(failures_reported, 4 * 900, "every failure counted once");
        assert!((1..=400).contains(&warnings), "{warnings}");
        assert_eq!(r.running.load(Relaxed), 0);
    }
}
