//! Compute locks in the embedded store (see [`crate::store::lock`]): a map
//! of lock name → (value, expiry), with the Redis scripts' semantics.
//!
//! Its own `std::sync::Mutex`, apart from the entries' lock: lock calls are
//! rare (misses only), never held across an `.await`, and must not contend
//! with reads. Expired locks are dropped when met and, so that the map stays
//! bounded by the locks alive, swept whenever it has doubled since the last
//! sweep.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::store::{LockState, held_by};

#[derive(Default)]
pub(super) struct Locks {
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    locks: HashMap<String, (String, Instant)>,
    /// Size after the last sweep.
    swept: usize,
}

impl Table {
    /// The live lock named `lock`, dropping it if it has expired.
    fn live(&mut self, lock: &str, now: Instant) -> Option<&mut (String, Instant)> {
        if self.locks.get(lock).is_some_and(|(_, exp)| *exp <= now) {
            self.locks.remove(lock);
        }
        self.locks.get_mut(lock)
    }

    fn sweep(&mut self, now: Instant) {
        if self.locks.len() >= (self.swept * 2).max(64) {
            self.locks.retain(|_, (_, exp)| *exp > now);
            self.swept = self.locks.len();
        }
    }
}

impl Locks {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn take(&self, lock: &str, token: &str, ttl: Duration) -> LockState {
        let now = Instant::now();
        let mut t = self.table();
        if let Some((value, exp)) = t.live(lock, now) {
            return LockState::Held {
                value: value.clone(),
                left: exp.saturating_duration_since(now),
            };
        }
        t.sweep(now);
        let exp = now.checked_add(ttl).unwrap_or(now);
        t.locks.insert(lock.to_owned(), (token.to_owned(), exp));
        LockState::Acquired
    }

    pub(super) fn peek(&self, lock: &str) -> Option<(String, Duration)> {
        let now = Instant::now();
        let mut t = self.table();
        t.live(lock, now)
            .map(|(v, exp)| (v.clone(), exp.saturating_duration_since(now)))
    }

    pub(super) fn replace(&self, lock: &str, token: &str, value: &str) -> bool {
        let now = Instant::now();
        let mut t = self.table();
        match t.live(lock, now) {
            Some((v, _)) if held_by(v, token) => {
                *v = value.to_owned();
                true
            }
            _ => false,
        }
    }

    pub(super) fn drop_if(&self, lock: &str, token: &str) -> bool {
        let now = Instant::now();
        let mut t = self.table();
        match t.live(lock, now) {
            Some((v, _)) if held_by(v, token) => {
                t.locks.remove(lock);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One taker wins until the lease passes; only the holder releases.
    #[test]
    fn one_holder_until_the_lease_passes() {
        let locks = Locks::default();
        let ttl = Duration::from_millis(30);
        assert_eq!(locks.take("l", "a", ttl), LockState::Acquired);
        assert!(matches!(locks.take("l", "b", ttl), LockState::Held { value, .. } if value == "a"));
        assert!(!locks.drop_if("l", "b"));
        assert!(locks.replace("l", "a", "a|t~1"));
        assert_eq!(locks.peek("l").unwrap().0, "a|t~1");
        std::thread::sleep(ttl);
        assert_eq!(locks.peek("l"), None);
        assert_eq!(locks.take("l", "b", ttl), LockState::Acquired);
        assert!(locks.drop_if("l", "b"));
        assert_eq!(locks.peek("l"), None);
    }
}
