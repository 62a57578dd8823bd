//! Following a queue's event log in the embedded store: readers wait on a
//! watch channel of the newest event's sequence number, so an append wakes
//! every reader without a lock held across an `.await`.

use std::time::Duration;

use tokio::sync::watch;

use super::MemoryTasks;
use crate::domain::task::QueueName;
use crate::store::tasks::TaskEvent;
use crate::store::{Result, StoreError};

impl MemoryTasks {
    /// A reader of `queue`'s events after position `after`, or from now on.
    pub(super) fn open_reader(
        &self,
        queue: &QueueName,
        after: Option<&str>,
    ) -> Result<MemoryEventReader> {
        let last = match after {
            Some(position) => {
                let last = position.parse::<u64>().map_err(|_| {
                    StoreError::InvalidCursor(format!(
                        "event position {} was not issued by the embedded store",
                        crate::quote::quote(position)
                    ))
                })?;
                let trimmed = self.lock().queues.get(queue).map_or(0, |q| q.trimmed_upto);
                if trimmed > last {
                    return Err(StoreError::Expired(format!(
                        "events after position {position} are no longer kept; watch again without a resume token"
                    )));
                }
                last
            }
            None => self.lock().last_event,
        };
        Ok(MemoryEventReader {
            tasks: self.clone(),
            queue: queue.clone(),
            last,
            changes: self.shared.events.subscribe(),
        })
    }
}

/// Follows one queue's event log in the embedded store.
pub struct MemoryEventReader {
    tasks: MemoryTasks,
    queue: QueueName,
    last: u64,
    changes: watch::Receiver<u64>,
}

impl MemoryEventReader {
    /// The position after the last event read.
    pub fn position(&self) -> String {
        self.last.to_string()
    }

    /// The next events, at most `max`, waiting up to `block` for some
    /// (empty after that).
    pub async fn next(&mut self, block: Duration, max: usize) -> Vec<TaskEvent> {
        let until = tokio::time::Instant::now() + block;
        loop {
            // Marked seen before reading, so that an event appended after the
            // read wakes the wait below.
            self.changes.borrow_and_update();
            let events = self.read(max);
            if !events.is_empty() {
                return events;
            }
            match tokio::time::timeout_at(until, self.changes.changed()).await {
                Ok(Ok(())) => {}
                // timed out, or the store is gone
                _ => return Vec::new(),
            }
        }
    }

    fn read(&mut self, max: usize) -> Vec<TaskEvent> {
        let s = self.tasks.lock();
        let Some(q) = s.queues.get(&self.queue) else {
            return Vec::new();
        };
        let from = q.events.partition_point(|(seq, _)| *seq <= self.last);
        let events: Vec<TaskEvent> = q
            .events
            .range(from..)
            .take(max)
            .map(|(_, e)| e.clone())
            .collect();
        if let Some(e) = events.last() {
            self.last = e.stream_id.parse().unwrap_or(self.last);
        }
        events
    }
}
