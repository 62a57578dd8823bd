//! Compute on miss, once: `GetOrLock` and `Fill` over the cache.
//!
//! Of the callers of a missing key, on any number of koo instances, the one
//! that takes the entry's lock (a store key with a TTL, see
//! [`crate::store::lock`]) receives a token and computes; the others wait
//! ([`wait`]) for the entry, and take the lock over when it lapses. A stale
//! entry (past its soft TTL) is answered to everyone, and the caller that
//! takes the lock also gets a token to refresh it.
//!
//! The entry is read as [`Cache::get`] reads it, so that whatever decides a
//! hit (tags, soft TTL) decides it here too; the lock is a second store
//! call, made only on a miss or a stale hit, so a plain hit costs one read.
//! A call counts one hit or miss in the metrics, however many reads it made.

mod signal;
mod wait;

use std::time::{Duration, SystemTime};

pub use self::signal::{FillSignal, LocalFills};
use super::{Cache, CacheError, Hit, Level, NewEntry, Result, Stored};
use crate::store::{Deadline, LockState, StoreError, held_by};

/// The length of a lock token: 128 random bits in hex.
pub const TOKEN_LEN: usize = 32;

/// How long a late holder's retaken lock lasts: long enough for its one
/// write, released right after it.
const RETAKE_TTL: Duration = Duration::from_secs(10);

/// A lock handed to the caller that must compute (or refresh) a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The token to `Fill` with.
    pub token: String,
    /// When the lock lapses and a waiter may take over.
    pub expires: SystemTime,
}

/// What `get_or_lock` answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Locked {
    /// The value (possibly stale, when someone else refreshes it).
    Value {
        /// The entry.
        hit: Hit,
        /// The lock's value while this caller waited, if it did (names the
        /// task computing it, for GetOrCompute).
        waited_on: Option<String>,
    },
    /// A stale value, and the lock to refresh it.
    Refresh {
        /// The stale entry.
        hit: Hit,
        /// The lock.
        lease: Lease,
    },
    /// No value: this caller must compute it.
    Compute(Lease),
    /// Neither came within the caller's `wait`.
    TimedOut,
}

/// One attempt: an answer, or someone else's lock to wait on.
enum Step {
    Done(Locked),
    Wait {
        /// The lock's value.
        holder: String,
        /// Time left before it lapses.
        left: Duration,
    },
}

