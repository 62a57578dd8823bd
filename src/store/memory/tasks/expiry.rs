//! Expiry on the embedded store: a waiting task past its `expire_ms` ends
//! CANCELLED ("cancelled: expired") instead of running late, as
//! `end_expired` and the expiring set do on Redis (`lib.lua`,
//! `recover.lua`, `lease.lua`); see `TaskBackend`'s "Expiry".

use super::state::{BATCH, Tasks, millis, push_event};
use crate::domain::task::{QueueName, State};
use crate::domain::{Count, Outcome};
use crate::store::tasks::TaskLimits;

/// The error a task that expired ends with: the cancel's form.
fn expired_error() -> String {
    serde_json::json!({ "message": "cancelled: expired", "retryable": false }).to_string()
}

/// A finish's outcome after the task's expiry: a retry that would start at
/// or past it would wait for nothing, so it ends CANCELLED ("cancelled:
/// expired") now.
pub(super) fn expire_retry(outcome: Outcome, expire_ms: Option<i64>, now: i64) -> Outcome {
    match outcome {
        Outcome::Retry { delay, .. }
            if expire_ms.is_some_and(|at| now.saturating_add(millis(delay)) >= at) =>
        {
            Outcome::Cancelled(expired_error())
        }
        other => other,
    }
}

impl Tasks {
    /// Ends waiting task `id` of `queue` as expired: out of its waiting
    /// set and the expiring set, CANCELLED, counted and ended as a cancel
    /// (its dependents are released as it ends). A task not waiting is
    /// left alone: one that started in time is never stopped by expiry.
    pub(super) fn end_expired(
        &mut self,
        queue: &QueueName,
        id: &str,
        limits: TaskLimits,
        now: i64,
    ) -> bool {
        self.end_waiting(queue, id, "cancelled: expired".to_owned(), limits, now)
    }

    /// Ends waiting task `id` of `queue` CANCELLED with error `message`,
    /// as never run (an expiry, or a cap's `cancel_newest`): see
    /// [`Self::end_expired`].
    pub(super) fn end_waiting(
        &mut self,
        queue: &QueueName,
        id: &str,
        message: String,
        limits: TaskLimits,
        now: i64,
    ) -> bool {
        let q = self.queues.entry(queue.clone()).or_default();
        q.expiring.remove(id);
        let Some(e) = self.tasks.get_mut(id).filter(|e| {
            matches!(
                e.task.state,
                State::Queued | State::Scheduled | State::Pending
            )
        }) else {
            return false;
        };
        q.ready.remove(id);
        q.scheduled.remove(id);
        q.pending.remove(id);
        e.task.state = State::Cancelled;
        e.task.finished_ms = Some(now);
        e.task.error =
            Some(serde_json::json!({ "message": message, "retryable": false }).to_string());
        q.count(Count::Cancelled);
        push_event(q, &mut self.last_event, limits, &e.task, None, now);
        self.end(queue, id, limits, now, false);
        true
    }

    /// The sweep's part: ends up to [`BATCH`] waiting tasks of `queue`
    /// whose expiry has passed (an entry of a task that started or ended
    /// is only dropped), then releases their dependents.
    pub(super) fn sweep_expired(&mut self, queue: &QueueName, limits: TaskLimits, now: i64) -> u64 {
        let due = self
            .queues
            .get(queue)
            .map(|q| q.expiring.up_to(now, BATCH))
            .unwrap_or_default();
        // as on Redis, where the engine releases dependents after the call:
        // a dependent that expires in the same batch ends "expired" too
        self.deferring_releases(limits, now, |s| {
            due.iter()
                .filter(|id| s.end_expired(queue, id, limits, now))
                .count() as u64
        })
    }
}
