//! One reader per queue per koo process, fanned out to every watcher.
//!
//! A queue's feed starts when its first watcher arrives and stops within a
//! read (a second) after its last one leaves. It reads the queue's events (on
//! Redis, the queue's stream on a connection of its own; embedded, the
//! store's event log), decodes each once, keeps the most recent in a ring, and
//! hands each event to the watchers whose filter matches, found through an
//! index (by task id, by task name, or all), so that a watcher matching
//! nothing costs nothing per event.
//!
//! **Resuming is exact.** A watcher resuming after position P gets every
//! event after P exactly once: when P falls inside the ring, the ring's
//! events after P are copied into its buffer and the watcher is registered in
//! the same critical section as the dispatch, so nothing falls between; when
//! P is older, the events are first read from the store (which says
//! `OUT_OF_RANGE` if it no longer keeps them), then the ring's, again under
//! the lock. Positions within a queue are ordered (Redis stream ids, or the
//! embedded store's sequence numbers).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;

use super::Watchers;
use super::rate::{GATHER, Rate};
use super::sink::{Next, Overflow, Sink};
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::store::tasks::{EventReader, TaskEvent};
use crate::store::{Deadline, StoreError};
use crate::tasks::engine::{TaskEngine, TaskError};

/// How long a read waits for events; also how soon a feed whose last
/// watcher left stops.
const BLOCK: Duration = Duration::from_secs(1);

/// Back-off after a failed read.
const RETRY: Duration = Duration::from_millis(500);

/// Catch-up reads from the store at once (resumes older than the ring), so
/// that a reconnect storm cannot take the store's capacity.
const CATCH_UPS: usize = 2;

/// One event, decoded once and shared by every watcher it goes to.
#[derive(Debug)]
pub struct Event {
    /// Its queue.
    pub queue: Arc<QueueName>,
    /// The state it recorded, if koo knows it.
    pub state: Option<State>,
    /// The event as stored.
    pub event: TaskEvent,
}

impl Event {
    /// Decodes `event` of `queue`.
    pub fn new(queue: QueueName, event: TaskEvent) -> Self {
        Self::shared(&Arc::new(queue), event)
    }

    fn shared(queue: &Arc<QueueName>, event: TaskEvent) -> Self {
        Self {
            queue: queue.clone(),
            state: State::parse(&event.state),
            event,
        }
    }
}

/// Which events a watcher wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// One task's.
    Task(String),
    /// Tasks of one name.
    Name(String),
    /// Every event of the queues watched.
    All,
}

impl Filter {
    fn matches(&self, e: &TaskEvent) -> bool {
        match self {
            Self::Task(id) => e.id == *id,
            Self::Name(name) => e.name == *name,
            Self::All => true,
        }
    }
}

/// A stream position, ordered: `ms-seq` on Redis, a sequence number
/// embedded.
fn position(p: &str) -> Option<(u64, u64)> {
    match p.split_once('-') {
        Some((ms, seq)) => Some((ms.parse().ok()?, seq.parse().ok()?)),
        None => Some((p.parse().ok()?, 0)),
    }
}

/// The per-process hub of feeds: a cheap-to-clone handle.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    /// The engine watchers read tasks through: on its own connections, so
    /// that watchers never take the submit, lease and sweep paths'.
    engine: TaskEngine,
    /// A std mutex: held only to look up, add or retire a feed.
    feeds: Mutex<HashMap<QueueName, Arc<Feed>>>,
    stop: CancellationToken,
    watchers: Watchers,
    bound: usize,
    catch_ups: Semaphore,
}

struct Feed {
    queue: Arc<QueueName>,
    started: OnceCell<()>,
    state: Mutex<FeedState>,
}

impl Feed {
    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct FeedState {
    /// Retired: a watcher arriving now takes a new feed.
    closed: bool,
    /// The position of the newest event read (or where reading began).
    head: String,
    /// The ring holds every event after this position.
    floor: String,
    /// The most recent events, so that a watcher resuming inside them is
    /// served from memory (a reconnecting dashboard costs the store
    /// nothing). As many as a watcher's buffer holds: a watcher ended for
    /// falling behind and resuming at once is served from here.
    ring: VecDeque<Arc<Event>>,
    ring_cap: usize,
    next_key: u64,
    sinks: HashMap<u64, (Arc<Sink>, Filter)>,
    by_id: HashMap<String, Vec<u64>>,
    by_name: HashMap<String, Vec<u64>>,
    all: Vec<u64>,
}

impl FeedState {
    fn register(&mut self, sink: Arc<Sink>, filter: Filter) -> u64 {
        let key = self.next_key;
        self.next_key += 1;
        match &filter {
            Filter::Task(id) => self.by_id.entry(id.clone()).or_default().push(key),
            Filter::Name(name) => self.by_name.entry(name.clone()).or_default().push(key),
            Filter::All => self.all.push(key),
        }
        self.sinks.insert(key, (sink, filter));
        key
    }

