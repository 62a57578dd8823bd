//! The worker poller: which queue a worker asks for its next task, shared
//! by the built-in slots ([`super::worker`]) and the stream workers
//! ([`super::remote`]).
//!
//! A worker serves several queues. It looks at them in rotation, starting
//! after the queue of its last lease, so that no queue starves. A queue
//! found empty *rests*: it is skipped until the poll interval has passed or
//! a submit in this process names it (the wake-on-submit), so that a busy
//! worker spends one lease call per task rather than one per queue, and an
//! idle one still looks at every queue at least once per poll interval.
//! A submit names its queue on the engine's watch channel; a built-in slot
//! also looks at that queue first (the *hint*), so that a task submitted to
//! an idle process starts after one lease call.
//!
//! The slots of one pool share their rests ([`Rests`]): a queue one slot
//! found empty rests for all of them, and an idle pool looks at each queue
//! once per poll interval (one slot claims the look), not once per slot. A
//! look that finds a task wakes one idle peer, and until a look finds the
//! queue empty again every slot looks without a claim (a backlog another
//! process submitted engages the pool's slots one after another, a round
//! trip apart, and then all of them at once).
//!
//! Times are `tokio::time::Instant`s, so that tests can pause the clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::domain::task::{QueueName, Task};
use crate::store::tasks::Leased;

/// The longest a held queue rests before it is looked at again (a new
/// limit, or one deleted, is seen within this).
const MAX_HELD_REST: Duration = Duration::from_secs(1);

/// The rests of a pool's slots, shared (see the module doc): each of their
/// queues' [`Look`], by index, and the wake of an idle peer.
#[derive(Debug)]
pub struct Rests {
    looks: Mutex<Vec<Look>>,
    peer: Notify,
}

/// What a pool knows of one queue.
#[derive(Debug, Clone, Copy, Default)]
struct Look {
    /// Until when it rests (found empty or held, or a slot looks at it).
    until: Option<Instant>,
    /// The last look found a task: while there is a backlog every slot
    /// looks as it pleases (no claims) until a look finds the queue empty.
    busy: bool,
}

