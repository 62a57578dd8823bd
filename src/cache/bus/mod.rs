//! The invalidation bus: every change to the cache (a write, a delete, a
//! cleared level, invalidated tags, an expiry Redis reports), delivered to
//! every subscriber in every koo process, for `WatchInvalidations` (near
//! caches) and for callers waiting for a key to be filled.
//!
//! # Zero cost while nobody watches
//! A change is announced only while [`Cache::watched`] says so: one atomic
//! load on a write; nothing is built, nothing is sent otherwise. On the
//! embedded store, "watched" is "this process has a subscriber" and the bus
//! is an in-process broadcast. On Redis, a koo with subscribers keeps the
//! flag `{prefix}:v1:cache:watched` alive (3 s TTL, refreshed every second,
//! holding the Redis time it was set) and every koo reads the flag once a
//! second ([`driver`]), publishing while it is set. A new subscriber is told
//! [`Notice::Ready`] only once every koo must have seen the flag: when the
//! flag is older than the read interval plus a margin (1.5 s); at once when
//! it was already that old.
//!
//! # Order
//! The `PUBLISH` goes after the write's reply, in its own round trip, and
//! the write's caller is answered after it: a subscriber therefore hears of
//! a change only once the change is visible to any reader, and a client
//! that saw its write acknowledged knows the invalidation is on its way.
//! (Putting `PUBLISH` in the write's pipeline would save the round trip, but
//! would change the hot path's commands for everyone, watched or not.)
//!
//! # Falling behind
//! Subscribers share one bounded `tokio::sync::broadcast` per process
//! ([`BUFFER`] changes). One that falls further behind, or every one when
//! the process loses its Pub/Sub connection or the flag lapsed (so that
//! some koo may have stopped publishing), receives [`Notice::Reset`]: drop
//! everything learned from this subscription, and wait for the next
//! [`Notice::Ready`], sent once the bus is whole again. Never a silent gap.

mod driver;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::{Cache, Level, NewEntry};
use crate::keys::KeySpace;
use crate::store::{Deadline, RedisStore, Store};

/// Changes a process's subscribers may leave unread before they are reset.
pub const BUFFER: usize = 4096;

/// The least time a change's `PUBLISH` gets, whatever is left of the
/// write's deadline.
const PUBLISH_FLOOR: std::time::Duration = std::time::Duration::from_millis(500);

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Keys were written.
    Set,
    /// Keys were deleted.
    Delete,
    /// Every key of a level was removed.
    ClearLevel,
    /// Every entry carrying one of the tags now misses.
    Tags,
    /// Keys expired or were evicted (Redis keyspace notifications).
    Expired,
}

/// One change, as every subscriber receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What changed.
    pub kind: ChangeKind,
    /// The level; `None` only for tags invalidated in every level.
    pub level: Option<Level>,
    /// The user keys (set, delete, expired).
    pub keys: Vec<String>,
    /// The tags (tags).
    pub tags: Vec<String>,
    /// When, by the clock of the koo that made it.
    pub time: SystemTime,
}

impl Change {
    /// `keys` of `level` were written, deleted or expired.
    pub fn keys(kind: ChangeKind, level: Level, keys: Vec<String>) -> Self {
        Self {
            kind,
            level: Some(level),
            keys,
            tags: Vec::new(),
            time: SystemTime::now(),
        }
    }

    /// Every key of `level` was removed.
    pub fn clear(level: Level) -> Self {
        Self::keys(ChangeKind::ClearLevel, level, Vec::new())
    }

    /// `tags` were invalidated in `level` (`None`: in every level).
    pub fn tags(level: Option<Level>, tags: Vec<String>) -> Self {
        Self {
            kind: ChangeKind::Tags,
            level,
            keys: Vec::new(),
            tags,
            time: SystemTime::now(),
        }
    }

