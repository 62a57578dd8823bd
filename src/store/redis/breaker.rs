//! A circuit breaker in front of Redis.
//!
//! When Redis is down, every call would otherwise wait for a connect attempt
//! and its retries. After `threshold` consecutive failures the breaker opens:
//! calls are refused at once with `UNAVAILABLE` for a cool-down, then one trial
//! call is let through (half-open); its success closes the breaker, its failure
//! opens it again. The health probe also counts as a trial, so koo notices that
//! Redis is back even when no client is calling.
//!
//! The closed state, the common case, costs one atomic load per call. The
//! other states are rare and keep their details behind a `std::sync::Mutex`
//! (never held across an `.await`).

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::store::{CircuitState, LastError, StoreError};

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

pub(super) struct Breaker {
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    threshold: u32,
    cooldown: Duration,
    slow: Mutex<Slow>,
    changes: watch::Sender<CircuitState>,
}

struct Slow {
    opened_at: Instant,
    /// When the current half-open trial began. A trial whose caller went away
    /// never reports back, so a new one is allowed after another cool-down.
    trial_started: Option<Instant>,
    last_error: Option<LastError>,
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Self {
        let (changes, _) = watch::channel(CircuitState::Closed);
        Self {
            state: AtomicU8::new(CLOSED),
            consecutive_failures: AtomicU32::new(0),
            threshold: threshold.max(1),
            cooldown,
            slow: Mutex::new(Slow {
                opened_at: Instant::now(),
                trial_started: None,
                last_error: None,
            }),
            changes,
        }
    }

    fn slow(&self) -> std::sync::MutexGuard<'_, Slow> {
        self.slow.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn state(&self) -> CircuitState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => CircuitState::Closed,
            OPEN => CircuitState::Open,
            _ => CircuitState::HalfOpen,
        }
    }

    pub(super) fn watch(&self) -> watch::Receiver<CircuitState> {
        self.changes.subscribe()
    }

    pub(super) fn last_error(&self) -> Option<LastError> {
        self.slow().last_error.clone()
    }

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        let new = self.state();
        self.changes.send_if_modified(|s| {
            let changed = *s != new;
            *s = new;
            changed
        });
    }

    /// Lets a call through, or refuses it while the breaker is open.
    pub(super) fn admit(&self) -> Result<(), StoreError> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Ok(());
        }
        let mut slow = self.slow();
        let now = Instant::now();
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(()),
            OPEN if now.duration_since(slow.opened_at) >= self.cooldown => {
                slow.trial_started = Some(now);
                self.set(HALF_OPEN);
                Ok(())
            }
            HALF_OPEN
                if slow
                    .trial_started
                    .is_none_or(|t| now.duration_since(t) >= self.cooldown) =>
            {
                slow.trial_started = Some(now);
                Ok(())
            }
            state => {
                let last = slow
                    .last_error
                    .as_ref()
                    .map_or("none", |e| e.message.as_str());
                let wait = self
                    .cooldown
                    .saturating_sub(now.duration_since(slow.opened_at));
                Err(StoreError::Unavailable(format!(
                    "Redis circuit breaker is {} after {} consecutive failures (last error: {last}); next trial in {} ms",
                    if state == OPEN {
                        "open"
                    } else {
                        "half-open with a trial in flight"
                    },
                    self.threshold,
                    wait.as_millis()
                )))
            }
        }
    }

    /// Redis answered (even with an error reply): it is reachable.
    pub(super) fn on_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.state.load(Ordering::Acquire) != CLOSED {
            let mut slow = self.slow();
            slow.trial_started = None;
            self.set(CLOSED);
        }
    }

    /// Redis could not be reached or did not answer in time.
    pub(super) fn on_failure(&self, message: &str) {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let mut slow = self.slow();
        slow.last_error = Some(LastError {
            message: message.to_owned(),
            at: SystemTime::now(),
        });
        let state = self.state.load(Ordering::Acquire);
        if state == HALF_OPEN || (state == CLOSED && failures >= self.threshold) {
            slow.opened_at = Instant::now();
            slow.trial_started = None;
            self.set(OPEN);
        } else if state == OPEN {
            // A failed probe while open restarts the cool-down.
            slow.opened_at = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens after the threshold, refuses during the cool-down, lets one trial
    /// through after it, and closes on success.
    #[test]
    fn opens_then_half_opens_then_closes() {
        let b = Breaker::new(3, Duration::from_millis(0));
        let mut changes = b.watch();
        b.on_failure("boom");
        b.on_failure("boom");
        assert_eq!(b.state(), CircuitState::Closed);
        b.on_failure("boom");
        assert_eq!(b.state(), CircuitState::Open);
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), CircuitState::Open);
        // cool-down of zero: the next call is the trial
        b.admit().unwrap();
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.on_success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert_eq!(b.last_error().unwrap().message, "boom");
    }

    /// While open and cooling down, calls are refused with a message that
    /// names the last error.
    #[test]
    fn refuses_while_cooling_down() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.on_failure("connection refused");
        let err = b.admit().unwrap_err();
        let StoreError::Unavailable(msg) = err else {
            panic!("wrong error {err:?}")
        };
        assert!(msg.contains("connection refused"), "{msg}");
    }

    /// A failed trial reopens the breaker.
    #[test]
    fn failed_trial_reopens() {
        let b = Breaker::new(1, Duration::ZERO);
        b.on_failure("x");
        b.admit().unwrap();
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.on_failure("y");
        assert_eq!(b.state(), CircuitState::Open);
    }
}
