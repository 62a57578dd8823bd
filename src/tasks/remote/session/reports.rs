//! A stream worker's reports: progress, and the end of an attempt (with
//! the next task of the same queue on a busy worker's path).

use std::collections::HashMap;

use tokio::sync::mpsc;

use super::super::{Proof, finish_leased, progress_task};
use super::held::Held;
use super::{CALL, Inbound, Outbound, ReplyKind, Session};
use crate::domain::task::{State, Task, TaskId};
use crate::store::Deadline;
use crate::tasks::engine::{Finish, TaskError};
use crate::tasks::poller::Poller;
use crate::tasks::worker::cache_result;

impl Session {
    /// Handles a progress, complete or fail message; `false` when the worker
    /// is gone. The next task is leased with a completion only when the
    /// stream is `open`.
    pub(super) async fn report(
        &self,
        msg: Inbound,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
        names: &[&str],
        poller: &mut Poller,
        open: bool,
    ) -> bool {
        let deadline = Deadline::after(CALL);
        let (id, token, secret, kind, finish) = match msg {
            Inbound::Progress {
                id,
                token,
                secret,
                progress,
            } => {
                let mut proof = Proof::given(&secret);
                if let Ok(task_id) = TaskId::parse(&id)
                    && let Some(h) = held.get_mut(&task_id)
                    && h.task.token == token
                {
                    h.spoken = true;
                    proof = Proof::Stream;
                }
                let outcome =
                    progress_task(&self.engine, &id, token, &progress, proof, deadline).await;
                return match outcome {
                    Ok(()) => true,
                    Err(e) => {
                        let kind = ReplyKind::Progress;
                        out.send(Outbound::Reply {
                            id,
                            kind,
                            outcome: Err(e),
                        })
                        .await
                        .is_ok()
                    }
                };
            }
            Inbound::Complete {
                id,
                token,
                secret,
                result,
            } => {
                let finish = Ok(Finish::Succeeded(result.to_string()));
                (id, token, secret, ReplyKind::Complete, finish)
            }
            Inbound::Fail {
                id,
                token,
                secret,
                failure,
            } => (
                id,
                token,
                secret,
                ReplyKind::Fail,
                failure.into_finish("fail."),
            ),
            Inbound::Heartbeat | Inbound::Invalid(_) => return true,
        };
        let (outcome, next) = self
            .finish_held(
                &id, token, &secret, finish, held, names, poller, deadline, open,
            )
            .await;
        let reply = Outbound::Reply {
            id,
            kind,
            outcome: outcome.map(Some),
        };
        let replied = out.send(reply).await.is_ok();
        // a next task leased with the completion is held even when the
        // worker is gone, so that it is handed back (never started)
        match next {
            Some(task) => self.hand_out(task, held, out).await && replied,
            None => replied,
        }
    }

    /// Ends an attempt the worker reported. A task this session holds is
    /// ended with its lease, and when every other queue is empty the next
    /// task of its queue is leased in the same call (a busy worker's path)
    /// while the stream is `open`; a task the session does not hold is
    /// read first, and ended only with its lease's `secret` (see
    /// [`super::secret`]).
    #[allow(clippy::too_many_arguments)]
    async fn finish_held(
        &self,
        id: &str,
        token: u32,
        secret: &str,
        finish: Result<Finish, TaskError>,
        held: &mut HashMap<TaskId, Held>,
        names: &[&str],
        poller: &mut Poller,
        deadline: Deadline,
        open: bool,
    ) -> (Result<State, TaskError>, Option<Task>) {
        let finish = match finish {
            Ok(f) => f,
            Err(e) => return (Err(e), None),
        };
        let task_id = match TaskId::parse(id) {
            Ok(t) => t,
            Err(e) => return (Err(TaskError::invalid("task_id", e.to_string())), None),
        };
        let Some(h) = held.get(&task_id).filter(|h| h.task.token == token) else {
            let ended = finish_leased(
                &self.engine,
                self.cache.as_ref(),
                id,
                token,
                finish,
                Proof::given(secret),
                deadline,
            )
            .await;
            return (ended, None);
        };
        let task = h.task.clone();
        let finish = cache_result(self.cache.as_ref(), &task, finish).await;
        held.remove(&task_id);
        let q = poller.position(&task.id.queue());
        let chain =
            open && held.len() < self.concurrency && q.is_some_and(|q| poller.others_resting(q));
        let worker = &self.record.id;
        if chain {
            match self
                .engine
                .finish_and_lease(&task, token, worker, finish, names, deadline)
                .await
            {
                Ok((state, next)) => {
                    if next.is_none()
                        && let Some(q) = q
                    {
                        poller.mark_empty(q);
                    }
                    (Ok(state), next)
                }
                Err(e) => (Err(e), None),
            }
        } else {
            (
                self.engine
                    .finish(&task, token, worker, finish, deadline)
                    .await,
                None,
            )
        }
    }
}
