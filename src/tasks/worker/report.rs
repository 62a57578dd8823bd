//! How a built-in slot reports the end of an attempt: the result cached
//! first when the task asks for it, then the outcome (with the next lease
//! of the same queue on a busy slot's path).

use crate::store::tasks::Leased;
use std::time::Duration;

use crate::cache::{Cache, CacheError, NewEntry, Value};
use crate::domain::task::{CacheTarget, Task};
use crate::store::{Deadline, StoreError};
use crate::tasks::engine::{Finish, TaskEngine, TaskError};

/// Writes a successful result to the cache when the task asks for it,
/// before the success is reported: a task that reads SUCCEEDED has its
/// value cached. A cache failure fails the attempt (retryably when the cache
/// is unreachable).
pub(crate) async fn cache_result(cache: Option<&Cache>, task: &Task, finish: Finish) -> Finish {
    let (Finish::Succeeded(result), Some(target)) = (
        &finish,
        task.cache_result
            .as_deref()
            .and_then(CacheTarget::from_json),
    ) else {
        return finish;
    };
    let Some(cache) = cache else {
        return Finish::failed(
            "this worker has no cache to write the result to (cache_result needs REDIS_URL)",
            false,
        );
    };
    let entry = NewEntry {
        level: target.level,
        key: target.key,
        value: Value::Json(result.clone()),
        ttl: Some(Duration::from_millis(target.ttl_ms)),
        tags: target.tags,
        soft_ttl: target.soft_ttl_ms.map(Duration::from_millis),
    };
    match cache
        .set(entry, Deadline::after(Duration::from_secs(5)))
        .await
    {
        Ok(_) => finish,
        Err(e) => Finish::failed(
            format!("the result could not be cached: {e}"),
            matches!(
                e,
                CacheError::Store(StoreError::Unavailable(_) | StoreError::DeadlineExceeded)
            ),
        ),
    }
}
/// Reports how an attempt ended and leases the next task of its queue for
/// `worker` (serving `names`) in the same call, grouped with the other ends
/// of the queue under way in this process (see
/// [`TaskEngine::end_attempt`]); the next task, if there is one. Failures
/// are handled as by [`report`].
pub(super) async fn report_and_lease(
    engine: &TaskEngine,
    task: &Task,
    worker: &str,
    finish: Finish,
    names: &[&str],
) -> Leased {
    let deadline = Deadline::after(Duration::from_secs(5));
    match engine
        .end_attempt(task, task.token, worker, finish, Some(names), deadline)
        .await
    {
        Ok((state, next)) => {
            tracing::debug!(task = %task.id, state = state.as_str(), "task attempt ended");
            next
        }
        Err(e) => {
            outcome_not_recorded(task, e);
            Leased::Empty
        }
    }
}

pub(super) fn outcome_not_recorded(task: &Task, e: TaskError) {
    match e {
        TaskError::Fenced(_) => {
            tracing::warn!(task = %task.id, "completion refused: the lease lapsed")
        }
        e => tracing::warn!(
            task = %task.id,
            error = %e,
            "cannot report the outcome; the lease will lapse and the task run again"
        ),
    }
}

/// Reports how an attempt ended. A refusal means the lease lapsed and the
/// new holder owns the outcome; any other failure leaves the lease to lapse,
/// and the task runs again.
pub(super) async fn report(engine: &TaskEngine, task: &Task, worker: &str, finish: Finish) {
    let deadline = Deadline::after(Duration::from_secs(5));
    match engine
        .end_attempt(task, task.token, worker, finish, None, deadline)
        .await
    {
        Ok((state, _)) => {
            tracing::debug!(task = %task.id, state = state.as_str(), "task attempt ended")
        }
        Err(e) => outcome_not_recorded(task, e),
    }
}