/// A fresh, unguessable token.
fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Cache {
    /// Checks a lock token's shape (`field` names it).
    fn check_token(&self, field: &str, token: &str) -> Result<()> {
        // lower case only, as handed out: an upper-case copy would pass
        // here and then never match the lock ("lost")
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if token.len() != TOKEN_LEN || !token.bytes().all(hex) {
            return Err(CacheError::invalid(
                field,
                format!(
                    "{} is not a token GetOrLock hands out (32 lower-case hex digits)",
                    crate::quote::quote(token)
                ),
            ));
        }
        Ok(())
    }

    /// Reads `key`; on a miss (or a stale hit) elects one caller to compute
    /// it, holding the lock for `lock_ttl`. Others wait until `wait_until`
    /// (then [`Locked::TimedOut`]) or, past `deadline`, fail with
    /// [`CacheError::DeadlineExceeded`].
    pub async fn get_or_lock(
        &self,
        level: Level,
        key: &str,
        lock_ttl: Duration,
        wait_until: Option<Deadline>,
        deadline: Deadline,
    ) -> Result<Locked> {
        self.check_key(|| "key".into(), key)?;
        let result = wait::until_done(self, level, key, lock_ttl, wait_until, deadline).await;
        // One read per call, whatever it took to answer: a hit when the
        // caller got a value (fresh, stale or one it waited for), a miss
        // when it must compute or gave up waiting (its `wait` or its
        // deadline); a call the store failed reads nothing. Re-reads and a waiter's
        // polls are not reads of their own (they would count a miss every
        // few milliseconds of a wait), and the call has no latency figure:
        // its time is mostly the wait for whoever computes.
        let found = match &result {
            Ok(Locked::Value { .. } | Locked::Refresh { .. }) => Some(1),
            // the deadline found it waiting, or in a store call of its wait
            Ok(Locked::Compute(_) | Locked::TimedOut)
            | Err(CacheError::DeadlineExceeded | CacheError::Store(StoreError::DeadlineExceeded)) => {
                Some(0)
            }
            Err(_) => None,
        };
        if let Some(found) = found {
            self.inner.metrics.reads(level, found, 1 - found);
        }
        self.count_call(level, &result);
        result
    }

    /// One attempt: read, then (miss or stale) try the lock.
    async fn lock_step(
        &self,
        level: Level,
        key: &str,
        lock_ttl: Duration,
        deadline: Deadline,
    ) -> Result<Step> {
        let hit = match self.read(level, key, deadline).await? {
            Some(hit) if !hit.stale => {
                return Ok(Step::Done(Locked::Value {
                    hit,
                    waited_on: None,
                }));
            }
            other => other,
        };
        let lock = self.inner.keys.lock_key(level, key);
        let token = new_token();
        let state = self
            .inner
            .store
            .lock_acquire(&lock, &token, lock_ttl, deadline)
            .await?;
        let lease = Lease {
            token,
            expires: SystemTime::now() + lock_ttl,
        };
        Ok(match (state, hit) {
            (LockState::Held { .. }, Some(hit)) => Step::Done(Locked::Value {
                hit,
                waited_on: None,
            }),
            (LockState::Held { value, left }, None) => Step::Wait {
                holder: value,
                left,
            },
            (LockState::Acquired, Some(hit)) => Step::Done(Locked::Refresh { hit, lease }),
            (LockState::Acquired, None) => self.recheck(level, key, lease, deadline).await?,
        })
    }

    /// After taking the lock on a miss: the holder before us may have filled
    /// the entry between our read and our lock (it fills, then releases), so
    /// read once more rather than compute it twice.
    async fn recheck(
        &self,
        level: Level,
        key: &str,
        lease: Lease,
        deadline: Deadline,
    ) -> Result<Step> {
        Ok(Step::Done(match self.read(level, key, deadline).await? {
            None => Locked::Compute(lease),
            Some(hit) if hit.stale => Locked::Refresh { hit, lease },
            Some(hit) => {
                self.release_lock(level, key, &lease.token, deadline)
                    .await?;
                Locked::Value {
                    hit,
                    waited_on: None,
                }
            }
        }))
    }

    /// Stores `entry` (or, with `None`, stores nothing) under the lock that
    /// `token` holds, then releases the lock and wakes the waiters. Refused
    /// with [`CacheError::LockLost`] when the token no longer holds it.
    pub async fn fill(
        &self,
        level: Level,
        key: &str,
        token: &str,
        entry: Option<NewEntry>,
        deadline: Deadline,
    ) -> Result<Option<Stored>> {
        self.check_key(|| "key".into(), key)?;
        self.check_token("lock_token", token)?;
        if let Some(e) = &entry {
            self.check_entry(String::new, e)?;
        }
        let lock = self.inner.keys.lock_key(level, key);
        let held = match self.inner.store.lock_read(&lock, deadline).await? {
            Some((value, _)) if held_by(&value, token) => true,
            Some(_) => return Err(CacheError::LockLost),
            None => false,
        };
        let Some(entry) = entry else {
            // a give-up; of a lapsed lock, nothing to give
            if held {
                self.release_lock(level, key, token, deadline).await?;
            }
            return Ok(None);
        };
        if !held {
            self.retake(level, key, &lock, token, deadline).await?;
        }
        let stored = self.set(entry, deadline).await;
        // A holder whose write failed keeps its lock (it may Fill again
        // within lock_ttl); a retaken lock is released either way, so that
        // a failed late Fill does not hold the key.
        if stored.is_ok() || !held {
            let released = self.release_lock(level, key, token, deadline).await;
            let stored = stored?;
            released?;
            return Ok(Some(stored));
        }
        stored.map(Some)
    }

    /// A holder slower than its `lock_ttl`, whose lock lapsed with nobody
    /// taking it over: it takes the lock again to store its value, unless
    /// an entry is there, fresh or stale (a holder that took over, filled
    /// and released: its value is the newer one). Refusing it would leave
    /// every computation slower than `lock_ttl` uncached for good. The lock
    /// is released before an error returns.
    async fn retake(
        &self,
        level: Level,
        key: &str,
        lock: &str,
        token: &str,
        deadline: Deadline,
    ) -> Result<()> {
        // one write's time at most, never past the call's deadline
        let ttl = RETAKE_TTL
            .min(deadline.remaining())
            .max(Duration::from_millis(1));
        match self
            .inner
            .store
            .lock_acquire(lock, token, ttl, deadline)
            .await?
        {
            LockState::Held { .. } => Err(CacheError::LockLost),
            LockState::Acquired => match self.read(level, key, deadline).await {
                Ok(None) => Ok(()),
                other => {
                    self.release_lock(level, key, token, deadline).await?;
                    other.and(Err(CacheError::LockLost))
                }
            },
        }
    }

    /// Records the task computing the entry in its lock (for waiters to
    /// report); whether `token` still held it.
    pub async fn tag_lock(
        &self,
        level: Level,
        key: &str,
        token: &str,
        task_id: &str,
        deadline: Deadline,
    ) -> Result<bool> {
        let lock = self.inner.keys.lock_key(level, key);
        let value = format!(
            "{token}{}{task_id}",
            crate::store::lock::LOCK_TASK_SEPARATOR
        );
        Ok(self
            .inner
            .store
            .lock_update(&lock, token, &value, deadline)
            .await?)
    }

    /// Releases the lock `token` holds (if it still does) and wakes this
    /// koo's waiters.
    pub async fn release_lock(
        &self,
        level: Level,
        key: &str,
        token: &str,
        deadline: Deadline,
    ) -> Result<()> {
        let lock = self.inner.keys.lock_key(level, key);
        self.inner
            .store
            .lock_release(&lock, token, deadline)
            .await?;
        self.inner.fills.filled(level, key);
        Ok(())
    }
}
