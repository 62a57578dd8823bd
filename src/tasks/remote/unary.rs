//! Unary leasing (`LeaseTask`): one task for a caller that may wait for
//! it, grpcurl's and scripts' way of working.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{CALL, MAX_WAIT, Routing, check_name, secret};
use crate::domain::task::Task;
use crate::store::Deadline;
use crate::store::tasks::{Leased, WorkerRecord};
use crate::tasks::engine::{Handed, IdleSlot, TaskEngine, TaskError};
use crate::tasks::poller::Poller;

/// Leases one task for a unary caller, waiting up to `wait` (at most
/// [`MAX_WAIT`]) for one to come; `None` when none came or `stop` fired.
pub async fn lease_once(
    engine: &TaskEngine,
    worker: &str,
    routing: &Routing,
    wait: Duration,
    stop: &CancellationToken,
) -> Result<Option<Task>, TaskError> {
    check_name("worker_name", worker)?;
    if secret::is_stream_worker(worker) {
        return Err(TaskError::invalid(
            "worker_name",
            format!(
                "{} ends with `/` and 12 hex digits, the shape koo reserves for Work stream worker ids",
                crate::quote::quote(worker)
            ),
        ));
    }
    if wait > MAX_WAIT {
        return Err(TaskError::invalid(
            "wait",
            format!("at most {}", humantime::format_duration(MAX_WAIT)),
        ));
    }
    let config = engine.config();
    let record = unary_record(worker, routing);
    // A unary caller is listed for ten leases after its last lease call:
    // between calls it may be busy running what it leased.
    if let Err(e) = engine
        .store()
        .announce_worker(&record, config.lease * 10, Deadline::after(CALL))
        .await
    {
        tracing::debug!(error = %e, "cannot announce a unary worker");
    }
    let until = Instant::now() + wait;
    let names = routing.filter();
    let served: Arc<[String]> = routing.names.clone().into();
    // One call, so no rotation carried over and no queue resting: every
    // round asks every queue, in order.
    let mut poller = Poller::new(
        routing.queues.clone(),
        config.poll_interval,
        0,
        engine.submits(),
    );
    loop {
        // the next round comes after a poll interval, or sooner when a
        // rate limit holding a queue frees a token before
        let mut next = config.poll_interval;
        for (q, _) in poller.order() {
            let queue = &poller.queues()[q];
            match engine
                .lease_or_hold(queue, worker, &names, Deadline::after(CALL))
                .await?
            {
                Leased::Task(task) => return Ok(Some(*task)),
                Leased::Held(Some(at_ms)) => next = next.min(time_until(at_ms)),
                Leased::Held(None) | Leased::Empty => {}
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stop.is_cancelled() {
            return Ok(None);
        }
        let idle = engine.wait_idle(&routing.queues, worker, served.clone());
        if let Some(task) = wait_idle(idle, &mut poller, left.min(next), stop).await {
            return Ok(Some(task));
        }
        if stop.is_cancelled() {
            return Ok(None);
        }
    }
}

/// A unary caller's wait between its lease rounds, up to `max`, on the
/// board as an idle slot waits (`idle`): a submit of this process hands it
/// its task in the submit's own round trip, and this process arms the
/// queues for other processes' wakes. The task a submit handed, if any (it
/// is this caller's, even as koo stops).
async fn wait_idle(
    mut idle: IdleSlot,
    poller: &mut Poller,
    max: Duration,
    stop: &CancellationToken,
) -> Option<Task> {
    let handed = tokio::select! {
        handed = idle.handed() => Some(handed),
        _ = stop.cancelled() => None,
        () = poller.wait(max) => None,
    };
    // off the board; what a submit handed meanwhile is taken now
    let handed = match handed {
        Some(handed) => handed,
        None => idle.leave().await,
    };
    handed.and_then(Handed::task)
}

/// The presence record of unary worker `worker`.
fn unary_record(worker: &str, routing: &Routing) -> WorkerRecord {
    WorkerRecord {
        id: format!("unary:{worker}"),
        slots: 1,
        running: 0,
        queues: routing.queues.iter().map(|q| q.to_string()).collect(),
        names: routing.names(),
        started_ms: crate::store::unix_millis(SystemTime::now()),
        seen_ms: crate::store::unix_millis(SystemTime::now()),
        kind: "unary".to_owned(),
        name: worker.to_owned(),
        held: Vec::new(),
        peer: String::new(),
    }
}

/// How long from now until `at_ms` (ms since the epoch), at least a
/// millisecond: a held queue's token frees then.
fn time_until(at_ms: i64) -> Duration {
    let now_ms = crate::store::unix_millis(std::time::SystemTime::now());
    Duration::from_millis(at_ms.saturating_sub(now_ms).max(1) as u64)
}