    fn unregister(&mut self, key: u64) {
        let Some((_, filter)) = self.sinks.remove(&key) else {
            return;
        };
        let forget = |keys: &mut Vec<u64>| {
            if let Some(i) = keys.iter().position(|k| *k == key) {
                keys.swap_remove(i);
            }
            keys.is_empty()
        };
        match filter {
            Filter::Task(id) => {
                if self.by_id.get_mut(&id).is_some_and(forget) {
                    self.by_id.remove(&id);
                }
            }
            Filter::Name(name) => {
                if self.by_name.get_mut(&name).is_some_and(forget) {
                    self.by_name.remove(&name);
                }
            }
            Filter::All => {
                forget(&mut self.all);
            }
        }
    }

    /// The ring's events after `after` that `filter` wants.
    fn replay_after(&self, after: (u64, u64), filter: &Filter) -> Vec<Arc<Event>> {
        let from = self
            .ring
            .partition_point(|e| position(&e.event.stream_id).is_some_and(|p| p <= after));
        self.ring
            .range(from..)
            .filter(|e| filter.matches(&e.event))
            .cloned()
            .collect()
    }

    /// Hands `events` to the watchers that want them; the number handed
    /// out, and how many watchers this ended (they fell behind; they are
    /// taken out of the index).
    fn dispatch(&mut self, queue: &Arc<QueueName>, events: Vec<TaskEvent>) -> (u64, usize) {
        let mut fanned = 0;
        let mut ended = Vec::new();
        for e in events {
            let event = Arc::new(Event::shared(queue, e));
            self.head.clone_from(&event.event.stream_id);
            let keys = [
                self.by_id.get(&event.event.id).map(Vec::as_slice),
                self.by_name.get(&event.event.name).map(Vec::as_slice),
                Some(self.all.as_slice()),
            ];
            for key in keys.into_iter().flatten().flatten() {
                if let Some((sink, _)) = self.sinks.get(key) {
                    fanned += 1;
                    if !sink.push(&event) {
                        ended.push(*key);
                    }
                }
            }
            self.ring.push_back(event);
            if self.ring.len() > self.ring_cap
                && let Some(old) = self.ring.pop_front()
            {
                self.floor.clone_from(&old.event.stream_id);
            }
        }
        for key in &ended {
            self.unregister(*key);
        }
        (fanned, ended.len())
    }
}

/// One watcher's place in the feeds of the queues it watches. Dropping it
/// (when the stream ends) takes it out of them.
pub struct Subscription {
    sink: Arc<Sink>,
    feeds: Vec<(Arc<Feed>, u64)>,
    positions: Vec<(Arc<QueueName>, String)>,
}

impl Subscription {
    /// The next event or signal, waiting for one.
    pub async fn next(&self) -> Next {
        self.sink.next().await
    }

    /// Where each queue's events begin for this watcher: the position its
    /// first event follows.
    pub fn positions(&self) -> &[(Arc<QueueName>, String)] {
        &self.positions
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for (feed, key) in &self.feeds {
            feed.lock().unregister(*key);
        }
    }
}

impl Hub {
    /// A hub reading through `engine` (give it connections of its own);
    /// each watcher's buffer holds at most `bound` events; feeds stop on
    /// `stop`.
    pub fn new(
        engine: TaskEngine,
        watchers: Watchers,
        bound: usize,
        stop: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(HubInner {
                engine,
                feeds: Mutex::new(HashMap::new()),
                stop,
                watchers,
                bound,
                catch_ups: Semaphore::new(CATCH_UPS),
            }),
        }
    }

    /// The engine watchers read tasks through.
    pub fn engine(&self) -> &TaskEngine {
        &self.inner.engine
    }

    /// The watcher registry.
    pub fn watchers(&self) -> &Watchers {
        &self.inner.watchers
    }

    /// Subscribes to the events `filter` wants of each queue, after its
    /// position (a resume token's) or from now on.
    pub async fn subscribe(
        &self,
        queues: &[(QueueName, Option<String>)],
        filter: Filter,
        overflow: Overflow,
        deadline: Deadline,
    ) -> Result<Subscription, StoreError> {
        let mut sub = Subscription {
            sink: Arc::new(Sink::new(self.inner.bound, overflow)),
            feeds: Vec::with_capacity(queues.len()),
            positions: Vec::with_capacity(queues.len()),
        };
        for (queue, after) in queues {
            let after = match after {
                None => None,
                Some(p) => Some((
                    p.as_str(),
                    position(p).ok_or_else(|| {
                        StoreError::InvalidCursor(format!(
                            "{} is not an event position",
                            crate::quote::quote(p)
                        ))
                    })?,
                )),
            };
            // On failure, `sub` is dropped and leaves the feeds it joined.
            let (feed, key, start) = self
                .join(queue, after, &filter, &sub.sink, deadline)
                .await?;
            sub.positions.push((feed.queue.clone(), start));
            sub.feeds.push((feed, key));
        }
        Ok(sub)
    }

