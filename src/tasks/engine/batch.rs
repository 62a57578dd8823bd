//! Batched ends of attempts: group commit of finishes, per queue.
//!
//! A busy pool ends several attempts of a queue at about the same time,
//! and each end is a script call (finish, then lease the next task). Part
//! of a call's cost is fixed (the round trip, koo's wake-ups, the script's
//! prelude and its keys and arguments turned into Lua values), so ends are
//! grouped: [`TaskEngine::end_attempt`] makes its call at once while fewer
//! than [`IN_FLIGHT`] calls of the queue are under way in this process
//! (a lone task is never delayed, and the default four slots never wait);
//! past that, ends wait, and when a call ends, everything waiting goes in
//! one [`crate::store::tasks::TaskBackend::finish_batch`] call (one script
//! on Redis), on a task of its own. Every guarantee is the single
//! finish's, item by item (fencing, one final state, the lease's rules):
//! the script runs each finish as finish.lua would, then each lease as
//! lease.lua would.
//!
//! Measured (`docs/perf/task-path.md`): with 16 slots the ends' script
//! calls fall from 1.2 to 0.55 per task and throughput rises about 5 %;
//! Redis's time in a script is mostly per task, not per call, so batching
//! cannot do much more on one Redis.
//!
//! A task leased for an end whose caller is gone by the time the batch
//! answers is handed back to its queue at once, so that it does not wait
//! for its lease to lapse.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::TaskEngine;
use crate::domain::Outcome;
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::store::tasks::{BatchEnd, FinishItem, Leased};
use crate::store::{Deadline, StoreError};
use crate::tasks::engine::Finish;
use crate::tasks::error::TaskError;

/// Calls of one queue under way at once before ends wait to be batched:
/// as many as the default pool's slots, so that its path is the single
/// call's (batching four slots' ends cost them throughput: fewer calls in
/// flight left Redis idle between them).
const IN_FLIGHT: usize = 4;

/// The most ends one call carries (a script's run blocks Redis for its
/// length: about 50-70 µs an item).
const MAX_ITEMS: usize = 32;

/// What an end's caller gets back: the new state, and the next task when
/// it asked for one.
type Reply = Result<(State, Leased), TaskError>;

/// One attempt's end waiting for its batch.
struct Ask {
    id: TaskId,
    token: u32,
    started_ms: Option<i64>,
    outcome: Outcome,
    log: String,
    /// The worker that holds the attempt (and gets the next task).
    worker: String,
    /// The task names the worker serves, when it asks for the next task.
    next: Option<Vec<String>>,
    deadline: Deadline,
    reply: oneshot::Sender<Reply>,
}

/// Each queue's calls under way and the ends waiting for the next one.
#[derive(Default)]
pub(super) struct Batchers {
    queues: Mutex<HashMap<QueueName, Queue>>,
}

#[derive(Default)]
struct Queue {
    /// Calls of this queue under way (at most [`IN_FLIGHT`]).
    calls: usize,
    /// Ends waiting for a call.
    waiting: Vec<Ask>,
}

impl TaskEngine {
    /// Ends the attempt of `task` that `worker` holds with `token` (as
    /// [`Self::finish`]) and, with `next` (the task names the worker
    /// serves), leases the next task of the queue for it (as
    /// [`Self::finish_and_lease`]):
    /// at once when fewer than [`IN_FLIGHT`] calls of the queue are under
    /// way, else in one batch with the other ends that wait (see the
    /// module's doc).
    pub async fn end_attempt(
        &self,
        task: &Task,
        token: u32,
        worker: &str,
        finish: Finish,
        next: Option<&[&str]>,
        deadline: Deadline,
    ) -> Result<(State, Leased), TaskError> {
        let queue = task.id.queue();
        let answer = {
            let mut queues = self.batchers();
            // the queue's name is cloned once, not on every end
            if !queues.contains_key(&queue) {
                queues.insert(queue.clone(), Queue::default());
            }
            let q = queues.get_mut(&queue).expect("inserted above");
            if q.calls < IN_FLIGHT {
                q.calls += 1;
                None
            } else {
                let (outcome, log) = self.outcome(task, worker, &finish);
                let (reply, answer) = oneshot::channel();
                q.waiting.push(Ask {
                    id: task.id.clone(),
                    token,
                    started_ms: task.started_ms,
                    outcome,
                    log,
                    worker: worker.to_owned(),
                    next: next.map(|names| names.iter().map(|n| (*n).to_owned()).collect()),
                    deadline,
                    reply,
                });
                Some(answer)
            }
        };
        if let Some(answer) = answer {
            return answer.await.unwrap_or_else(|_| {
                Err(TaskError::Store(StoreError::Unavailable(
                    "the batch this end waited for was dropped".into(),
                )))
            });
        }
        // this call is the queue's: the ends that wait meanwhile go next
        let _next_batch = NextBatch {
            engine: self,
            queue: &queue,
        };
        match next {
            Some(names) => {
                self.finish_and_lease(task, token, worker, finish, names, deadline)
                    .await
            }
            None => self
                .finish(task, token, worker, finish, deadline)
                .await
                .map(|state| (state, Leased::Empty)),
        }
    }

