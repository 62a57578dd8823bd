//! The stores' shared hand-off steps (see
//! [`TaskBackend::submit_and_lease`]): a submit and the leases that follow
//! it as separate calls, for a store that cannot put them in one round
//! trip (the embedded store; a Redis Cluster's batches).

use std::time::Duration;

use super::{LeaseAsk, Leased, TaskBackend, TaskLimits};
use crate::domain::task::{QueueName, Task};
use crate::store::{Deadline, Result};

/// [`TaskBackend::submit_and_lease`] in one call per step.
pub(crate) async fn submit_then_lease<B: TaskBackend + ?Sized>(
    backend: &B,
    task: &Task,
    limits: TaskLimits,
    ask: &LeaseAsk<'_>,
    lease_limits: TaskLimits,
    deadline: Deadline,
) -> (Result<()>, Option<Leased>) {
    if let Err(e) = backend.submit(task, Duration::ZERO, limits, deadline).await {
        return (Err(e), None);
    }
    let queue = task.id.queue();
    let leased = lease_after(backend, &queue, ask, lease_limits, deadline).await;
    (Ok(()), leased)
}

/// The lease `ask`ed after a submit, made alone: its answer, or `None`
/// (logged) when it failed.
async fn lease_after<B: TaskBackend + ?Sized>(
    backend: &B,
    queue: &QueueName,
    ask: &LeaseAsk<'_>,
    lease_limits: TaskLimits,
    deadline: Deadline,
) -> Option<Leased> {
    let (worker, lease, names) = (ask.worker, ask.lease, ask.names);
    let leased = backend
        .lease_or_hold(queue, worker, lease, names, lease_limits, deadline)
        .await;
    lease_answer(queue, leased)
}

/// A submit's lease (see [`TaskBackend::submit_and_lease`]): its answer,
/// or `None`, logged, when it failed.
pub(crate) fn lease_answer(queue: &QueueName, leased: Result<Leased>) -> Option<Leased> {
    leased
        .inspect_err(|e| {
            tracing::warn!(queue = %queue, error = %e, "the lease after a submit failed; the worker looks for itself");
        })
        .ok()
}

/// [`TaskBackend::submit_many_and_lease`] in one call per step: the
/// batch, then each lease in turn (none after a failed batch).
pub(crate) async fn submit_many_then_lease_each<B: TaskBackend + ?Sized>(
    backend: &B,
    tasks: &[(Task, Duration)],
    limits: TaskLimits,
    asks: &[(QueueName, LeaseAsk<'_>)],
    lease_limits: TaskLimits,
    deadline: Deadline,
) -> (Result<Vec<Result<()>>>, Vec<Option<Leased>>) {
    let submitted = backend.submit_many(tasks, limits, deadline).await;
    let mut leased = Vec::with_capacity(asks.len());
    for (queue, ask) in asks {
        leased.push(match &submitted {
            Ok(_) => lease_after(backend, queue, ask, lease_limits, deadline).await,
            Err(_) => None,
        });
    }
    (submitted, leased)
}
