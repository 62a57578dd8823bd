//! A circuit breaker in front of Redis.
//!
//! When Redis is down, every call would otherwise wait for a connect attempt
//! and its retries. After `threshold` consecutive failures the breaker opens:
//! calls are refused at once with `UNAVAILABLE` for a cool-down, then one trial
//! call is let through (half-open); its success closes the breaker, its failure
//! opens it again. A probe's ping (the store's own recovery probe while the
//! breaker is not closed, and the health probe) also closes it, so koo notices
//! that Redis is back even when no client is calling.
//!
//! Only evidence that Redis is down counts as a failure: a refused or broken
//! connection, or silence for koo's own bound. A call that ends for want of
//! time (its caller's deadline) or whose caller went away proves nothing, so
//! it is neither: an [`Admission`] that ends that way, or is dropped, gives
//! up the trial slot it may hold, and the next call is the trial at once.
//! A trial therefore never keeps the breaker half-open for a cool-down.
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
    /// The half-open trial in flight: its number and when it began. A trial
    /// gives its slot back when it ends without a verdict; a new one is also
    /// allowed a cool-down after it began, should it ever hang.
    trial: Option<(u64, Instant)>,
    /// Numbers trials, so that a late hand-back of an old trial's slot
    /// cannot free the slot of the trial after it.
    trials: u64,
    last_error: Option<LastError>,
}

/// One call let through the breaker. Settle it with [`Self::succeeded`] or
/// [`Self::failed`]; dropping it (a deadline, a caller gone) records nothing
/// and hands a trial's slot back.
pub(super) struct Admission<'a> {
    breaker: &'a Breaker,
    /// The number of the half-open trial this call is, if it is one.
    trial: Option<u64>,
}

impl Admission<'_> {
    /// Redis answered (even with an error reply).
    pub(super) fn succeeded(self) {
        self.breaker.on_success();
    }

    /// Redis is down: refused, reset, or silent for koo's own bound.
    pub(super) fn failed(self, message: &str) {
        self.breaker.on_failure(message);
    }

    /// Whether another attempt may go out: always for the trial; otherwise
    /// only while the breaker stays closed (other calls may have opened it).
    pub(super) fn may_retry(&self) -> bool {
        self.trial.is_some() || self.breaker.state.load(Ordering::Acquire) == CLOSED
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.trial {
            let mut slow = self.breaker.slow();
            if slow.trial.is_some_and(|(t, _)| t == n) {
                slow.trial = None;
            }
        }
    }
}

/// What a failing call learnt about Redis: whether any attempt showed it
/// down (refused or broken connection, or silence for koo's own bound). A
/// call without such evidence failed for want of its caller's time.
#[derive(Default)]
pub(super) struct Evidence(Option<String>);

impl Evidence {
    /// An attempt failed in a way that says Redis is down; its message.
    pub(super) fn down(&mut self, message: String) -> String {
        self.0 = Some(message.clone());
        message
    }

    /// An attempt got no answer within `waited`: evidence only when that is
    /// at least `bound`, koo's own (a connect timeout). Its message.
    pub(super) fn silent(&mut self, waited: Duration, bound: Duration) -> String {
        let message = format!("no answer within {} ms", waited.as_millis());
        if waited >= bound {
            self.0 = Some(message.clone());
        }
        message
    }

    /// Ends a failed call: counts it against the breaker if there is
    /// evidence; otherwise the call proves nothing and the error is
    /// `DEADLINE_EXCEEDED` (Redis did not answer in the caller's time).
    pub(super) fn settle(self, admission: Admission<'_>, err: StoreError) -> StoreError {
        match self.0 {
            Some(message) => {
                admission.failed(&message);
                err
            }
            None => StoreError::DeadlineExceeded,
        }
    }
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
                trial: None,
                trials: 0,
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
    pub(super) fn admit(&self) -> Result<Admission<'_>, StoreError> {
        let admitted = |trial| {
            Ok(Admission {
                breaker: self,
                trial,
            })
        };
        if self.state.load(Ordering::Acquire) == CLOSED {
            return admitted(None);
        }
        let mut slow = self.slow();
        let now = Instant::now();
        let state = self.state.load(Ordering::Acquire);
        let trial_free = slow
            .trial
            .is_none_or(|(_, t)| now.duration_since(t) >= self.cooldown);
        let cooled = now.duration_since(slow.opened_at) >= self.cooldown;
        match state {
            CLOSED => admitted(None),
            OPEN | HALF_OPEN if trial_free && (state == HALF_OPEN || cooled) => {
                slow.trials += 1;
                let n = slow.trials;
                slow.trial = Some((n, now));
                self.set(HALF_OPEN);
                admitted(Some(n))
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
            slow.trial = None;
            self.set(CLOSED);
        }
    }

    /// Redis could not be reached or did not answer within koo's own bound.
    /// While open, a failure (a probe's) does not restart the cool-down: the
    /// trial a call gets after it is one more chance to notice recovery.
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
            slow.trial = None;
            self.set(OPEN);
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
        let Err(err) = b.admit() else {
            panic!("admitted while cooling down")
        };
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

    /// Pretends the cool-down began an hour ago.
    fn cool_down(b: &Breaker) {
        let past = Instant::now().checked_sub(Duration::from_secs(3600));
        b.slow().opened_at = past.expect("an hour of uptime");
    }

    /// A trial that ends without a verdict (its caller's deadline passed, or
    /// its caller went away) hands its slot back: the next call is the trial
    /// at once, not a cool-down later, and its success closes the breaker.
    #[test]
    fn a_trial_without_a_verdict_frees_the_slot_at_once() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.on_failure("connection refused");
        cool_down(&b);
        let trial = b.admit().unwrap();
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(b.admit().is_err(), "one trial at a time");
        drop(trial);
        let next = b.admit().expect("the next call is the trial");
        assert!(next.may_retry());
        next.succeeded();
        assert_eq!(b.state(), CircuitState::Closed);
    }

    /// A trial that hangs past a cool-down lets another through, and its
    /// late end does not free the newer trial's slot.
    #[test]
    fn a_stale_trial_does_not_free_a_newer_slot() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        b.on_failure("x");
        cool_down(&b);
        let old = b.admit().unwrap();
        let began = Instant::now().checked_sub(Duration::from_secs(3600));
        b.slow().trial.as_mut().unwrap().1 = began.unwrap();
        let _new = b.admit().expect("the old trial hung for a cool-down");
        drop(old);
        assert!(b.admit().is_err(), "the new trial is still in flight");
    }

    /// A call admitted while closed stops retrying once other calls opened
    /// the breaker.
    #[test]
    fn retries_stop_when_the_breaker_opens() {
        let b = Breaker::new(1, Duration::from_secs(3600));
        let call = b.admit().unwrap();
        assert!(call.may_retry());
        b.on_failure("refused");
        assert!(!call.may_retry());
    }
}