    /// The writes of a batch, one change per level.
    fn sets(entries: &[NewEntry]) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::new();
        for e in entries {
            match out.iter_mut().find(|c| c.level == Some(e.level)) {
                Some(c) => c.keys.push(e.key.clone()),
                None => out.push(Self::keys(ChangeKind::Set, e.level, vec![e.key.clone()])),
            }
        }
        out
    }

    /// Whether the entry `key` of `level` may have changed (tags: any entry
    /// of the level may carry them).
    pub fn touches(&self, level: Level, key: &str) -> bool {
        let same_level = self.level.is_none_or(|l| l == level);
        match self.kind {
            ChangeKind::Set | ChangeKind::Delete | ChangeKind::Expired => {
                same_level && self.keys.iter().any(|k| k == key)
            }
            ChangeKind::ClearLevel | ChangeKind::Tags => same_level,
        }
    }
}

/// What a [`Subscription`] receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// From here on, every change is delivered. First, and again after each
    /// [`Notice::Reset`] once the bus is whole again.
    Ready,
    /// A change.
    Change(Arc<Change>),
    /// Changes may have been lost: drop what was learned, wait for Ready.
    Reset,
}

/// What travels through the process's broadcast.
#[derive(Debug, Clone)]
enum Event {
    Change(Arc<Change>),
    /// The process lost changes (its subscription, or the flag lapsed).
    Lost,
}

/// The process's side of the bus; one per [`Cache`].
pub(super) struct Bus {
    shared: Arc<Shared>,
}

struct Shared {
    /// The Redis store, if that is the backend; else the bus is in-process.
    redis: Option<RedisStore>,
    keys: KeySpace,
    channel: String,
    flag: String,
    /// Whether writes are announced (the hot path reads only this).
    publishing: AtomicBool,
    /// This process's subscribers.
    watchers: watch::Sender<usize>,
    /// From when subscribers may be told Ready; `None` while the process
    /// has no working subscription.
    live: watch::Sender<Option<Instant>>,
    events: broadcast::Sender<Event>,
}

impl Bus {
    /// The bus of a cache over `store`. On Redis, starts the [`driver`]
    /// (when called within a Tokio runtime: a cache built outside one, in
    /// a unit test, neither publishes nor hears other instances).
    pub(super) fn new(store: &Store, keys: &KeySpace) -> Self {
        let redis = store.as_redis().cloned();
        let live = if redis.is_some() {
            None
        } else {
            Some(Instant::now())
        };
        let shared = Arc::new(Shared {
            redis,
            keys: keys.clone(),
            channel: keys.changes_channel(),
            flag: keys.watched_flag(),
            publishing: AtomicBool::new(false),
            watchers: watch::Sender::new(0),
            live: watch::Sender::new(live),
            events: broadcast::Sender::new(BUFFER),
        });
        if shared.redis.is_some()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(driver::run(
                Arc::downgrade(&shared),
                shared.watchers.subscribe(),
            ));
        }
        Self { shared }
    }
}

impl Shared {
    fn deliver(&self, event: Event) {
        // No receiver is fine: nobody in this process watches.
        let _ = self.events.send(event);
    }
}

impl Cache {
    /// Whether changes are being announced (someone, somewhere, watches).
    /// Callers that build a [`Change`] at a cost check this first.
    pub fn watched(&self) -> bool {
        self.inner.bus.shared.publishing.load(Ordering::Relaxed)
    }

    /// Announces `change` to every subscriber of every koo instance, if
    /// anyone watches. Never fails the caller: the change is made already;
    /// a failed publish is logged (the subscribers' own connection is then
    /// most likely lost too, which resets them).
    pub async fn publish(&self, change: Change, deadline: Deadline) {
        if self.watched() {
            self.send(change, deadline).await;
        }
    }

    async fn send(&self, change: Change, deadline: Deadline) {
        let shared = &self.inner.bus.shared;
        match &shared.redis {
            None => shared.deliver(Event::Change(Arc::new(change))),
            Some(redis) => {
                let payload = wire::encode(&change);
                // The change is made: telling the watchers matters more
                // than the caller's deadline, so it gets a little longer.
                let deadline = deadline.max(Deadline::after(PUBLISH_FLOOR));
                if let Err(e) = redis
                    .publish_change(&shared.channel, &payload, deadline)
                    .await
                {
                    // This process's own watchers are reset; other
                    // processes' lose their subscription too when Redis is
                    // unreachable (the common cause), which resets theirs.
                    tracing::warn!(error = %e, "cannot publish a cache change to its watchers");
                    shared.deliver(Event::Lost);
                }
            }
        }
    }

