//! `GetTaskMetrics` and `WatchTaskMetrics`: the domain's task figures
//! ([`crate::tasks::metrics`]) and this process's stream figures as
//! protobuf, and the shared ticker that takes one snapshot per interval for
//! every watcher.

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::domain::task::QueueName;
use crate::domain::times::{QueueTimes, TimeHistogram};
use crate::domain::{Count, QueueStats};
use crate::pb::tasks::v1 as pb;
use crate::store::Deadline;
use crate::tasks::metrics::TaskMetrics;
use crate::watch::{Hub, Kind as WatchKind, Ticker};

/// The `WatchTaskMetrics` snapshots of `hub`'s engine and streams, each
/// read within `budget` (or its interval, if shorter); stops on `shutdown`.
pub(super) fn ticker(
    hub: Hub,
    budget: Duration,
    shutdown: CancellationToken,
) -> Ticker<Result<pb::WatchTaskMetricsResponse, Status>> {
    Ticker::new(shutdown, move |interval: Duration| {
        let hub = hub.clone();
        let f: futures::future::BoxFuture<'static, _> = Box::pin(async move {
            let deadline = Deadline::after(budget.min(interval));
            let (queues, workers, times_window) = pb_metrics(hub.engine().metrics(deadline).await?);
            Ok(pb::WatchTaskMetricsResponse {
                queues,
                time: Some(prost_types::Timestamp::from(SystemTime::now())),
                workers: Some(workers),
                streams: Some(stream_metrics(&hub)),
                times_window,
            })
        });
        f
    })
}

/// This process's watch streams.
pub(super) fn stream_metrics(hub: &Hub) -> pb::StreamMetrics {
    let f = hub.watchers().figures();
    let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    pb::StreamMetrics {
        watch_task: n(f.by_kind[WatchKind::Task as usize]),
        watch_tasks: n(f.by_kind[WatchKind::Tasks as usize]),
        watch_task_metrics: n(f.by_kind[WatchKind::TaskMetrics as usize]),
        watch_metrics: n(f.by_kind[WatchKind::CacheMetrics as usize]),
        max_watchers: n(f.max),
        queue_readers: n(f.readers),
        events_fanned_out: i64::try_from(f.fanned_out).unwrap_or(i64::MAX),
        watchers_fallen_behind: i64::try_from(f.fell_behind).unwrap_or(i64::MAX),
    }
}

/// The task figures as `GetTaskMetrics` and `WatchTaskMetrics` show them
/// (without the process's stream figures): the queues, the workers, and
/// how far back the times reach.
pub(super) fn pb_metrics(
    m: TaskMetrics,
) -> (
    Vec<pb::QueueMetrics>,
    pb::WorkerMetrics,
    Option<prost_types::Duration>,
) {
    let n = |v: u64| i32::try_from(v).unwrap_or(i32::MAX);
    let workers = pb::WorkerMetrics {
        live: n(m.workers.live),
        external: n(m.workers.external),
        slots: n(m.workers.slots),
        busy: n(m.workers.busy),
    };
    let times_window = m.times.iter().map(|t| t.window).max().map(pb_duration);
    let mut times = m.times.into_iter();
    let queues = m
        .queues
        .into_iter()
        .map(|(queue, s)| queue_metrics(&queue, &s, &times.next().unwrap_or_default()))
        .collect();
    (queues, workers, times_window)
}

/// One queue's figures (and times, when read) as protobuf.
pub(super) fn queue_metrics(
    queue: &QueueName,
    s: &QueueStats,
    times: &QueueTimes,
) -> pb::QueueMetrics {
    let count = |c: Count| s.counts.get(c) as i64;
    let (run, wait) = times.totals();
    pb::QueueMetrics {
        queue: queue.to_string(),
        queued: s.ready as i64,
        scheduled: s.scheduled as i64,
        running: s.running as i64,
        dead_letters: s.dead as i64,
        pending: s.pending as i64,
        oldest_wait: s
            .oldest_wait
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        submitted: count(Count::Submitted),
        succeeded: count(Count::Succeeded),
        failed: count(Count::Failed),
        timed_out: count(Count::TimedOut),
        retried: count(Count::Retried),
        lost: count(Count::Lost),
        run_time: pb_stats(&run),
        wait_time: pb_stats(&wait),
        by_name: times
            .by_name
            .iter()
            .map(|n| pb::TaskNameMetrics {
                name: n.name.clone(),
                run_time: pb_stats(&n.run),
                wait_time: pb_stats(&n.wait),
            })
            .collect(),
        paused: s.paused.is_some(),
    }
}

/// A histogram's figures; `None` when it counted nothing.
fn pb_stats(h: &TimeHistogram) -> Option<pb::DurationStats> {
    h.stats().map(|s| pb::DurationStats {
        count: i64::try_from(s.count).unwrap_or(i64::MAX),
        p50: Some(pb_duration(s.p50)),
        p90: Some(pb_duration(s.p90)),
        p95: Some(pb_duration(s.p95)),
        p99: Some(pb_duration(s.p99)),
        max: Some(pb_duration(s.max)),
        mean: Some(pb_duration(s.mean)),
    })
}

/// Durations here are at most days: always representable.
fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or_default()
}
