//! The merged watch (`WatchTasks`): one watcher of the events of several
//! queues, as one stream, resumable exactly.
//!
//! The watcher subscribes to each queue's feed ([`super::feed`]) after the
//! position its resume token names (or from now on), and keeps each queue's
//! position as events arrive, so that every event it hands out carries the
//! token that resumes right after it ([`super::resume`]). A watcher that
//! falls behind is ended with such a token rather than allowed to grow koo's
//! memory.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::resume::{self, Positions};
use super::{Event, Filter, Hub, Kind, Next, Overflow, Permit, Subscription, WatchError};
use crate::domain::task::QueueName;
use crate::store::{Deadline, StoreError};

/// What a merged watcher wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuesFilter {
    /// The queues (a queue named twice is watched once); empty: every
    /// configured queue.
    pub queues: Vec<QueueName>,
    /// Only tasks of this name; `None`: every task.
    pub name: Option<String>,
}

/// One event as a merged watcher receives it.
#[derive(Debug)]
pub struct Delivered {
    /// The event, shared with the other watchers it went to.
    pub event: Arc<Event>,
    /// The token that resumes right after this event.
    pub resume_token: String,
}

/// One merged watcher. It counts against `KOO_MAX_WATCHERS` until dropped.
pub struct QueuesWatch {
    sub: Subscription,
    /// Each queue's position: the token's, with the watched queues' where
    /// this watch begins.
    positions: Positions,
    shutdown: CancellationToken,
    /// `KOO_WATCH_BUFFER`, for the error that ends a watcher fallen behind.
    buffer: usize,
    done: bool,
    _permit: Permit,
}

impl Hub {
    /// Admits and subscribes a merged watcher of `filter`'s queues, after
    /// the positions of `resume_token` (`""`: from now on). It ends on
    /// `shutdown`; `buffer` is the bound its errors name.
    pub async fn watch_queues(
        &self,
        filter: QueuesFilter,
        resume_token: &str,
        buffer: usize,
        shutdown: CancellationToken,
        deadline: Deadline,
    ) -> Result<QueuesWatch, WatchError> {
        let QueuesFilter { mut queues, name } = filter;
        if queues.is_empty() {
            queues = self.engine().config().queues();
        }
        queues.sort();
        queues.dedup();
        let permit = self.watchers().admit(Kind::Tasks)?;
        let mut positions = resume::decode(resume_token)?;
        let wanted: Vec<(QueueName, Option<String>)> = queues
            .into_iter()
            .map(|q| {
                let after = positions.get(q.as_str()).cloned();
                (q, after)
            })
            .collect();
        let filter = name.map_or(Filter::All, Filter::Name);
        let sub = self
            .subscribe(&wanted, filter, Overflow::End, deadline)
            .await
            .map_err(|e| match e {
                StoreError::InvalidCursor(reason) => WatchError::ResumeToken { reason },
                other => WatchError::Store(other),
            })?;
        for (queue, start) in sub.positions() {
            positions.insert(queue.to_string(), start.clone());
        }
        Ok(QueuesWatch {
            sub,
            positions,
            shutdown,
            buffer,
            done: false,
            _permit: permit,
        })
    }
}

impl QueuesWatch {
    /// The next matching event with its resume token, waiting for one;
    /// `None` once the watch is over (koo stops, or after an error, which
    /// ends it).
    pub async fn next(&mut self) -> Option<Result<Delivered, WatchError>> {
        if self.done {
            return None;
        }
        let next = self.next_event().await;
        self.done = matches!(next, None | Some(Err(_)));
        next
    }

    async fn next_event(&mut self) -> Option<Result<Delivered, WatchError>> {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                next = self.sub.next() => next,
            };
            return match next {
                Next::Event(event) => Some(Ok(self.delivered(event))),
                Next::Resync => continue,
                Next::FellBehind => Some(Err(WatchError::FellBehind {
                    buffer: self.buffer,
                    resume_token: resume::encode(&self.positions),
                })),
                Next::Gap(queue) => Some(Err(WatchError::Gap { queue })),
                Next::Closed if self.shutdown.is_cancelled() => None,
                Next::Closed => Some(Err(WatchError::Stopped)),
            };
        }
    }

    /// `event`, having moved its queue's position past it.
    fn delivered(&mut self, event: Arc<Event>) -> Delivered {
        if let Some(p) = self.positions.get_mut(event.queue.as_str()) {
            p.clone_from(&event.event.stream_id);
        }
        Delivered {
            resume_token: resume::encode(&self.positions),
            event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::Category;
    use crate::store::tasks::TaskStore;
    use crate::tasks::engine::{NewTask, TaskConfig, TaskEngine};
    use crate::watch::Watchers;
    use std::time::Duration;

    fn hub(stop: &CancellationToken) -> Hub {
        let engine = TaskEngine::new(TaskStore::memory(), TaskConfig::default());
        Hub::new(engine, Watchers::new(8), 64, stop.clone())
    }

    async fn next(w: &mut QueuesWatch) -> Delivered {
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("an event in time")
            .expect("the watch goes on")
            .expect("no error")
    }

    /// A watcher resuming with the token of an event gets exactly the
    /// events after it, though they happened while nobody watched.
    #[tokio::test]
    async fn a_resume_token_continues_right_after_its_event() {
        let stop = CancellationToken::new();
        let hub = hub(&stop);
        let deadline = || Deadline::after(Duration::from_secs(5));
        let submit = |name: &str| {
            let engine = hub.engine().clone();
            let new = NewTask::new(name, Category::Research);
            async move { engine.submit(new, deadline()).await.unwrap() }
        };
        let filter = QueuesFilter::default();
        let mut w = hub
            .watch_queues(filter.clone(), "", 64, stop.clone(), deadline())
            .await
            .unwrap();
        let first = submit("a").await;
        let seen = next(&mut w).await;
        assert_eq!(seen.event.event.id, first.id.to_string());
        drop(w);
        let second = submit("b").await;
        let mut resumed = hub
            .watch_queues(filter, &seen.resume_token, 64, stop.clone(), deadline())
            .await
            .unwrap();
        let after = next(&mut resumed).await;
        assert_eq!(after.event.event.id, second.id.to_string());
        let positions = resume::decode(&after.resume_token).unwrap();
        assert_eq!(
            positions.get(after.event.queue.as_str()),
            Some(&after.event.event.stream_id)
        );
        stop.cancel();
    }

    /// A token koo did not issue is refused before anything is subscribed.
    #[tokio::test]
    async fn a_foreign_token_is_refused() {
        let stop = CancellationToken::new();
        let hub = hub(&stop);
        let refused = hub
            .watch_queues(
                QueuesFilter::default(),
                "bm90IGEgdG9rZW4",
                64,
                stop.clone(),
                Deadline::after(Duration::from_secs(5)),
            )
            .await;
        assert!(matches!(refused, Err(WatchError::ResumeToken { .. })));
        assert_eq!(hub.watchers().figures().by_kind, [0, 0, 0, 0, 0]);
    }
}
