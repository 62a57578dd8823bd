//! A stream worker's idle session takes hand-offs as a built-in slot does
//! (`crate::tasks::engine::handoff`): while it has room and its queues have
//! nothing for it, the session waits on the engine's board, so that a
//! submit of this process that finds it there stores its task and leases
//! for this worker in one round trip, instead of waking the session to make
//! a lease call of its own. One place on the board per session, whatever
//! its room: a lone task is what the hand-off speeds up; a burst's further
//! tasks are leased by the fill that the first one's arrival starts.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::held::Held;
use super::{CALL, Outbound, Pace, Session, reports};
use crate::domain::task::{Task, TaskId};
use crate::store::Deadline;
use crate::tasks::engine::{Handed, IdleSlot};

impl Session {
    /// Puts the session on the board when it has `room` and no store
    /// failure's back-off lasts (the fill that just ran found nothing).
    pub(super) fn wait_idle(
        &self,
        pace: &Pace,
        room: bool,
        served: &Arc<[String]>,
    ) -> Option<IdleSlot> {
        (room && pace.backoff_until.is_none()).then(|| {
            self.engine
                .wait_idle(pace.poller.queues(), &self.record.id, served.clone())
        })
    }

    /// Takes what a submit handed the session: the task is held and pushed
    /// to the worker as a leased one would be. Room is checked now: when
    /// the session filled up while on the board (a report's chained lease)
    /// or the identity's other streams took the last of its room, the task
    /// goes back to its queue at once. `false` when the worker is gone (the
    /// task, held, then goes back with the session's others).
    pub(super) async fn take_handed(
        &mut self,
        handed: Option<Handed>,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
        pace: &mut Pace,
    ) -> bool {
        let (queue, leased) = match handed {
            None => return true,
            Some(Handed::Leased { queue, leased }) => (queue, leased),
            Some(Handed::Look(queue)) => {
                // the next fill looks there first
                if let Some(q) = pace.poller.position(&queue) {
                    pace.poller.look_at(q);
                }
                return true;
            }
        };
        let task = match pace.poller.position(&queue) {
            Some(q) => {
                let task = pace.poller.took(q, leased);
                if task.is_some() {
                    pace.poller.leased(q, true);
                }
                task
            }
            None => leased.task(),
        };
        let Some(task) = task else {
            return true;
        };
        // what the session handled while on the board (chained leases)
        // may have filled it, or the identity's other streams its tally
        if held.len() >= self.concurrency || !self.taken.take_one() {
            self.release_unpushed(&task, "a full worker").await;
            return true;
        }
        let push = self.hold(task, held).await;
        pace.dirty = true;
        reports::send_all(out, vec![push]).await
    }

    /// Releases what a submit handed the session as koo stops (never
    /// pushed to the worker): back to its queue, its attempt given back.
    pub(super) async fn hand_back(&self, handed: Option<Handed>) {
        if let Some(task) = handed.and_then(Handed::task) {
            self.release_unpushed(&task, "a worker as koo stops").await;
        }
    }

    /// Releases `task`, handed to the session and never pushed to `to`
    /// (who it was handed to, for the log).
    async fn release_unpushed(&self, task: &Task, to: &str) {
        let worker = self.record.id.as_str();
        if let Err(e) = self
            .engine
            .release(task, worker, Deadline::after(CALL))
            .await
        {
            tracing::warn!(task = %task.id, worker, error = %e, "cannot hand back a task handed to {to}; its lease lapses");
        }
    }
}

/// What a submit hands the session on the board; never, when it is not.
pub(super) async fn next_handed(idle: &mut Option<IdleSlot>) -> Option<Handed> {
    match idle {
        Some(slot) => slot.handed().await,
        None => std::future::pending().await,
    }
}
