//! What a session does for the tasks it holds: pushes them, extends their
//! leases on the worker's heartbeats, fires their timers, and records the
//! worker's presence; passes cancels on and revokes what lapsed.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::held::Held;
use super::{CALL, Outbound, Session};
use crate::domain::task::{State, Task, TaskId};
use crate::store::Deadline;
use crate::tasks::engine::{CancelAsked, Finish, TaskError};

impl Session {
    /// Holds a leased task (its timers start) and makes the message that
    /// pushes it to the worker, for the caller to send (alone or in a
    /// batch). From here the task is the session's: a worker gone before
    /// the message goes out gets it handed back with the others.
    pub(super) async fn hold(&self, task: Task, held: &mut HashMap<TaskId, Held>) -> Outbound {
        let now = Instant::now();
        let after = |ms: u64| (ms > 0).then(|| now + Duration::from_millis(ms));
        let h = Held {
            soft_at: after(task.soft_ms),
            hard_at: after(task.hard_ms),
            cancel_at: None,
            pushed_at: now,
            spoken: false,
            task: task.clone(),
        };
        held.insert(task.id.clone(), h);
        // The signer is read once per process; without it the stream still
        // works (its own reports need no secret).
        let secret = match self.engine.lease_secret(&task, Deadline::after(CALL)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "cannot compute a lease secret; the task is pushed without one");
                String::new()
            }
        };
        let task = Box::new(task);
        Outbound::Task { task, secret }
    }

    /// Extends every held lease; passes on cancels and revokes lost leases.
    pub(super) async fn beat(
        &self,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
    ) -> bool {
        let deadline = Deadline::after(CALL);
        let beats = futures::future::join_all(held.iter().map(|(id, h)| async move {
            (
                id.clone(),
                self.engine.heartbeat(id, h.task.token, deadline).await,
            )
        }))
        .await;
        let grace = self.engine.config().cancel_grace;
        for (id, beat) in beats {
            let message = match beat {
                Ok(None) => continue,
                // a cancel made through another koo process on this store
                Ok(Some(reason)) => match held.get_mut(&id) {
                    Some(h) if h.cancel_at.is_none() => {
                        h.cancel_at = Some(Instant::now() + grace);
                        Outbound::Cancel { id, reason }
                    }
                    _ => continue,
                },
                Err(TaskError::Fenced(_)) => {
                    held.remove(&id);
                    Outbound::Revoked {
                        id,
                        reason: "the lease lapsed, the task ended, or a re-attaching stream took it over".to_owned(),
                    }
                }
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "heartbeat for an external worker failed; will retry");
                    continue;
                }
            };
            if out.send(message).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Fires the held tasks' due timers: soft-limit notices, and koo's own
    /// end of tasks past their hard limit or their cancel grace.
    pub(super) async fn fire_timers(
        &self,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
    ) -> bool {
        let now = Instant::now();
        let due: Vec<TaskId> = held
            .iter()
            .filter(|(_, h)| h.next_timer().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(h) = held.get_mut(&id) else { continue };
            let (finish, reason) = if h.hard_at.is_some_and(|t| t <= now) {
                (
                    Finish::TimedOut,
                    "hard time limit reached: the task ended TIMED_OUT",
                )
            } else if h.cancel_at.is_some_and(|t| t <= now) {
                (
                    Finish::failed("the worker did not stop within the cancel grace", false),
                    "the task was cancelled and did not stop within the cancel grace",
                )
            } else {
                h.soft_at = None;
                if out.send(Outbound::SoftLimit(id)).await.is_err() {
                    return false;
                }
                continue;
            };
            let Some(h) = held.remove(&id) else { continue };
            match self
                .engine
                .finish(
                    &h.task,
                    h.task.token,
                    &self.record.id,
                    finish,
                    Deadline::after(CALL),
                )
                .await
            {
                Ok(_) | Err(TaskError::Fenced(_)) => {}
                // the lease lapses and the sweep ends the task
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "cannot end an external worker's task")
                }
            }
            let reason = reason.to_owned();
            if out.send(Outbound::Revoked { id, reason }).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Records this worker as alive, with what it holds.
    pub(super) async fn announce(&mut self, held: &HashMap<TaskId, Held>, last_beat: Instant) {
        let record = &mut self.record;
        record.running = held.len() as u32;
        record.held = held.keys().map(|id| id.to_string()).collect();
        record.held.sort();
        record.seen_ms = crate::store::unix_millis(SystemTime::now())
            - i64::try_from(last_beat.elapsed().as_millis()).unwrap_or(i64::MAX);
        let lease = self.engine.config().lease;
        if let Err(e) = self
            .engine
            .store()
            .announce_worker(record, lease, Deadline::after(CALL))
            .await
        {
            tracing::debug!(error = %e, "cannot announce an external worker");
        }
    }
}

