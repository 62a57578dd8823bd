//! How many tasks each external worker holds in this process, so that one
//! worker cannot take everything (`KOO_MAX_HELD_PER_WORKER`, or its key's
//! `max_held`).
//!
//! A worker is an *identity* (the gRPC layer names it: an authenticated
//! principal with all its streams and unary leases, else one connection).
//! Each identity has a [`Tally`]: one atomic count, taken before every
//! lease and given back when the task leaves the worker, so a stream's hot
//! path costs an atomic, not a lock. A stream waiting for room watches its
//! tally's `freed` signal, which is only sent when a full tally gets room.
//! Unary leases are remembered by task (a mutex: unary calls are not hot)
//! until they are completed or failed, or would have lapsed without a
//! heartbeat. Counts are per koo process: N processes allow N times the
//! bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::task::TaskId;

/// Tasks one worker may hold at once unless configured otherwise
/// (`KOO_MAX_HELD_PER_WORKER`).
pub const DEFAULT_MAX_HELD: u32 = 1024;

/// One identity's holdings.
#[derive(Debug)]
pub struct Tally {
    held: AtomicU32,
    bound: AtomicU32,
    /// Bumped when a full tally gets room (never while it has room: the
    /// common path sends nothing).
    freed: watch::Sender<u64>,
}

impl Tally {
    fn new(bound: u32) -> Self {
        Self {
            held: AtomicU32::new(0),
            bound: AtomicU32::new(bound),
            freed: watch::Sender::new(0),
        }
    }

