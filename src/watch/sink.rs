//! One watcher's bounded buffer.
//!
//! The feed pushes into it (never waiting: a slow watcher must not slow the
//! reader or the others) and the watcher's stream pops from it. The bound is
//! `KOO_WATCH_BUFFER` events. At the bound, a progress event replaces the
//! same task's unread progress event (a dashboard needs the latest figure,
//! not every one); any other event overflows. What overflow means depends on
//! the watcher ([`Overflow`]): a `WatchTasks` stream is ended (it resumes
//! from its token, so nothing is lost and a final state is never silently
//! dropped); a single-task watcher drops what it buffered and re-reads its
//! task, which carries the latest state anyway.
//!
//! Events are shared (`Arc`): a buffer holds pointers, so a full buffer of
//! the default 4,096 costs 32 KiB.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::feed::Event;

/// What a watcher does when its buffer overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// End the watcher ([`Next::FellBehind`]).
    End,
    /// Drop the buffered events and tell the watcher to re-read
    /// ([`Next::Resync`]).
    Resync,
}

/// What a watcher gets next.
#[derive(Debug, Clone)]
pub enum Next {
    /// An event.
    Event(Arc<Event>),
    /// Events were dropped: re-read the current state (single-task
    /// watchers only).
    Resync,
    /// The watcher left too many events unread and is ended.
    FellBehind,
    /// Events of `queue` were lost before koo could read them.
    Gap(String),
    /// The feed stopped (koo is stopping).
    Closed,
}

#[derive(Default)]
struct Buffer {
    events: VecDeque<Arc<Event>>,
    /// How many of `events`, at the front, were prefilled (and so do not
    /// count against the bound).
    backlog: usize,
    /// A signal for the watcher, delivered before any event pushed after it.
    signal: Option<Next>,
}

/// One watcher's buffer.
pub struct Sink {
    buffer: Mutex<Buffer>,
    ready: Notify,
    bound: usize,
    overflow: Overflow,
}

