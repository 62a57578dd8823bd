//! This process's own task figures, per queue: what it submitted, how the
//! attempts it finished ended, how long they ran and waited. Prometheus
//! sums them over instances; the shared store's counts (the same seen from
//! every instance) are [`super::metrics`]'s.
//!
//! Recording adds to atomics of a table built once from the configured
//! queues (no lock); a queue outside it counts under `other`, so the label
//! set stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::histogram::{Histogram, HistogramSnapshot};
use crate::domain::task::{QueueName, State, Task};

/// The outcomes counted per queue, in [`QueueFigures::counts`] order.
pub const OUTCOMES: [&str; 5] = ["submitted", "succeeded", "failed", "timed_out", "retried"];

#[derive(Debug, Default)]
struct QueueCounters {
    /// In [`OUTCOMES`] order.
    counts: [AtomicU64; 5],
    /// Tasks a submit gave straight to an idle slot (see
    /// `engine::handoff`).
    handed: AtomicU64,
    /// Wakes this process took from Redis: a task made ready through
    /// another process (see `engine::wakes`).
    woken: AtomicU64,
    run: Histogram,
    wait: Histogram,
}

/// One queue's figures, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFigures {
    /// The queue's name, or `other`.
    pub queue: String,
    /// In [`OUTCOMES`] order.
    pub counts: [u64; 5],
    /// Tasks a submit gave straight to an idle built-in slot.
    pub handed: u64,
    /// Wakes taken from Redis for the queue's idle workers.
    pub woken: u64,
    /// How long finished attempts ran.
    pub run: HistogramSnapshot,
    /// How long tasks waited from their submit to their first start.
    pub wait: HistogramSnapshot,
}

/// This process's task figures: a cheap `Clone` handle.
#[derive(Debug, Clone)]
pub struct TaskCounters {
    queues: Arc<Vec<(QueueName, QueueCounters)>>,
    other: Arc<QueueCounters>,
}

impl TaskCounters {
    /// Figures for `queues`, and `other` for the rest.
    pub fn new(queues: &[QueueName]) -> Self {
        Self {
            queues: Arc::new(
                queues
                    .iter()
                    .map(|q| (q.clone(), QueueCounters::default()))
                    .collect(),
            ),
            other: Arc::default(),
        }
    }

    /// A few configured queues: a scan beats hashing.
    fn of(&self, queue: &str) -> &QueueCounters {
        self.queues
            .iter()
            .find(|(q, _)| q.as_str() == queue)
            .map_or(&self.other, |(_, c)| c)
    }

    /// A task of `queue` was stored.
    pub fn submitted(&self, queue: &QueueName) {
        self.of(queue.as_str()).counts[0].fetch_add(1, Relaxed);
    }

    /// `task` was leased: its first attempt's wait is recorded.
    pub fn leased(&self, task: &Task) {
        if task.attempts != 1 {
            return;
        }
        if let Some(started) = task.started_ms {
            let waited = between(task.created_ms, started);
            self.of(task.id.queue().as_str()).wait.record(waited);
        }
    }

    /// A submit gave a task of `queue` straight to an idle built-in slot.
    pub fn handed(&self, queue: &QueueName) {
        self.of(queue.as_str()).handed.fetch_add(1, Relaxed);
    }

    /// A wake from Redis reached this process's idle workers of `queue`.
    pub fn woken(&self, queue: &QueueName) {
        self.of(queue.as_str()).woken.fetch_add(1, Relaxed);
    }

    /// An attempt of `task` ended, moving it to `state`.
    pub fn finished(&self, task: &Task, state: State) {
        self.finished_at(task.id.queue().as_str(), task.started_ms, state);
    }

    /// An attempt of a task of `queue` started at `started_ms` ended,
    /// moving it to `state`.
    pub fn finished_at(&self, queue: &str, started_ms: Option<i64>, state: State) {
        let c = self.of(queue);
        let outcome = match state {
            State::Succeeded => 1,
            State::Failed => 2,
            State::TimedOut => 3,
            State::Queued | State::Scheduled => 4,
            _ => return,
        };
        c.counts[outcome].fetch_add(1, Relaxed);
        if let Some(started) = started_ms {
            c.run.record(between(started, now_ms()));
        }
    }

    /// Every queue's figures, `other` last.
    pub fn read(&self) -> Vec<QueueFigures> {
        let read = |queue: &str, c: &QueueCounters| QueueFigures {
            queue: queue.to_owned(),
            counts: std::array::from_fn(|i| c.counts[i].load(Relaxed)),
            handed: c.handed.load(Relaxed),
            woken: c.woken.load(Relaxed),
            run: c.run.snapshot(),
            wait: c.wait.snapshot(),
        };
        let mut all: Vec<QueueFigures> = self
            .queues
            .iter()
            .map(|(q, c)| read(q.as_str(), c))
            .collect();
        all.push(read("other", &self.other));
        all
    }
}

/// From `from_ms` to `to_ms` (0 if the clocks disagree).
fn between(from_ms: i64, to_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(to_ms - from_ms).unwrap_or(0))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Configured queues count on their own; any other queue counts under
    /// `other`, so the label set stays bounded.
    #[test]
    fn unconfigured_queues_count_as_other() {
        let research = QueueName::parse("research").unwrap();
        let c = TaskCounters::new(std::slice::from_ref(&research));
        c.submitted(&research);
        c.submitted(&QueueName::parse("surprise").unwrap());
        c.submitted(&QueueName::parse("another").unwrap());
        let read = c.read();
        assert_eq!(read.len(), 2);
        assert_eq!((read[0].queue.as_str(), read[0].counts[0]), ("research", 1));
        assert_eq!((read[1].queue.as_str(), read[1].counts[0]), ("other", 2));
    }
}
