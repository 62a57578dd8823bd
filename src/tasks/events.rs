//! Live task events for watchers: one reader per queue per koo process,
//! fanned out to any number of local subscribers.
//!
//! On Redis, events travel through each queue's stream, so a watcher on one
//! instance sees work done on another; on the embedded store, through its
//! in-process event log. A thousand `WatchTask` streams cost
//! one blocking read per queue, not a thousand. Subscribers get a bounded
//! broadcast channel: a slow one misses intermediate events (it is told it
//! lagged and re-reads the task, so it still sees the latest state), and never
//! slows the reader or the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::engine::{TaskEngine, TaskError};
use super::model::{QueueName, Task, TaskId};
use crate::store::tasks::{EventReader, TaskEvent, TaskStore};
use crate::store::{Deadline, StoreError};

/// Events kept for slow subscribers before they are told they lagged.
const CHANNEL: usize = 1024;

/// The per-process event hub: a cheap-to-clone handle.
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<Inner>,
}

struct Inner {
    store: TaskStore,
    /// A std mutex: held only to look up or insert a sender, never across an
    /// `.await`.
    readers: Mutex<HashMap<QueueName, broadcast::Sender<TaskEvent>>>,
    stop: CancellationToken,
}

impl EventHub {
    /// A hub over `store`; readers stop on `stop`.
    pub fn new(store: TaskStore, stop: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                readers: Mutex::new(HashMap::new()),
                stop,
            }),
        }
    }

    /// Subscribes to `queue`'s events: every event appended after this
    /// returns is delivered (unless the subscriber lags).
    pub async fn subscribe(
        &self,
        queue: &QueueName,
        deadline: Deadline,
    ) -> Result<broadcast::Receiver<TaskEvent>, StoreError> {
        if let Some(tx) = self.readers().get(queue) {
            return Ok(tx.subscribe());
        }
        let reader = self.inner.store.event_reader(queue, None, deadline).await?;
        let mut readers = self.readers();
        // Another caller may have started the reader meanwhile.
        if let Some(tx) = readers.get(queue) {
            return Ok(tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(CHANNEL);
        readers.insert(queue.clone(), tx.clone());
        drop(readers);
        tokio::spawn(self.clone().follow(queue.clone(), reader, tx));
        Ok(rx)
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
        let mut events = self.subscribe(&id.queue(), deadline).await?;
        loop {
            let task = engine.get(id.as_str(), deadline).await?;
            if task.state.is_final() {
                return Ok(Some(task));
            }
            // the next event of this task (or a lag, after which the task is
            // read again)
            loop {
                match tokio::time::timeout_at(deadline.instant(), events.recv()).await {
                    Err(_) => return Ok(None),
                    Ok(Ok(e)) if e.id != id.as_str() => {}
                    Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => break,
                    // the reader stopped (koo is stopping): follow a new one
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        events = self.subscribe(&id.queue(), deadline).await?;
                        break;
                    }
                }
            }
        }
    }

    fn readers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<QueueName, broadcast::Sender<TaskEvent>>> {
        self.inner
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads a queue's stream until nobody listens or koo stops.
    async fn follow(
        self,
        queue: QueueName,
        mut reader: EventReader,
        tx: broadcast::Sender<TaskEvent>,
    ) {
        loop {
            if self.inner.stop.is_cancelled() {
                break;
            }
            {
                // Checked under the lock, so that a subscriber cannot join a
                // reader that is about to stop.
                let mut readers = self.readers();
                if tx.receiver_count() == 0 {
                    readers.remove(&queue);
                    return;
                }
            }
            let read = tokio::select! {
                _ = self.inner.stop.cancelled() => break,
                read = reader.next(Duration::from_secs(1)) => read,
            };
            match read {
                Ok(events) => {
                    for event in events {
                        let _ = tx.send(event);
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "cannot read task events; retrying");
                    tokio::select! {
                        _ = self.inner.stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        self.readers().remove(&queue);
    }
}