impl Rests {
    /// Rests for `queues` queues, none resting.
    pub fn new(queues: usize) -> Arc<Self> {
        Arc::new(Self {
            looks: Mutex::new(vec![Look::default(); queues]),
            peer: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Look>> {
        self.looks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The rests shared by this process's stream workers, by what they serve
/// (the same queues in the same order, the same task names): identical
/// workers (the SDK's processes of one deployment) take turns looking, as
/// a pool's slots do. Kept while a worker uses them.
#[derive(Debug, Default)]
pub struct SharedRests(Mutex<std::collections::HashMap<String, std::sync::Weak<Rests>>>);

impl SharedRests {
    /// The rests of the workers serving `names` of `queues`.
    pub fn of(&self, queues: &[QueueName], names: &[String]) -> Arc<Rests> {
        let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        let mut key = String::new();
        for q in queues {
            key.push_str(q.as_str());
            key.push('\n');
        }
        key.push('\n');
        key.push_str(&sorted.join("\n"));
        let mut all = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rests) = all.get(&key).and_then(std::sync::Weak::upgrade) {
            return rests;
        }
        // (the entries of workers that are gone go with each new one)
        all.retain(|_, r| r.strong_count() > 0);
        let rests = Rests::new(queues.len());
        all.insert(key, Arc::downgrade(&rests));
        rests
    }
}

/// Waits until a peer's look found a task (never without shared `rests`;
/// cancel-safe).
pub async fn peer_found(rests: Option<&Rests>) {
    match rests {
        Some(rests) => rests.peer.notified().await,
        None => std::future::pending().await,
    }
}

/// One worker's view of its queues: the rotation, the resting (empty)
/// queues, and the submits of this process.
#[derive(Debug)]
pub struct Poller {
    queues: Vec<QueueName>,
    /// How long a queue found empty rests.
    poll: Duration,
    /// Until when each queue rests: a poll interval after it was found
    /// empty, or until the time limits hold its tasks (flow control).
    /// Kept in `shared` instead when the worker is a pool's slot.
    empty: Vec<Option<Instant>>,
    shared: Option<Arc<Rests>>,
    /// Where the next rotation starts (taken modulo the queue count).
    next: usize,
    /// The queue a local submit just named, looked at first once.
    hint: Option<usize>,
    /// The hint is a look this worker alone was told to make
    /// ([`Self::look_at`]).
    told: bool,
    submits: watch::Receiver<Option<QueueName>>,
}

/// The order of one lease round: the hinted queue (if any), then every
/// queue from the rotation's start. Each item is a queue's index and
/// whether it is the hint.
#[derive(Debug, Clone)]
pub struct Order {
    hint: Option<usize>,
    start: usize,
    len: usize,
    i: usize,
}

impl Iterator for Order {
    type Item = (usize, bool);

    fn next(&mut self) -> Option<(usize, bool)> {
        if let Some(h) = self.hint.take() {
            return Some((h, true));
        }
        if self.i >= self.len {
            return None;
        }
        let q = (self.start + self.i) % self.len;
        self.i += 1;
        Some((q, false))
    }
}

impl Poller {
    /// A poller over `queues` (not empty) whose rotation starts at `start`
    /// (slots start at different queues), resting empty queues for `poll`,
    /// woken by `submits` (the engine's [`super::engine::TaskEngine::submits`]).
    pub fn new(
        queues: Vec<QueueName>,
        poll: Duration,
        start: usize,
        submits: watch::Receiver<Option<QueueName>>,
    ) -> Self {
        let len = queues.len().max(1);
        Self {
            empty: vec![None; queues.len()],
            shared: None,
            queues,
            poll,
            next: start % len,
            hint: None,
            told: false,
            submits,
        }
    }

    /// The same, its rests shared with the pool's other slots (`rests`,
    /// made for as many queues).
    pub fn pooled(
        queues: Vec<QueueName>,
        poll: Duration,
        start: usize,
        submits: watch::Receiver<Option<QueueName>>,
        rests: Arc<Rests>,
    ) -> Self {
        debug_assert_eq!(rests.lock().len(), queues.len());
        Self {
            shared: Some(rests),
            ..Self::new(queues, poll, start, submits)
        }
    }

    /// Until when queue `q` rests, if it does or did.
    fn rest(&self, q: usize) -> Option<Instant> {
        match &self.shared {
            Some(rests) => rests.lock().get(q).and_then(|l| l.until),
            None => self.empty[q],
        }
    }

    fn set_rest(&mut self, q: usize, until: Option<Instant>) {
        match &self.shared {
            Some(rests) => {
                if let Some(look) = rests.lock().get_mut(q) {
                    look.until = until;
                }
            }
            None => self.empty[q] = until,
        }
    }

    /// Claims the look at queue `q` for this slot (not resting: it then
    /// rests for the pool's other slots until this look ends or a poll
    /// interval has passed): false when another slot looks at it or found
    /// it empty. Always true while the queue has a backlog (the last look
    /// found a task), and for a worker that is no pool's slot.
    pub fn claim(&mut self, q: usize) -> bool {
        let Some(rests) = &self.shared else {
            return true;
        };
        let now = Instant::now();
        let mut looks = rests.lock();
        match looks.get_mut(q) {
            Some(look) if look.busy => true,
            Some(look) if look.until.is_none_or(|t| t <= now) => {
                look.until = Some(now + self.poll);
                true
            }
            _ => false,
        }
    }

    /// Queue `q` was found empty or held: the pool's looks at it take
    /// turns again.
    fn settled(&self, q: usize) {
        if let Some(rests) = &self.shared
            && let Some(look) = rests.lock().get_mut(q)
        {
            look.busy = false;
        }
    }

    /// A look at queue `q` found a task: the queue stops resting for the
    /// pool, and one idle peer looks at once (there may be more).
    pub fn found(&mut self, q: usize) {
        if let Some(rests) = &self.shared {
            if let Some(look) = rests.lock().get_mut(q) {
                *look = Look {
                    until: None,
                    busy: true,
                };
            }
            rests.peer.notify_one();
        }
    }

    /// The queues served.
    pub fn queues(&self) -> &[QueueName] {
        &self.queues
    }

    /// The index of `queue`, if served.
    pub fn position(&self, queue: &QueueName) -> Option<usize> {
        self.queues.iter().position(|q| q == queue)
    }

    /// Whether queue `q` was found empty less than a poll interval ago
    /// (and no submit named it since): a lease round skips it.
    pub fn is_resting(&self, q: usize) -> bool {
        self.rest(q).is_some_and(|until| Instant::now() < until)
    }

    /// A task of queue `q` became ready (a wake from another process, or
    /// a task made ready here without a hand-off) and this worker alone of
    /// its kind was told: the next round looks there first, resting or not,
    /// claimed or not, and a task found there engages an idle peer, as a
    /// poll's look does ([`Self::take_told`]).
    pub fn look_at(&mut self, q: usize) {
        self.set_rest(q, None);
        self.hint = Some(q);
        self.told = true;
    }

    /// Whether the next round's hint is a told look ([`Self::look_at`]);
    /// read once per round.
    pub fn take_told(&mut self) -> bool {
        std::mem::take(&mut self.told)
    }

    /// Queue `q` was just found empty.
    pub fn mark_empty(&mut self, q: usize) {
        self.set_rest(q, Some(Instant::now() + self.poll));
        self.settled(q);
    }

    /// Limits hold every task of queue `q` the lease looked at, until
    /// `until_ms` (ms since the epoch; `None`: until a task ends, which
    /// this worker cannot see coming, so a poll interval): it rests until
    /// then, and is looked at again at once after, so a rate-limited
    /// queue costs no lease calls while it waits and loses no token.
    pub fn mark_held(&mut self, q: usize, until_ms: Option<i64>) {
        let Some(until_ms) = until_ms else {
            return self.mark_empty(q);
        };
        let now_ms = crate::store::unix_millis(std::time::SystemTime::now());
        // at least a millisecond: never a busy loop on a clock skew
        let wait = Duration::from_millis(until_ms.saturating_sub(now_ms).max(1) as u64);
        self.set_rest(q, Some(Instant::now() + wait.min(MAX_HELD_REST)));
        self.settled(q);
    }

    /// What a lease found in queue `q`: the task, if any; an empty or
    /// held queue rests.
    pub fn took(&mut self, q: usize, leased: Leased) -> Option<Task> {
        match leased {
            Leased::Task(t) => Some(*t),
            Leased::Empty => {
                self.mark_empty(q);
                None
            }
            Leased::Held(until) => {
                self.mark_held(q, until);
                None
            }
        }
    }

    /// Takes in a submit of this process seen since the last look (without
    /// waiting): its queue becomes the hint and stops resting.
    pub fn take_submits(&mut self) {
        if self.submits.has_changed().unwrap_or(false) {
            let queue = self.submits.borrow_and_update().clone();
            // (a told look keeps its place)
            self.hint = self.hint.or_else(|| queue.and_then(|q| self.position(&q)));
        }
        if let Some(h) = self.hint {
            self.set_rest(h, None);
        }
    }

    /// Whether this process submitted something since the last look (a
    /// closed channel counts as yes: nothing is assumed quiet).
    pub fn submitted_since(&self) -> bool {
        self.submits.has_changed().unwrap_or(true)
    }

    /// The order of the next lease round (the hint is used up).
    pub fn order(&mut self) -> Order {
        Order {
            hint: self.hint.take(),
            start: self.next,
            len: self.queues.len(),
            i: 0,
        }
    }

    /// Queue `q` gave a task: the rotation goes on after it. A lease from
    /// the hint does not move the rotation (unless the hint is where it
    /// stood), so that a stream of local submits cannot starve the rest.
    pub fn leased(&mut self, q: usize, hinted: bool) {
        if !hinted || q == self.next {
            self.next = (q + 1) % self.queues.len();
        }
    }

    /// Whether every queue but `q` is resting: a worker ending a task of
    /// `q` would come back to it anyway, so it may report and take the
    /// next task of `q` in one call.
    pub fn others_resting(&self, q: usize) -> bool {
        (0..self.queues.len())
            .filter(|i| *i != q)
            .all(|i| self.is_resting(i))
    }

    /// When the first resting queue is worth another look, if any rests.
    pub fn recheck_at(&self) -> Option<Instant> {
        match &self.shared {
            Some(rests) => rests.lock().iter().filter_map(|l| l.until).min(),
            None => self.empty.iter().flatten().copied().min(),
        }
    }

    /// An idle worker's wait: until the first resting queue is worth
    /// another look (a poll interval when none rests), or until this
    /// process submits, whose queue becomes the hint.
    pub async fn idle(&mut self) {
        let wait = self
            .recheck_at()
            .map_or(self.poll, |at| at.saturating_duration_since(Instant::now()));
        let shared = self.shared.clone();
        let peer = peer_found(shared.as_deref());
        let woken = tokio::select! {
            got = self.submits.changed() => got.is_ok(),
            () = peer => false,
            () = tokio::time::sleep(wait) => false,
        };
        self.hint = if woken {
            let queue = self.submits.borrow_and_update().clone();
            queue.and_then(|q| self.position(&q))
        } else {
            None
        };
    }

    /// The rests this worker shares, if it does (for [`peer_found`]).
    pub fn rests(&self) -> Option<Arc<Rests>> {
        self.shared.clone()
    }

    /// Waits up to `max` for a submit of this process (its queue stops
    /// resting; no hint): a unary lease's wait between its rounds.
    pub async fn wait(&mut self, max: Duration) {
        let _ = tokio::time::timeout(max, self.woken()).await;
    }

    /// Waits for a submit of this process; its queue stops resting (no
    /// hint: for a worker that waits on other things too, in a `select!`;
    /// cancel-safe).
    pub async fn woken(&mut self) {
        if self.submits.changed().await.is_ok() {
            let queue = self.submits.borrow_and_update().clone();
            if let Some(q) = queue.and_then(|q| self.position(&q)) {
                self.set_rest(q, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues(n: usize) -> Vec<QueueName> {
        ["a", "b", "c", "d"][..n]
            .iter()
            .map(|q| QueueName::parse(q).unwrap())
            .collect()
    }

    const POLL: Duration = Duration::from_millis(100);

    fn poller(n: usize, start: usize) -> (Poller, watch::Sender<Option<QueueName>>) {
        let (tx, rx) = watch::channel(None);
        (Poller::new(queues(n), POLL, start, rx), tx)
    }

    fn order(p: &mut Poller) -> Vec<(usize, bool)> {
        p.order().collect()
    }

    /// Slots start at different queues; a lease moves the rotation past
    /// its queue; a hinted lease does not, unless the rotation stood there.
    #[tokio::test(start_paused = true)]
    async fn rotation() {
        let (mut p, tx) = poller(3, 4);
        assert_eq!(order(&mut p), vec![(1, false), (2, false), (0, false)]);
        p.leased(2, false);
        assert_eq!(order(&mut p), vec![(0, false), (1, false), (2, false)]);
        tx.send_replace(Some(QueueName::parse("c").unwrap()));
        p.take_submits();
        assert_eq!(
            order(&mut p),
            vec![(2, true), (0, false), (1, false), (2, false)]
        );
        // the hint is used up by one round
        assert_eq!(order(&mut p).len(), 3);
        p.leased(2, true);
        assert_eq!(order(&mut p)[0], (0, false));
        p.leased(0, true);
        assert_eq!(order(&mut p)[0], (1, false));
    }

    /// An empty queue rests for a poll interval; the others resting lets a
    /// worker chain its next lease; the recheck is the first mark's end.
    #[tokio::test(start_paused = true)]
    async fn empty_marks() {
        let (mut p, _tx) = poller(3, 0);
        assert_eq!(p.recheck_at(), None);
        let first = Instant::now();
        p.mark_empty(1);
        tokio::time::advance(Duration::from_millis(30)).await;
        p.mark_empty(2);
        assert!(p.is_resting(1) && p.is_resting(2) && !p.is_resting(0));
        assert!(p.others_resting(0));
        assert!(!p.others_resting(1));
        assert_eq!(p.recheck_at(), Some(first + POLL));
        tokio::time::advance(Duration::from_millis(70)).await;
        assert!(!p.is_resting(1));
        assert!(p.is_resting(2));
        assert!(!p.others_resting(0));
    }

    /// A submit wakes a resting queue: as the hint for a built-in slot,
    /// without one for a stream worker; a submit to a queue not served
    /// gives no hint.
    #[tokio::test(start_paused = true)]
    async fn wake_on_submit() {
        let (mut p, tx) = poller(3, 0);
        p.mark_empty(1);
        assert!(!p.submitted_since());
        tx.send_replace(Some(QueueName::parse("b").unwrap()));
        assert!(p.submitted_since());
        p.take_submits();
        assert!(!p.is_resting(1));
        assert!(!p.submitted_since());
        assert_eq!(order(&mut p)[0], (1, true));

        p.mark_empty(1);
        tx.send_replace(Some(QueueName::parse("b").unwrap()));
        p.woken().await;
        assert!(!p.is_resting(1));
        assert_eq!(order(&mut p)[0], (0, false));

        tx.send_replace(Some(QueueName::parse("zzz").unwrap()));
        p.take_submits();
        assert_eq!(order(&mut p)[0], (0, false));

        // a unary lease's wait: up to its bound, or until a submit
        let start = Instant::now();
        p.wait(Duration::from_millis(30)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(30));
        p.mark_empty(2);
        tx.send_replace(Some(QueueName::parse("c").unwrap()));
        p.wait(Duration::from_millis(30)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(30));
        assert!(!p.is_resting(2));
    }

    /// A pool's slots share their rests: one look per queue (a claim),
    /// an empty queue rests for every slot, and a look that found a task
    /// ends the rest and wakes one idle peer at once; while the queue has
    /// a backlog, looks need no claim.
    #[tokio::test(start_paused = true)]
    async fn pooled_slots_share_their_rests() {
        let (tx, rx) = watch::channel(None);
        let rests = Rests::new(2);
        let mut a = Poller::pooled(queues(2), POLL, 0, rx.clone(), rests.clone());
        let mut b = Poller::pooled(queues(2), POLL, 1, rx, rests);
        assert!(a.claim(0));
        assert!(!b.claim(0) && b.is_resting(0), "a looks at it");
        assert!(b.claim(1));
        b.mark_empty(1);
        assert!(a.is_resting(1) && !a.claim(1));
        let start = Instant::now();
        b.idle().await;
        assert_eq!(start.elapsed(), POLL, "until a's claim ends");
        // a's look found a task: b is woken at once and may look
        assert!(a.claim(0));
        let woken = tokio::spawn(async move {
            let start = Instant::now();
            b.mark_empty(1);
            b.idle().await;
            (start.elapsed(), b.is_resting(0))
        });
        tokio::task::yield_now().await;
        a.found(0);
        let (waited, resting) = woken.await.unwrap();
        assert_eq!((waited, resting), (Duration::ZERO, false));
        // a backlog: every slot looks as it pleases, until one finds the
        // queue empty; then they take turns again
        assert!(a.claim(0) && a.claim(0));
        a.mark_empty(0);
        tokio::time::advance(POLL).await;
        assert!(a.claim(0) && !a.claim(0));
        drop(tx);
    }

    /// Stream workers that serve the same queues (in the same order) and
    /// names share one set of rests, whatever the names' order; others
    /// have their own; a set nobody uses is made anew.
    #[test]
    fn identical_workers_share_rests() {
        let shared = SharedRests::default();
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let a = shared.of(&queues(2), &names(&["x", "y"]));
        let b = shared.of(&queues(2), &names(&["y", "x"]));
        assert!(Arc::ptr_eq(&a, &b));
        let other_names = shared.of(&queues(2), &names(&["x"]));
        let other_queues = shared.of(&queues(3), &names(&["x", "y"]));
        assert!(!Arc::ptr_eq(&a, &other_names) && !Arc::ptr_eq(&a, &other_queues));
        assert_eq!(other_queues.lock().len(), 3);
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(weak.upgrade().is_none());
        let again = shared.of(&queues(2), &names(&["x", "y"]));
        assert!(again.lock().iter().all(|l| l.until.is_none() && !l.busy));
    }

    /// An idle worker waits until the first mark expires, or less when a
    /// submit comes, whose queue becomes the hint.
    #[tokio::test(start_paused = true)]
    async fn idle_waits() {
        let (mut p, tx) = poller(2, 0);
        let start = Instant::now();
        p.idle().await;
        assert_eq!(start.elapsed(), POLL);
        p.mark_empty(0);
        tokio::time::advance(Duration::from_millis(40)).await;
        p.mark_empty(1);
        let start = Instant::now();
        p.idle().await;
        assert_eq!(start.elapsed(), Duration::from_millis(60));
        assert_eq!(order(&mut p)[0], (0, false));
        // the first mark has expired: no wait until a round marks it again
        let start = Instant::now();
        p.idle().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        p.mark_empty(0);
        p.mark_empty(1);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send_replace(Some(QueueName::parse("b").unwrap()));
            tx
        });
        let start = Instant::now();
        p.idle().await;
        assert_eq!(start.elapsed(), Duration::from_millis(10));
        assert_eq!(order(&mut p)[0], (1, true));
        drop(sender.await);
    }
}