    fn batchers(&self) -> std::sync::MutexGuard<'_, HashMap<QueueName, Queue>> {
        self.inner
            .batchers
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A call of `queue` ended: the ends that wait go in one batch, on a
    /// task of its own (their callers wait for it; this one's need not),
    /// which does the same when it ends; with none waiting, the call's
    /// place frees.
    fn call_ended(&self, queue: &QueueName) {
        // outside a runtime (a future dropped after it), nothing can run a
        // batch: the waiting ends are dropped (their callers are told) and
        // the call's place frees
        let runtime = tokio::runtime::Handle::try_current().ok();
        let batch = {
            let mut queues = self.batchers();
            let Some(q) = queues.get_mut(queue) else {
                return;
            };
            if runtime.is_none() {
                q.waiting.clear();
            }
            if q.waiting.is_empty() {
                q.calls = q.calls.saturating_sub(1);
                return;
            }
            let take = q.waiting.len().min(MAX_ITEMS);
            q.waiting.drain(..take).collect::<Vec<_>>()
        };
        let Some(runtime) = runtime else { return };
        let engine = self.clone();
        let queue = queue.clone();
        runtime.spawn(async move {
            let _next_batch = NextBatch {
                engine: &engine,
                queue: &queue,
            };
            engine.end_batch(&queue, batch).await;
        });
    }

    /// One call for `asks`, in groups that serve the same task names.
    async fn end_batch(&self, queue: &QueueName, mut asks: Vec<Ask>) {
        while !asks.is_empty() {
            let names = asks.iter().find_map(|a| a.next.clone());
            let (now, later) = asks.into_iter().partition(|a| match (&a.next, &names) {
                (Some(n), Some(m)) => n == m,
                _ => true,
            });
            self.end_group(queue, now, names.as_deref()).await;
            asks = later;
        }
    }

    /// One `finish_batch` call for `asks`, whose leases serve `names`; each
    /// caller gets its item's answer.
    async fn end_group(&self, queue: &QueueName, asks: Vec<Ask>, names: Option<&[String]>) {
        let names: Vec<&str> = names
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .collect();
        let items: Vec<FinishItem<'_>> = asks
            .iter()
            .map(|a| FinishItem {
                id: &a.id,
                token: a.token,
                outcome: &a.outcome,
                log: &a.log,
                next: a.next.as_ref().map(|_| a.worker.as_str()),
            })
            .collect();
        let deadline = asks.iter().map(|a| a.deadline).min();
        let deadline = deadline.unwrap_or_else(|| Deadline::after(std::time::Duration::ZERO));
        let c = &self.inner.config;
        let store = &self.inner.store;
        let ends = store
            .finish_batch(
                queue,
                &items,
                c.lease,
                &names,
                self.lease_limits(),
                deadline,
            )
            .await;
        drop(items);
        match ends {
            Ok(ends) => {
                for (ask, end) in asks.into_iter().zip(ends) {
                    self.answer(ask, end).await;
                }
            }
            Err(e) => {
                for ask in asks {
                    let _ = ask.reply.send(Err(TaskError::from(e.clone())));
                }
            }
        }
    }

    /// Counts and answers one item; its dependents are released first (as
    /// [`Self::finish`] does before it returns).
    async fn answer(&self, ask: Ask, end: BatchEnd) {
        let BatchEnd { ended, next } = end;
        let worker = Some(ask.worker.as_str());
        let reply = match ended {
            Ok(Some((state, waited_on))) => {
                self.inner
                    .counters
                    .finished_at(ask.id.queue().as_str(), ask.started_ms, state);
                if waited_on {
                    self.release_after_end(&ask.id, state, ask.deadline).await;
                }
                let next = next.unwrap_or(Leased::Empty);
                if let Leased::Task(t) = &next {
                    self.inner.counters.leased(t);
                }
                Ok((state, next))
            }
            Ok(None) => {
                self.hand_back(next, worker, ask.deadline).await;
                Err(TaskError::Fenced(ask.id.clone()))
            }
            Err(e) => {
                self.hand_back(next, worker, ask.deadline).await;
                Err(TaskError::from(e))
            }
        };
        if let Err(Ok((_, next))) = ask.reply.send(reply) {
            // the caller is gone: nobody runs the task it asked for
            self.hand_back(Some(next), worker, ask.deadline).await;
        }
    }

    /// Hands `next`, a task leased for an item that cannot take it, back
    /// to its queue at once.
    pub(super) async fn hand_back(
        &self,
        next: Option<Leased>,
        worker: Option<&str>,
        deadline: Deadline,
    ) {
        let (Some(Leased::Task(task)), Some(worker)) = (next, worker) else {
            return;
        };
        if let Err(e) = self.release(&task, worker, deadline).await {
            tracing::warn!(task = %task.id, error = %e, "cannot hand back a task leased for a slot that is gone; its lease will lapse");
        }
    }
}

/// Calls [`TaskEngine::call_ended`] when a call of its queue ends, however
/// it ends (a caller that stops waiting drops its future mid-call).
struct NextBatch<'a> {
    engine: &'a TaskEngine,
    queue: &'a QueueName,
}

impl Drop for NextBatch<'_> {
    fn drop(&mut self) {
        self.engine.call_ended(self.queue);
    }
}