    /// After a successful write (`ok`), announces what `changes` builds;
    /// free (one atomic load) while nobody watches.
    pub(super) async fn announce(
        &self,
        ok: bool,
        deadline: Deadline,
        changes: impl FnOnce() -> Vec<Change>,
    ) {
        if ok && self.watched() {
            for change in changes() {
                self.send(change, deadline).await;
            }
        }
    }

    /// The writes of a batch, for [`Cache::announce`].
    pub(super) fn set_changes(entries: &[NewEntry]) -> Vec<Change> {
        Change::sets(entries)
    }

    /// Subscribes to every change, made in this process or (on Redis) by
    /// any koo instance. The first notice is [`Notice::Ready`] (on Redis,
    /// up to 1.5 s after the first subscriber of the deployment). Changes
    /// are announced while at least one subscription is open.
    pub fn subscribe(&self) -> Subscription {
        let shared = self.inner.bus.shared.clone();
        let in_process = shared.redis.is_none();
        shared.watchers.send_modify(|n| {
            *n += 1;
            if in_process {
                shared.publishing.store(true, Ordering::Relaxed);
            }
        });
        Subscription {
            events: shared.events.subscribe(),
            live: shared.live.subscribe(),
            ready: false,
            shared,
        }
    }
}

/// Why [`Subscription::wait_for`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Woke {
    /// The entry may have changed: read it again.
    Changed(Arc<Change>),
    /// Changes may have been lost: read it again.
    Reset,
    /// The deadline passed without news of the entry.
    Deadline,
}

/// One subscriber's view of the bus (see [`Cache::subscribe`]). Dropping it
/// unsubscribes.
pub struct Subscription {
    shared: Arc<Shared>,
    events: broadcast::Receiver<Event>,
    live: watch::Receiver<Option<Instant>>,
    ready: bool,
}

