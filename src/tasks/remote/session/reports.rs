//! A stream worker's reports: progress, and the ends of attempts (with
//! the next task of the same queue on a busy worker's path).
//!
//! Outcomes are ended in two steps: [`Session::plan`] settles, without
//! waiting, what each one needs (the held task leaves `held`, and whether
//! the next task of its queue is leased in the same store call), and
//! [`Session::end`] makes the store calls. A batch's run of outcomes is
//! planned one by one and then ended concurrently: a worker that finishes
//! several tasks at once waits for one store round trip, not several.

use crate::store::tasks::Leased;
use std::collections::HashMap;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::super::{Ending, Proof, back_off_key, check_key_backoff, finish_leased, progress_task};
use super::held::Held;
use super::{CALL, Inbound, Outbound, ReplyKind, Session};
use crate::domain::task::{State, Task, TaskId};
use crate::store::Deadline;
use crate::tasks::engine::{Finish, TaskError};
use crate::tasks::poller::Poller;
use crate::tasks::worker::cache_result;

/// Store calls of one batch's outcomes in flight at once.
const STORE_CALLS: usize = 64;

/// How one reported outcome ends.
enum Plan {
    /// A task this session holds (already out of `held`): ended with its
    /// lease; `chain` is the poller position of its queue when the next
    /// task of that queue is leased in the same call.
    Held {
        task: Box<Task>,
        token: u32,
        ending: Ending,
        chain: Option<usize>,
    },
    /// A task the session does not hold: read first, and ended only with
    /// its lease's secret (see [`super::super::secret`]).
    Foreign {
        token: u32,
        secret: String,
        ending: Ending,
    },
    /// Refused before any store call.
    Refused(TaskError),
}

/// What ending a planned outcome gave: the reply's outcome, the next task
/// leased with it, and the queue that lease found empty or held (until
/// when, if a time frees it: see [`Poller::mark_held`]).
struct Ended {
    outcome: Result<State, TaskError>,
    next: Option<Task>,
    empty: Option<(usize, Option<i64>)>,
}

impl Session {
    /// Records a progress report; `false` when the worker is gone (a
    /// refused report is answered with a reply).
    pub(super) async fn progress(
        &self,
        msg: Inbound,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
    ) -> bool {
        let Inbound::Progress {
            id,
            token,
            secret,
            progress,
        } = msg
        else {
            return true;
        };
        let mut proof = Proof::given(&secret);
        if let Ok(task_id) = TaskId::parse(&id)
            && let Some(h) = held.get_mut(&task_id)
            && h.task.token == token
        {
            h.spoken = true;
            proof = Proof::Stream;
        }
        let deadline = Deadline::after(CALL);
        match progress_task(&self.engine, &id, token, &progress, proof, deadline).await {
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
        }
    }

    /// Ends the attempts a run of complete and fail messages reported, and
    /// answers each with a reply (in order, each followed by the next task
    /// leased with it); `false` when the worker is gone. The next tasks are
    /// leased with the completions only while the stream is `open`.
    pub(super) async fn outcomes(
        &self,
        msgs: Vec<Inbound>,
        held: &mut HashMap<TaskId, Held>,
        out: &mpsc::Sender<Outbound>,
        names: &[&str],
        poller: &mut Poller,
        open: bool,
    ) -> bool {
        let deadline = Deadline::after(CALL);
        let planned: Vec<(String, ReplyKind, Plan)> = msgs
            .into_iter()
            .filter_map(|m| self.plan(m, held, poller, open))
            .collect();
        let one = planned.len() == 1;
        let ends = planned.into_iter().map(|(id, kind, plan)| async move {
            let ended = self.end(plan, &id, names, deadline).await;
            (id, kind, ended)
        });
        // one outcome (a worker sending them one by one): no stream's
        // bookkeeping on the busy path; a batch's store calls overlap, at
        // most STORE_CALLS at once
        let ended: Vec<_> = if one {
            futures::future::join_all(ends).await
        } else {
            futures::stream::iter(ends)
                .buffered(STORE_CALLS)
                .collect()
                .await
        };
        // the replies first, then the next tasks leased with them, all in
        // one message to a worker that accepts batches: a task ended in
        // this run and leased again by another of its completions must
        // not reach the worker before the reply to its last attempt; a
        // next task is held even when the worker is gone, so that it is
        // handed back (never started)
        let mut messages = Vec::with_capacity(2 * ended.len());
        let mut next = Vec::new();
        for (id, kind, ended) in ended {
            if let Some((q, until)) = ended.empty {
                poller.mark_held(q, until);
            }
            let outcome = ended.outcome.map(Some);
            messages.push(Outbound::Reply { id, kind, outcome });
            next.extend(ended.next);
        }
        for task in next {
            messages.push(self.hold(task, held).await);
        }
        send_all(out, messages).await
    }

