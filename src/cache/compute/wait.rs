//! The waiting side of GetOrLock: retry the step whenever the entry may
//! have changed, until an answer, the caller's `wait`, or its deadline.
//!
//! A waiter wakes on the [`FillSignal`](super::FillSignal) (a fill through
//! this koo), on a bounded poll (5 ms doubling to 50 ms: a fill made through
//! another koo, or a task's result), and always at the lock's expiry, when
//! it may take the lock over.

use std::time::Duration;

use tokio::time::Instant;

use super::{Locked, Step};
use crate::cache::{Cache, CacheError, Level, Result};
use crate::store::Deadline;

/// The first poll interval.
const POLL_MIN: Duration = Duration::from_millis(5);
/// The longest poll interval: a fill made elsewhere reaches a waiter at
/// most this late.
const POLL_MAX: Duration = Duration::from_millis(50);

/// Runs GetOrLock's step until it answers.
pub(super) async fn until_done(
    cache: &Cache,
    level: Level,
    key: &str,
    lock_ttl: Duration,
    wait_until: Option<Deadline>,
    deadline: Deadline,
) -> Result<Locked> {
    // `wait` ends the wait with an answer; the call's deadline with an error.
    let (until, answer_at_end) = match wait_until {
        Some(w) if w < deadline => (w.instant(), true),
        _ => (deadline.instant(), false),
    };
    let mut poll = POLL_MIN;
    let mut waited_on = None;
    loop {
        let woken = cache.inner.fills.listen(level, key);
        match cache.lock_step(level, key, lock_ttl, deadline).await? {
            Step::Done(Locked::Value { hit, .. }) => {
                return Ok(Locked::Value { hit, waited_on });
            }
            Step::Done(answer) => return Ok(answer),
            Step::Wait { holder, left } => {
                waited_on = Some(holder);
                let now = Instant::now();
                if now >= until {
                    return if answer_at_end {
                        Ok(Locked::TimedOut)
                    } else {
                        Err(CacheError::DeadlineExceeded)
                    };
                }
                // Just past the lock's expiry, so that the retry can take it.
                let lapse = now + left + Duration::from_millis(1);
                let next = (now + poll).min(lapse).min(until);
                let _ = tokio::time::timeout_at(next, woken).await;
                poll = (poll * 2).min(POLL_MAX);
            }
        }
    }
}