impl Session {
    /// A task handed back by the worker (it is stopping): queued again at
    /// once, its attempt given back, as at koo's own shutdown. Past
    /// [`super::MAX_GIVEN_BACK`] give-backs the attempt is counted instead,
    /// so that a task that always stops its worker reaches its dead letter.
    /// Answered with a reply; `false` when the worker is gone.
    pub(super) async fn release(
        &self,
        msg: super::Inbound,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
    ) -> bool {
        let super::Inbound::Release { id, token, reason } = msg else {
            return true;
        };
        let outcome = match TaskId::parse(&id) {
            Err(e) => Err(TaskError::invalid("release.task_id", e.to_string())),
            Ok(task_id) => match held.remove(&task_id) {
                Some(h) if h.task.token == token => match self.give_released(&h, &reason).await {
                    Ok(state) => Ok(Some(state)),
                    Err(e @ TaskError::Fenced(_)) => Err(e),
                    // the store did not answer: still held (and heartbeated);
                    // the worker may send it again, or the stream's end
                    // hands it back
                    Err(e) => {
                        held.insert(task_id, h);
                        Err(e)
                    }
                },
                // not this stream's (or not with this token): left alone
                other => {
                    if let Some(h) = other {
                        held.insert(task_id.clone(), h);
                    }
                    Err(TaskError::Fenced(task_id))
                }
            },
        };
        out.send(Outbound::Reply {
            id,
            kind: super::ReplyKind::Release,
            outcome,
        })
        .await
        .is_ok()
    }
    /// Gives a released task back; the state it moved to. A task whose
    /// cancel was passed on ends CANCELLED instead (it must not run again),
    /// and past the give-backs allowed the attempt is counted as a lapsed
    /// lease's would be (which may end the task: its state is read back).
    async fn give_released(&self, h: &Held, reason: &str) -> Result<State, TaskError> {
        let deadline = Deadline::after(CALL);
        let worker = self.record.id.as_str();
        let counted = h.task.given_back() >= super::MAX_GIVEN_BACK;
        tracing::info!(task = %h.task.id, worker, reason, counted, "a worker hands a task back");
        let (task, token) = (&h.task, h.task.token);
        if h.cancel_at.is_some() {
            // with a cancel asked for, a failed end is CANCELLED
            let stopped = Finish::failed("cancelled: the worker stopped before it ended", false);
            return self
                .engine
                .finish(task, token, worker, stopped, deadline)
                .await;
        }
        if !super::held::hand_back(&self.engine, task, worker, deadline).await? {
            return Ok(State::Queued);
        }
        Ok(self.engine.get(task.id.as_str(), deadline).await?.state)
    }
}

/// Passes on a cancel asked for through this process, for a task the
/// stream holds; `false` when the worker is gone.
pub(super) async fn pass_cancel(
    asked: CancelAsked,
    held: &mut HashMap<TaskId, Held>,
    out: &mpsc::Sender<Outbound>,
    grace: Duration,
) -> bool {
    let Some(h) = held.get_mut(&asked.id) else {
        return true;
    };
    if h.cancel_at.is_some() {
        return true;
    }
    h.cancel_at = Some(Instant::now() + grace);
    let (id, reason) = (asked.id, asked.reason.to_string());
    out.send(Outbound::Cancel { id, reason }).await.is_ok()
}

/// Tells a worker silent for a whole lease that every lease it held has
/// lapsed; `false` when it is gone.
pub(super) async fn revoke_all(
    held: &mut HashMap<TaskId, Held>,
    out: &mpsc::Sender<Outbound>,
) -> bool {
    for (id, _) in held.drain() {
        let reason = "no heartbeat for a whole lease: the lease lapsed".to_owned();
        if out.send(Outbound::Revoked { id, reason }).await.is_err() {
            return false;
        }
    }
    true
}