    /// Takes room for one task; `false` when the identity holds its bound.
    pub fn try_take(&self) -> bool {
        let bound = self.bound.load(Ordering::SeqCst);
        self.held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                (h < bound).then_some(h + 1)
            })
            .is_ok()
    }

    /// Gives back room for `n` tasks, waking the identity's waiting
    /// streams when it was full.
    pub fn give(&self, n: u32) {
        if n == 0 {
            return;
        }
        let before = self.held.fetch_sub(n, Ordering::SeqCst);
        if before >= self.bound.load(Ordering::SeqCst) {
            self.freed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Tasks held now.
    pub fn held(&self) -> u32 {
        self.held.load(Ordering::SeqCst)
    }

    /// What the identity may hold.
    pub fn bound(&self) -> u32 {
        self.bound.load(Ordering::SeqCst)
    }

    /// A signal of room freed on a full tally: mark it seen
    /// (`borrow_and_update`) before [`Self::try_take`], so that room freed
    /// in between is not missed.
    pub fn freed(&self) -> watch::Receiver<u64> {
        self.freed.subscribe()
    }

    fn set_bound(&self, bound: u32) {
        let before = self.bound.swap(bound, Ordering::SeqCst);
        if bound > before {
            self.freed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }
}

/// Room taken on a tally, given back when dropped (a session's end, a
/// unary lease that found nothing).
#[derive(Debug)]
pub struct Taken {
    tally: Arc<Tally>,
    n: u32,
}

impl Taken {
    /// Nothing taken yet on `tally`.
    pub fn none(tally: Arc<Tally>) -> Self {
        Self { tally, n: 0 }
    }

    /// The tally.
    pub fn tally(&self) -> &Arc<Tally> {
        &self.tally
    }

    /// How much is taken.
    pub fn count(&self) -> u32 {
        self.n
    }

    /// Takes room for one more task; `false` at the bound.
    pub fn take_one(&mut self) -> bool {
        let ok = self.tally.try_take();
        self.n += u32::from(ok);
        ok
    }

    /// Takes room for one more task even past the bound: a task the
    /// worker already runs (re-attached), which is no new work.
    pub fn force_one(&mut self) {
        self.tally.held.fetch_add(1, Ordering::SeqCst);
        self.n += 1;
    }

    /// Keeps `n` (gives back what is above it).
    pub fn keep(&mut self, n: u32) {
        if self.n > n {
            self.tally.give(self.n - n);
            self.n = n;
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.tally.give(self.n);
    }
}

/// A unary lease's room, held until it ends or would have lapsed.
#[derive(Debug)]
struct UnaryHold {
    _taken: Taken,
    token: u32,
    until: Instant,
}

/// Every identity's holdings in this process (a cheap `Clone` handle).
#[derive(Debug, Clone)]
pub struct Holds {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    default_bound: AtomicU32,
    /// std Mutex: held only to look up or insert, never across an await.
    tallies: Mutex<HashMap<String, Weak<Tally>>>,
    unary: Mutex<HashMap<TaskId, UnaryHold>>,
}

impl Holds {
    /// Holdings bounded by `default_bound` per identity unless its caller
    /// says otherwise.
    pub fn new(default_bound: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                default_bound: AtomicU32::new(default_bound),
                tallies: Mutex::new(HashMap::new()),
                unary: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Sets the bound of identities whose caller names none (for tallies
    /// made from now on, and existing ones when next looked up).
    pub fn set_default_bound(&self, bound: u32) {
        self.inner.default_bound.store(bound, Ordering::Relaxed);
    }

    /// The tally of `identity`, bounded by `bound` (`None`: the default).
    pub fn tally(&self, identity: &str, bound: Option<u32>) -> Arc<Tally> {
        let bound = bound.unwrap_or_else(|| self.inner.default_bound.load(Ordering::Relaxed));
        let mut tallies = self.inner.tallies.lock().expect("not poisoned");
        if let Some(t) = tallies.get(identity).and_then(Weak::upgrade) {
            t.set_bound(bound);
            return t;
        }
        let t = Arc::new(Tally::new(bound));
        tallies.insert(identity.to_owned(), Arc::downgrade(&t));
        t
    }

    /// Records a unary lease holding `taken` (one task) until `until`
    /// unless extended.
    pub fn hold_unary(&self, id: TaskId, token: u32, taken: Taken, until: Instant) {
        let hold = UnaryHold {
            _taken: taken,
            token,
            until,
        };
        // a former lease of the same task (lapsed) is given back by drop
        let old = self.unary().insert(id, hold);
        drop(old);
    }

    /// A heartbeat kept the unary lease `token` of `id` until `until`.
    pub fn extend_unary(&self, id: &TaskId, token: u32, until: Instant) {
        if let Some(h) = self.unary().get_mut(id)
            && h.token == token
        {
            h.until = until;
        }
    }

    /// The unary lease `token` of `id` ended (completed, failed, or found
    /// fenced); a later lease of the same task keeps its room.
    pub fn end_unary(&self, id: &TaskId, token: u32) {
        let mut unary = self.unary();
        let gone = match unary.get(id) {
            Some(h) if h.token == token => unary.remove(id),
            _ => None,
        };
        drop(unary);
        drop(gone);
    }

    /// Gives back unary leases that would have lapsed by `now`, and
    /// forgets identities that hold nothing and have no live session.
    pub fn sweep(&self, now: Instant) {
        let lapsed: Vec<UnaryHold> = {
            let mut unary = self.unary();
            let ids: Vec<TaskId> = unary
                .iter()
                .filter(|(_, h)| h.until <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| unary.remove(id)).collect()
        };
        drop(lapsed);
        self.inner
            .tallies
            .lock()
            .expect("not poisoned")
            .retain(|_, t| t.strong_count() > 0);
    }

    /// Identities known now (for tests of the sweep).
    pub fn identities(&self) -> usize {
        self.inner.tallies.lock().expect("not poisoned").len()
    }

    fn unary(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, UnaryHold>> {
        self.inner.unary.lock().expect("not poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::QueueName;

    /// Room is taken up to the bound, given back by drop, and a full
    /// tally's waiters are woken when it gets room.
    #[test]
    fn room_is_bounded_and_given_back() {
        let holds = Holds::new(2);
        let tally = holds.tally("conn:1", None);
        let mut a = Taken::none(tally.clone());
        assert!(a.take_one() && a.take_one());
        assert!(!a.take_one(), "the bound is 2");
        let mut freed = tally.freed();
        freed.borrow_and_update();
        a.keep(1);
        assert!(freed.has_changed().unwrap(), "a full tally got room");
        assert_eq!(tally.held(), 1);
        // another stream of the same identity shares the room
        let mut b = Taken::none(holds.tally("conn:1", None));
        assert!(b.take_one());
        assert!(!b.take_one());
        drop(a);
        drop(b);
        assert_eq!(tally.held(), 0);
    }

    /// A unary lease holds its room until it ends or lapses; identities
    /// with nothing left are forgotten.
    #[test]
    fn unary_leases_lapse() {
        let holds = Holds::new(1);
        let q = QueueName::parse("research").unwrap();
        let (id, other) = (TaskId::generate(&q), TaskId::generate(&q));
        let mut taken = Taken::none(holds.tally("alice", Some(2)));
        assert!(taken.take_one());
        let now = Instant::now();
        holds.hold_unary(
            id.clone(),
            1,
            taken,
            now + std::time::Duration::from_secs(1),
        );
        let tally = holds.tally("alice", Some(2));
        assert_eq!((tally.held(), tally.bound()), (1, 2));
        holds.extend_unary(&id, 1, now + std::time::Duration::from_secs(5));
        holds.sweep(now + std::time::Duration::from_secs(2));
        assert_eq!(tally.held(), 1, "extended by a heartbeat");
        holds.end_unary(&other, 1);
        holds.end_unary(&id, 2);
        assert_eq!(tally.held(), 1, "another task, another lease");
        holds.sweep(now + std::time::Duration::from_secs(6));
        assert_eq!(tally.held(), 0, "lapsed");
        drop(tally);
        holds.sweep(now);
        assert_eq!(holds.identities(), 0);
    }
}