    fn feeds(&self) -> MutexGuard<'_, HashMap<QueueName, Arc<Feed>>> {
        self.inner
            .feeds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `sink` in `queue`'s feed (starting it if needed): its
    /// place, and the position its events follow.
    async fn join(
        &self,
        queue: &QueueName,
        after: Option<(&str, (u64, u64))>,
        filter: &Filter,
        sink: &Arc<Sink>,
        deadline: Deadline,
    ) -> Result<(Arc<Feed>, u64, String), StoreError> {
        loop {
            let feed = self
                .feeds()
                .entry(queue.clone())
                .or_insert_with(|| {
                    Arc::new(Feed {
                        queue: Arc::new(queue.clone()),
                        started: OnceCell::new(),
                        state: Mutex::new(FeedState {
                            ring_cap: self.inner.bound,
                            ..FeedState::default()
                        }),
                    })
                })
                .clone();
            feed.started
                .get_or_try_init(|| self.start(&feed, deadline))
                .await?;
            {
                let mut st = feed.lock();
                if st.closed {
                    continue;
                }
                match after {
                    None => {
                        let key = st.register(sink.clone(), filter.clone());
                        let head = st.head.clone();
                        drop(st);
                        return Ok((feed, key, head));
                    }
                    Some((raw, p)) if position(&st.floor).is_some_and(|floor| p >= floor) => {
                        sink.prefill(st.replay_after(p, filter));
                        let key = st.register(sink.clone(), filter.clone());
                        drop(st);
                        return Ok((feed, key, raw.to_owned()));
                    }
                    Some(_) => {}
                }
            }
            let (raw, _) = after.unwrap_or_default();
            if let Some(key) = self.catch_up(&feed, raw, filter, sink, deadline).await? {
                return Ok((feed, key, raw.to_owned()));
            }
        }
    }

    /// Starts `feed`'s reader from the newest event.
    async fn start(&self, feed: &Arc<Feed>, deadline: Deadline) -> Result<(), StoreError> {
        let reader = self
            .inner
            .engine
            .store()
            .event_reader(&feed.queue, None, deadline)
            .await?;
        {
            let mut st = feed.lock();
            st.head = reader.position();
            st.floor = st.head.clone();
        }
        self.inner.watchers.reader_started();
        tokio::spawn(self.clone().follow(feed.clone(), reader));
        Ok(())
    }

    /// Reads the store's events after `after` (older than the ring) into
    /// `sink`, then the ring's, and registers it; `None` if the feed was
    /// retired meanwhile.
    async fn catch_up(
        &self,
        feed: &Arc<Feed>,
        after: &str,
        filter: &Filter,
        sink: &Arc<Sink>,
        deadline: Deadline,
    ) -> Result<Option<u64>, StoreError> {
        let _permit = tokio::time::timeout_at(deadline.instant(), self.inner.catch_ups.acquire())
            .await
            .map_err(|_| StoreError::DeadlineExceeded)?
            .map_err(|_| StoreError::Unavailable("koo is stopping".into()))?;
        let store = self.inner.engine.store();
        let mut reader = store
            .event_reader(&feed.queue, Some(after), deadline)
            .await?;
        let mut backlog = Vec::new();
        let mut last = position(after).unwrap_or_default();
        loop {
            let batch =
                tokio::time::timeout_at(deadline.instant(), reader.next(Duration::ZERO, 1000))
                    .await
                    .map_err(|_| StoreError::DeadlineExceeded)??;
            let done = batch.is_empty();
            for e in batch {
                last = position(&e.stream_id).unwrap_or(last);
                if filter.matches(&e) {
                    backlog.push(Arc::new(Event::shared(&feed.queue, e)));
                }
            }
            let mut st = feed.lock();
            if st.closed {
                return Ok(None);
            }
            if done || position(&st.floor).is_some_and(|floor| last >= floor) {
                backlog.extend(st.replay_after(last, filter));
                sink.prefill(backlog);
                return Ok(Some(st.register(sink.clone(), filter.clone())));
            }
        }
    }

    /// Retires `feed` if nobody watches it; `true` if it did.
    fn retire_if_unwatched(&self, feed: &Arc<Feed>) -> bool {
        self.retire(feed, false)
    }