    /// Settles how a complete or fail message ends its attempt, without
    /// waiting: a held task leaves `held` now, and when every other queue
    /// is empty and the stream is `open` the next task of its queue is to
    /// be leased in the same call (a busy worker's path).
    fn plan(
        &self,
        msg: Inbound,
        held: &mut HashMap<TaskId, Held>,
        poller: &Poller,
        open: bool,
    ) -> Option<(String, ReplyKind, Plan)> {
        let (id, token, secret, kind, finish) = match msg {
            Inbound::Complete {
                id,
                token,
                secret,
                result,
            } => {
                let finish = Ok(Finish::Succeeded(result.to_string()).into());
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
                failure.into_ending("fail."),
            ),
            _ => return None,
        };
        let ending: Ending = match finish {
            Ok(f) => f,
            Err(e) => return Some((id, kind, Plan::Refused(e))),
        };
        let task_id = match TaskId::parse(&id) {
            Ok(t) => t,
            Err(e) => {
                let e = TaskError::invalid("task_id", e.to_string());
                return Some((id, kind, Plan::Refused(e)));
            }
        };
        if let Some(h) = held.get(&task_id)
            && h.task.token == token
            && let Err(e) = check_key_backoff(&h.task, ending.key_backoff, "fail.")
        {
            // refused before anything is recorded: the task stays held
            return Some((id, kind, Plan::Refused(e)));
        }
        let plan = match held.remove(&task_id) {
            Some(h) if h.task.token == token => {
                let q = poller.position(&h.task.id.queue());
                let chain = (open && held.len() < self.concurrency)
                    .then_some(q)
                    .flatten()
                    .filter(|&q| poller.others_resting(q));
                Plan::Held {
                    task: Box::new(h.task),
                    token,
                    ending,
                    chain,
                }
            }
            other => {
                // an older lease of a task held again: it stays held
                if let Some(h) = other {
                    held.insert(task_id, h);
                }
                Plan::Foreign {
                    token,
                    secret,
                    ending,
                }
            }
        };
        Some((id, kind, plan))
    }

    /// Makes the store calls a planned outcome needs.
    async fn end(&self, plan: Plan, id: &str, names: &[&str], deadline: Deadline) -> Ended {
        let (task, token, ending, chain) = match plan {
            Plan::Refused(e) => return Ended::only(Err(e)),
            Plan::Foreign {
                token,
                secret,
                ending,
            } => {
                let proof = Proof::given(&secret);
                let cache = self.cache.as_ref();
                return Ended::only(
                    finish_leased(&self.engine, cache, id, token, ending, proof, deadline).await,
                );
            }
            Plan::Held {
                task,
                token,
                ending,
                chain,
            } => (task, token, ending, chain),
        };
        if let Err(e) = back_off_key(&self.engine, &task, ending.key_backoff, deadline).await {
            return Ended::only(Err(e));
        }
        let finish = cache_result(self.cache.as_ref(), &task, ending.finish).await;
        let worker = &self.record.id;
        // the report's span (exported traces only), ended when this returns
        let outcome = match &finish {
            Finish::Succeeded(_) => "succeeded",
            Finish::Failed { .. } => "failed",
            Finish::TimedOut => "timed_out",
        };
        let _span = crate::trace::run::report(&task, worker, outcome);
        let Some(q) = chain else {
            let ended = self
                .engine
                .finish(&task, token, worker, finish, deadline)
                .await;
            return Ended::only(ended);
        };
        match self
            .engine
            .finish_and_lease(&task, token, worker, finish, names, deadline)
            .await
        {
            Ok((state, leased)) => {
                let empty = match &leased {
                    Leased::Task(_) => None,
                    Leased::Empty => Some((q, None)),
                    Leased::Held(until) => Some((q, *until)),
                };
                Ended {
                    outcome: Ok(state),
                    empty,
                    next: leased.task(),
                }
            }
            Err(e) => Ended::only(Err(e)),
        }
    }
}

/// Sends `messages` as one batch (a lone message as itself); `false` when
/// the worker is gone.
pub(super) async fn send_all(out: &mpsc::Sender<Outbound>, mut messages: Vec<Outbound>) -> bool {
    let message = match messages.len() {
        0 => return true,
        1 => messages.pop().expect("one"),
        _ => Outbound::Batch(messages),
    };
    out.send(message).await.is_ok()
}

impl Ended {
    fn only(outcome: Result<State, TaskError>) -> Self {
        Self {
            outcome,
            next: None,
            empty: None,
        }
    }
}
