//! The task figures `GetTaskMetrics` and `WatchTaskMetrics` report: every
//! queue's depths and counts, their totals, the live workers summed, and
//! each queue's run and wait times per task name over the last hour
//! ([`crate::domain::times`]), as typed values (the adapter only converts
//! them).

use std::time::Duration;

use super::engine::{TaskEngine, TaskError};
use crate::domain::QueueStats;
use crate::domain::task::QueueName;
use crate::domain::times::QueueTimes;
use crate::store::Deadline;
use crate::store::tasks::WorkerRecord;

/// How a worker reaches koo. Stored as a string in its worker record (the
/// `kind` field: part of the data format), read back through [`Self::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// A pool of `koo serve` or `koo worker` running built-in handlers.
    Builtin,
    /// An external worker on a `WorkerService.Work` stream.
    Stream,
    /// An external worker leasing with unary calls.
    Unary,
}

impl WorkerKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Builtin => "builtin",
            WorkerKind::Stream => "stream",
            WorkerKind::Unary => "unary",
        }
    }

    /// The kind of a stored name. Records from before external workers
    /// have none, and every other name is read as built-in too: a record
    /// is never refused for its kind.
    pub fn parse(stored: &str) -> WorkerKind {
        match stored {
            "stream" => WorkerKind::Stream,
            "unary" => WorkerKind::Unary,
            _ => WorkerKind::Builtin,
        }
    }

    /// Whether the worker is external (served by `WorkerService`).
    pub fn is_external(self) -> bool {
        matches!(self, WorkerKind::Stream | WorkerKind::Unary)
    }
}

/// The live workers, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerFigures {
    /// Workers alive: built-in pools, stream workers and recent unary
    /// callers.
    pub live: u64,
    /// Of which external.
    pub external: u64,
    /// Tasks they may hold at once, in all.
    pub slots: u64,
    /// Tasks they hold now.
    pub busy: u64,
}

impl WorkerFigures {
    /// The figures of `workers`.
    pub fn of(workers: &[WorkerRecord]) -> Self {
        Self {
            live: workers.len() as u64,
            external: workers
                .iter()
                .filter(|w| WorkerKind::parse(&w.kind).is_external())
                .count() as u64,
            slots: workers.iter().map(|w| u64::from(w.slots)).sum(),
            busy: workers.iter().map(|w| u64::from(w.running)).sum(),
        }
    }
}

/// Every queue's figures, their totals and the workers'.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskMetrics {
    /// Each configured queue's figures, in the configuration's order.
    pub queues: Vec<(QueueName, QueueStats)>,
    /// The queues' figures summed (the oldest wait is the longest).
    pub totals: QueueStats,
    /// The live workers.
    pub workers: WorkerFigures,
    /// Each queue's run and wait times, in `queues`' order (empty until
    /// [`Self::with_times`]).
    pub times: Vec<QueueTimes>,
}

impl TaskMetrics {
    /// The summary of `queues` and `workers`.
    pub fn summing(queues: Vec<(QueueName, QueueStats)>, workers: &[WorkerRecord]) -> Self {
        let totals = queues
            .iter()
            .fold(QueueStats::default(), |sum, (_, s)| plus(sum, s));
        Self {
            queues,
            totals,
            workers: WorkerFigures::of(workers),
            times: Vec::new(),
        }
    }

    /// With the queues' times (one per queue, in order).
    pub fn with_times(self, times: Vec<QueueTimes>) -> Self {
        Self { times, ..self }
    }
}

/// `sum` with `s` added.
fn plus(sum: QueueStats, s: &QueueStats) -> QueueStats {
    let longest = |a: Option<Duration>, b: Option<Duration>| a.max(b);
    QueueStats {
        ready: sum.ready + s.ready,
        scheduled: sum.scheduled + s.scheduled,
        running: sum.running + s.running,
        dead: sum.dead + s.dead,
        pending: sum.pending + s.pending,
        oldest_wait: longest(sum.oldest_wait, s.oldest_wait),
        counts: sum.counts.plus(&s.counts),
        // a sum of queues is no queue: each queue's pause is its own
        paused: None,
    }
}

impl TaskEngine {
    /// Every configured queue's figures and times, and the live workers',
    /// read at once.
    pub async fn metrics(&self, deadline: Deadline) -> Result<TaskMetrics, TaskError> {
        let queues = self.config().queues();
        let times = futures::future::try_join_all(
            queues.iter().map(|q| self.store().task_times(q, deadline)),
        );
        let (stats, workers, times) = futures::try_join!(
            self.queue_stats(&queues, deadline),
            async { Ok::<_, TaskError>(self.store().list_workers(deadline).await?) },
            async { Ok::<_, TaskError>(times.await?) },
        )?;
        Ok(TaskMetrics::summing(stats, &workers).with_times(times))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Count;

    fn worker(kind: &str, slots: u32, running: u32) -> WorkerRecord {
        WorkerRecord {
            id: format!("{kind}-{slots}"),
            slots,
            running,
            queues: Vec::new(),
            names: Vec::new(),
            started_ms: 0,
            seen_ms: 0,
            kind: kind.to_owned(),
            name: String::new(),
            held: Vec::new(),
            peer: String::new(),
        }
    }

    /// Two queues' depths and counts add up, the longest wait wins, and
    /// workers are counted by their typed kind.
    #[test]
    fn two_queues_and_their_workers_sum() {
        let mut a = QueueStats {
            ready: 2,
            running: 1,
            oldest_wait: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        a.counts.add(Count::Submitted, 5);
        a.counts.add(Count::Retried, 1);
        let mut b = QueueStats {
            ready: 1,
            dead: 4,
            oldest_wait: Some(Duration::from_secs(9)),
            ..Default::default()
        };
        b.counts.add(Count::Submitted, 2);
        let queues = vec![
            (QueueName::parse("research").unwrap(), a),
            (QueueName::parse("database").unwrap(), b),
        ];
        let workers = [
            worker("builtin", 4, 1),
            worker("stream", 2, 2),
            worker("unary", 1, 0),
            worker("", 3, 0),
        ];
        let m = TaskMetrics::summing(queues, &workers);
        assert_eq!(m.queues.len(), 2);
        assert_eq!((m.totals.ready, m.totals.running, m.totals.dead), (3, 1, 4));
        assert_eq!(m.totals.oldest_wait, Some(Duration::from_secs(9)));
        assert_eq!(m.totals.counts.get(Count::Submitted), 7);
        assert_eq!(m.totals.counts.get(Count::Retried), 1);
        assert_eq!(
            m.workers,
            WorkerFigures {
                live: 4,
                external: 2,
                slots: 10,
                busy: 3
            }
        );
    }

    /// Stored kinds round-trip; an absent or unknown kind is built-in.
    #[test]
    fn worker_kinds_read_their_stored_names() {
        for k in [WorkerKind::Builtin, WorkerKind::Stream, WorkerKind::Unary] {
            assert_eq!(WorkerKind::parse(k.as_str()), k);
        }
        assert_eq!(WorkerKind::parse(""), WorkerKind::Builtin);
        assert_eq!(WorkerKind::parse("later"), WorkerKind::Builtin);
    }
}