    /// Marks `feed` closed and takes it out of the hub (under both locks,
    /// so that no watcher joins a feed about to stop); unless `stopping`,
    /// only when nobody watches it. When koo stops, every watcher is told.
    /// `true` if it was retired.
    fn retire(&self, feed: &Arc<Feed>, stopping: bool) -> bool {
        let mut feeds = self.feeds();
        let mut st = feed.lock();
        if !stopping && !st.sinks.is_empty() {
            return false;
        }
        st.closed = true;
        for (sink, _) in st.sinks.values() {
            sink.signal(Next::Closed);
        }
        if feeds
            .get(&*feed.queue)
            .is_some_and(|f| Arc::ptr_eq(f, feed))
        {
            feeds.remove(&*feed.queue);
        }
        true
    }

    /// Reads `feed`'s queue until nobody watches it or koo stops.
    async fn follow(self, feed: Arc<Feed>, mut reader: EventReader) {
        let stop = self.inner.stop.clone();
        // A quarter of a watcher's buffer at a time: one read alone never
        // fills a buffer, so a watcher is ended only after it has fallen
        // behind by several reads.
        let batch = (self.inner.bound / 4).max(1);
        // Set after a failed read: before reading on, check that the store
        // still keeps the events after our position.
        let mut failed = false;
        // The first check comes after the first read: the watcher that
        // started the feed registers just after starting it.
        let mut first = true;
        let mut rate = Rate::new();
        loop {
            if !std::mem::take(&mut first) && self.retire_if_unwatched(&feed) {
                self.inner.watchers.reader_stopped();
                return;
            }
            if failed {
                match self.check_gap(&feed, &mut reader).await {
                    Ok(()) => failed = false,
                    Err(()) => {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(RETRY) => continue,
                        }
                    }
                }
            }
            let read = tokio::select! {
                _ = stop.cancelled() => break,
                read = reader.next(BLOCK, batch) => read,
            };
            match read {
                Ok(events) if events.is_empty() => {}
                Ok(events) => {
                    let few = events.len() < batch;
                    let (fanned, ended) = feed.lock().dispatch(&feed.queue, events);
                    let gather = rate.add(fanned as usize) && few;
                    let w = &self.inner.watchers;
                    w.add_fanned_out(fanned);
                    w.add_fell_behind(ended);
                    if gather {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(GATHER) => {}
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %feed.queue, error = %e, "cannot read task events; retrying");
                    failed = true;
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
        // koo is stopping: every watcher is told, and the feed retired.
        self.retire(&feed, true);
        self.inner.watchers.reader_stopped();
    }

    /// After a failed read: whether the store still keeps every event after
    /// the reader's position. If it trimmed some, the watchers are told of
    /// the gap and reading goes on from the newest event. `Err` while the
    /// store cannot answer.
    async fn check_gap(&self, feed: &Arc<Feed>, reader: &mut EventReader) -> Result<(), ()> {
        let store = self.inner.engine.store();
        let deadline = Deadline::after(Duration::from_secs(5));
        match store
            .event_reader(&feed.queue, Some(&reader.position()), deadline)
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::Expired(_)) => {
                let fresh = store
                    .event_reader(&feed.queue, None, deadline)
                    .await
                    .map_err(|_| ())?;
                tracing::warn!(queue = %feed.queue, "task events were trimmed while koo could not read them; watchers are told");
                let mut st = feed.lock();
                st.head = fresh.position();
                st.floor = st.head.clone();
                st.ring.clear();
                for (sink, _) in st.sinks.values() {
                    sink.signal(Next::Gap(feed.queue.to_string()));
                }
                *reader = fresh;
                Ok(())
            }
            Err(_) => Err(()),
        }
    }

    /// Waits until task `id` ends: the task in its end state, or `None` if
    /// it has not ended by `deadline`. Follows the queue's events, so it
    /// sees the end wherever the task ran.
    pub async fn wait_final(
        &self,
        engine: &TaskEngine,
        id: &TaskId,
        deadline: Deadline,
    ) -> Result<Option<Task>, TaskError> {
        let sub = self
            .subscribe(
                &[(id.queue(), None)],
                Filter::Task(id.as_str().to_owned()),
                Overflow::Resync,
                deadline,
            )
            .await?;
        loop {
            let task = engine.get(id.as_str(), deadline).await?;
            if task.state.is_final() {
                return Ok(Some(task));
            }
            match tokio::time::timeout_at(deadline.instant(), sub.next()).await {
                Err(_) => return Ok(None),
                Ok(Next::Event(_) | Next::Resync | Next::Gap(_) | Next::FellBehind) => {}
                Ok(Next::Closed) => {
                    return Err(TaskError::Store(StoreError::Unavailable(
                        "koo is stopping".into(),
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_redis_ids_and_embedded_sequence_numbers() {
        assert!(position("1700000000000-5") < position("1700000000001-0"));
        assert!(position("9-1") > position("9-0"));
        assert!(position("41") < position("42"));
        assert_eq!(position("x"), None);
        assert_eq!(position("1-x"), None);
    }
}