impl Subscription {
    /// The next notice. Waits for as long as it takes: bound it with a
    /// timeout or a `select!`.
    pub async fn next(&mut self) -> Notice {
        if !self.ready {
            self.wait_live().await;
            // What was sent before Ready is of no use to anyone.
            self.events = self.events.resubscribe();
            self.ready = true;
            return Notice::Ready;
        }
        loop {
            match self.events.recv().await {
                Ok(Event::Change(c)) => return Notice::Change(c),
                Ok(Event::Lost) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.ready = false;
                    return Notice::Reset;
                }
                // The sender lives in `shared`, which this holds.
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }

    /// Whether the last notice left this subscription ready (every change
    /// from now on will be delivered).
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Waits until the entry `key` of `level` may have changed, changes may
    /// have been lost, or `deadline` passes. For callers waiting for another
    /// caller's value: subscribe, read the entry, and only then wait, so
    /// that a change between the read and the wait is not missed; and read
    /// again at an interval too, because a subscription is not Ready at once
    /// (on Redis, up to 1.5 s after the deployment's first subscriber), and
    /// changes made before Ready are not delivered.
    pub async fn wait_for(&mut self, level: Level, key: &str, deadline: Deadline) -> Woke {
        let wait = async {
            loop {
                match self.next().await {
                    Notice::Ready => {}
                    Notice::Reset => return Woke::Reset,
                    Notice::Change(c) if c.touches(level, key) => return Woke::Changed(c),
                    Notice::Change(_) => {}
                }
            }
        };
        tokio::time::timeout_at(deadline.instant(), wait)
            .await
            .unwrap_or(Woke::Deadline)
    }

    /// Until the bus is live for this process.
    async fn wait_live(&mut self) {
        loop {
            let at = *self.live.borrow_and_update();
            match at {
                Some(at) if at <= Instant::now() => return,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.live.changed() => {}
                    }
                }
                None => {
                    if self.live.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let in_process = self.shared.redis.is_none();
        let publishing = &self.shared.publishing;
        self.shared.watchers.send_modify(|n| {
            *n -= 1;
            if in_process && *n == 0 {
                publishing.store(false, Ordering::Relaxed);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::{CacheConfig, Value};
    use crate::store::MemoryStore;

    fn cache() -> Cache {
        Cache::new(
            Store::from(MemoryStore::new(Default::default())),
            CacheConfig::default(),
        )
    }

    fn entry(level: Level, key: &str) -> NewEntry {
        NewEntry {
            level,
            key: key.into(),
            value: Value::Text("v".into()),
            ttl: None,
            tags: vec![],
            soft_ttl: None,
        }
    }

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(1))
    }

    /// Nothing is announced without a subscriber; with one, Ready comes
    /// first, then each write, one change per level of a batch; dropping
    /// the last subscriber turns announcing off again.
    #[tokio::test]
    async fn a_subscriber_hears_writes_in_order() {
        let cache = cache();
        assert!(!cache.watched());
        let mut sub = cache.subscribe();
        assert!(cache.watched());
        assert_eq!(sub.next().await, Notice::Ready);
        cache.set(entry(Level::App, "a"), soon()).await.unwrap();
        let batch = [
            entry(Level::App, "b"),
            entry(Level::Db, "c"),
            entry(Level::App, "d"),
        ];
        cache.set_many(&batch, soon()).await.unwrap();
        cache.delete(Level::Db, "c", soon()).await.unwrap();
        cache.clear_level(Level::Api, soon()).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            match sub.next().await {
                Notice::Change(c) => got.push((c.kind, c.level, c.keys.clone())),
                other => panic!("{other:?}"),
            }
        }
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                (ChangeKind::Set, Some(Level::App), keys(&["a"])),
                (ChangeKind::Set, Some(Level::App), keys(&["b", "d"])),
                (ChangeKind::Set, Some(Level::Db), keys(&["c"])),
                (ChangeKind::Delete, Some(Level::Db), keys(&["c"])),
                (ChangeKind::ClearLevel, Some(Level::Api), keys(&[])),
            ]
        );
        drop(sub);
        assert!(!cache.watched());
    }

    /// A subscriber that leaves more than the buffer unread is reset, then
    /// Ready again, and hears what follows.
    #[tokio::test]
    async fn a_lagging_subscriber_is_reset() {
        let cache = cache();
        let mut sub = cache.subscribe();
        assert_eq!(sub.next().await, Notice::Ready);
        for _ in 0..=BUFFER {
            cache.publish(Change::clear(Level::App), soon()).await;
        }
        assert_eq!(sub.next().await, Notice::Reset);
        assert!(!sub.is_ready());
        assert_eq!(sub.next().await, Notice::Ready);
        cache
            .publish(Change::tags(None, vec!["t".into()]), soon())
            .await;
        assert!(matches!(sub.next().await, Notice::Change(c) if c.kind == ChangeKind::Tags));
    }

    /// `wait_for` wakes on a change of its key (or anything that may touch
    /// it), not on other keys, and gives up at the deadline.
    #[tokio::test]
    async fn wait_for_wakes_on_its_key() {
        let cache = cache();
        let mut sub = cache.subscribe();
        let short = Deadline::after(Duration::from_millis(50));
        assert_eq!(sub.wait_for(Level::App, "k", short).await, Woke::Deadline);
        let writer = cache.clone();
        let write = tokio::spawn(async move {
            writer
                .set(entry(Level::App, "other"), soon())
                .await
                .unwrap();
            writer.set(entry(Level::Db, "k"), soon()).await.unwrap();
            writer.set(entry(Level::App, "k"), soon()).await.unwrap();
        });
        match sub.wait_for(Level::App, "k", soon()).await {
            Woke::Changed(c) => assert_eq!(c.keys, vec!["k".to_owned()]),
            other => panic!("{other:?}"),
        }
        write.await.unwrap();
        assert!(Change::tags(Some(Level::App), vec![]).touches(Level::App, "x"));
        assert!(!Change::clear(Level::Db).touches(Level::App, "x"));
    }
}