impl Sink {
    /// An empty buffer of at most `bound` events.
    pub fn new(bound: usize, overflow: Overflow) -> Self {
        Self {
            buffer: Mutex::new(Buffer::default()),
            ready: Notify::new(),
            bound: bound.max(1),
            overflow,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `event`; `false` when this push ended the watcher (it fell
    /// behind). Never waits.
    pub fn push(&self, event: &Arc<Event>) -> bool {
        let mut b = self.lock();
        if matches!(
            b.signal,
            Some(Next::FellBehind | Next::Closed | Next::Gap(_))
        ) {
            return true;
        }
        let live = b.events.len() - b.backlog;
        if live >= self.bound && !coalesce(&mut b.events, event) {
            b.events = VecDeque::new();
            b.backlog = 0;
            let ended = self.overflow == Overflow::End;
            b.signal = Some(if ended {
                Next::FellBehind
            } else {
                Next::Resync
            });
            drop(b);
            self.ready.notify_one();
            return !ended;
        }
        if live < self.bound {
            b.events.push_back(event.clone());
        }
        drop(b);
        self.ready.notify_one();
        true
    }

    /// Adds the events a resuming watcher must see first, beyond the bound
    /// (they are bounded by what the queue keeps).
    pub fn prefill(&self, events: impl IntoIterator<Item = Arc<Event>>) {
        let mut b = self.lock();
        let before = b.events.len();
        b.events.extend(events);
        b.backlog += b.events.len() - before;
        drop(b);
        self.ready.notify_one();
    }

    /// Tells the watcher something (a [`Next`] other than an event). A
    /// terminal signal drops the buffered events.
    pub fn signal(&self, next: Next) {
        let mut b = self.lock();
        if matches!(
            b.signal,
            Some(Next::FellBehind | Next::Closed | Next::Gap(_))
        ) {
            return;
        }
        match next {
            Next::Resync if self.overflow == Overflow::End => {}
            Next::Resync => {
                b.events.clear();
                b.backlog = 0;
                b.signal = Some(Next::Resync);
            }
            Next::Gap(_) if self.overflow == Overflow::Resync => {
                b.events.clear();
                b.backlog = 0;
                b.signal = Some(Next::Resync);
            }
            other => {
                b.events = VecDeque::new();
                b.backlog = 0;
                b.signal = Some(other);
            }
        }
        drop(b);
        self.ready.notify_one();
    }

    /// The next event or signal, waiting for one.
    pub async fn next(&self) -> Next {
        loop {
            if let Some(next) = self.try_next() {
                return next;
            }
            self.ready.notified().await;
        }
    }

    /// The next event or signal, if one is waiting.
    pub fn try_next(&self) -> Option<Next> {
        let mut b = self.lock();
        match &b.signal {
            Some(Next::Resync) => return b.signal.take(),
            Some(terminal) => return Some(terminal.clone()),
            None => {}
        }
        let next = b.events.pop_front()?;
        b.backlog = b.backlog.saturating_sub(1);
        Some(Next::Event(next))
    }

    /// Events waiting to be read.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().events.len()
    }
}

/// Replaces the same task's newest unread event with `event` when both are
/// progress reports (nothing of that task happened between them); `false`
/// when `event` cannot be merged.
fn coalesce(events: &mut VecDeque<Arc<Event>>, event: &Arc<Event>) -> bool {
    if event.event.progress.is_none() {
        return false;
    }
    match events
        .iter_mut()
        .rev()
        .find(|e| e.event.id == event.event.id)
    {
        Some(same) if same.event.progress.is_some() => {
            *same = event.clone();
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::QueueName;
    use crate::store::tasks::TaskEvent;

    fn event(n: u64, id: &str, state: &str, progress: Option<&str>) -> Arc<Event> {
        Arc::new(Event::new(
            QueueName::parse("q").unwrap(),
            TaskEvent {
                stream_id: n.to_string(),
                id: id.into(),
                name: "t".into(),
                state: state.into(),
                progress: progress.map(str::to_owned),
                at_ms: 0,
            },
        ))
    }

    fn id_of(next: Option<Next>) -> String {
        match next {
            Some(Next::Event(e)) => e.event.stream_id.clone(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn a_full_buffer_merges_progress_of_one_task_then_ends_the_watcher() {
        let sink = Sink::new(2, Overflow::End);
        assert!(sink.push(&event(1, "a", "running", Some("{\"p\":1}"))));
        assert!(sink.push(&event(2, "b", "running", None)));
        // full: a's progress replaces its unread progress
        assert!(sink.push(&event(3, "a", "running", Some("{\"p\":2}"))));
        assert_eq!(sink.len(), 2);
        // full, and a final state cannot be merged: the watcher is ended
        assert!(!sink.push(&event(4, "a", "succeeded", None)));
        assert!(matches!(sink.try_next(), Some(Next::FellBehind)));
        assert!(matches!(sink.try_next(), Some(Next::FellBehind)), "sticky");
        assert_eq!(sink.len(), 0, "its memory is given back");
    }

    #[test]
    fn a_resyncing_watcher_drops_its_buffer_then_continues() {
        let sink = Sink::new(1, Overflow::Resync);
        assert!(sink.push(&event(1, "a", "queued", None)));
        assert!(sink.push(&event(2, "a", "running", None)));
        assert!(matches!(sink.try_next(), Some(Next::Resync)));
        assert!(sink.try_next().is_none());
        assert!(sink.push(&event(3, "a", "succeeded", None)));
        assert_eq!(id_of(sink.try_next()), "3");
    }

    #[test]
    fn progress_after_another_state_of_the_task_is_not_merged() {
        let sink = Sink::new(2, Overflow::End);
        sink.push(&event(1, "a", "running", Some("{}")));
        sink.push(&event(2, "a", "running", None));
        assert!(!sink.push(&event(3, "a", "running", Some("{}"))));
    }

    #[test]
    fn prefilled_events_come_first_and_do_not_count_against_the_bound() {
        let sink = Sink::new(1, Overflow::End);
        sink.prefill([
            event(1, "a", "queued", None),
            event(2, "a", "running", None),
        ]);
        assert!(
            sink.push(&event(3, "a", "succeeded", None)),
            "one live event fits"
        );
        assert_eq!(id_of(sink.try_next()), "1");
        assert_eq!(id_of(sink.try_next()), "2");
        assert_eq!(id_of(sink.try_next()), "3");
    }
}
