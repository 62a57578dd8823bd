//! A submit and the lease that follows it in one pipeline
//! ([`crate::store::tasks::TaskBackend::submit_and_lease`]): a new task
//! handed to an idle worker of this process in the submit's round trip.
//!
//! A pipeline of the two scripts rather than one script made of both:
//! each step stays the script every other caller runs (nothing new to
//! keep in step with `submit.lua` and `lease.lua`), and the pair need not
//! be atomic: the task is stored whatever the lease finds. Both touch only
//! the queue's keys, so on a Cluster they go to the same node.

use std::time::Duration;

use redis::{RedisError, RedisResult, Value};

use super::RedisTasks;
use super::args::{Reserving, lease_args, leased};
use crate::domain::task::{QueueName, Task};
use crate::store::redis::call::reply_error;
use crate::store::redis::script::Invocation;
use crate::store::tasks::TaskBackend as _;
use crate::store::tasks::{
    LeaseAsk, Leased, TaskLimits, lease_answer, submit_many_then_lease_each,
};
use crate::store::{Deadline, Result, StoreError};

impl RedisTasks {
    /// [`crate::store::tasks::TaskBackend::submit_and_lease`] on Redis.
    /// A script Redis does not hold (`NOSCRIPT`: the first call after a
    /// restart or a `SCRIPT FLUSH`) is loaded by the plain call of its
    /// step, made again alone (one more round trip, once).
    pub(super) async fn submit_then_lease(
        &self,
        task: &Task,
        limits: TaskLimits,
        ask: &LeaseAsk<'_>,
        lease_limits: TaskLimits,
        deadline: Deadline,
    ) -> (Result<()>, Option<Leased>) {
        let queue = task.id.queue();
        if self.store.is_cluster()
            && (lease_limits.flow
                || (task.rate_limit_key.is_some() || task.concurrency_key.is_some()))
        {
            // the lease reserves first (`flow_cluster.rs`): a call of its own
            let submitted = self.submit(task, Duration::ZERO, limits, deadline).await;
            let leased = match submitted.is_ok() {
                true => lease_answer(
                    &queue,
                    self.lease_alone(&queue, ask, lease_limits, deadline).await,
                ),
                false => None,
            };
            return (submitted, leased);
        }
        let submit = self.submit_call(task, Duration::ZERO, &[], limits, false);
        let lease = self.lease_call(&queue, ask, lease_limits);
        let mut pipe = redis::pipe();
        pipe.invoke_script(submit.done())
            .invoke_script(lease.done());
        let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
        let replies = self.each_reply(&mut pipe, deadline).await;
        let (submitted, leased_reply) = match replies.map(<[_; 2]>::try_from) {
            Ok(Ok([s, l])) => (s, l),
            Ok(Err(r)) => {
                let e = format!("submit and lease: {} replies for 2 commands", r.len());
                return (Err(StoreError::Backend(e)), None);
            }
            Err(e) => return (Err(e), None),
        };
        // a submit made again alone comes after the pipelined lease, which
        // could not see its task
        let mut again = false;
        let submitted = match submitted {
            Ok(_) => Ok(()),
            Err(e) if no_script(&e) => {
                again = true;
                self.submit(task, Duration::ZERO, limits, deadline).await
            }
            Err(e) => Err(reply_error("submit", &e)),
        };
        let leased = match leased_reply {
            Err(e) if no_script(&e) => None,
            other => lease_answer(
                &queue,
                other
                    .map_err(|e| reply_error("lease", &e))
                    .and_then(|v| leased(v, sent_ms)),
            ),
        };
        // the plain lease (which loads its script) when the pipelined one
        // did not run or could not see the task; only after a stored
        // submit (a failed one's caller hands back what a lease took)
        let look_again = match &leased {
            None => true,
            Some(Leased::Task(_)) => false,
            Some(_) => again,
        };
        let leased = match look_again && submitted.is_ok() {
            true => lease_answer(
                &queue,
                self.lease_alone(&queue, ask, lease_limits, deadline).await,
            ),
            false => leased,
        };
        (submitted, leased)
    }

    /// The plain lease (which loads its script when Redis lacks it).
    async fn lease_alone(
        &self,
        queue: &QueueName,
        ask: &LeaseAsk<'_>,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Leased> {
        let (worker, lease, names) = (ask.worker, ask.lease, ask.names);
        self.lease_or_hold(queue, worker, lease, names, limits, deadline)
            .await
    }
}

impl RedisTasks {
    /// [`crate::store::tasks::TaskBackend::submit_many_and_lease`] on
    /// Redis: one pipeline of both scripts loaded (so that no step meets
    /// `NOSCRIPT`; a batch's few loads cost less than a retried step), the
    /// submits, then the leases. On a Cluster (a batch spans slots) and
    /// with `KOO_TASK_SUBMIT_WAIT_REPLICAS` (its `WAIT` follows the
    /// submits), each step is a call of its own.
    pub(super) async fn submit_many_then_lease(
        &self,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        asks: &[(QueueName, LeaseAsk<'_>)],
        lease_limits: TaskLimits,
        deadline: Deadline,
    ) -> (Result<Vec<Result<()>>>, Vec<Option<Leased>>) {
        if asks.is_empty() || self.store.is_cluster() || limits.submit_wait_replicas > 0 {
            return submit_many_then_lease_each(self, tasks, limits, asks, lease_limits, deadline)
                .await;
        }
        let submits: Vec<_> = tasks
            .iter()
            .map(|(task, delay)| self.submit_call(task, *delay, &[], limits, true))
            .collect();
        let leases: Vec<_> = asks
            .iter()
            .map(|(queue, ask)| self.lease_call(queue, ask, lease_limits))
            .collect();
        let mut pipe = redis::pipe();
        pipe.load_script(self.scripts().submit.script());
        for call in &submits {
            pipe.invoke_script(call.done());
        }
        pipe.load_script(self.scripts().lease.script());
        for call in &leases {
            pipe.invoke_script(call.done());
        }
        let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
        let replies = self.each_reply(&mut pipe, deadline).await;
        let mut replies = match replies {
            Ok(r) if r.len() == tasks.len() + asks.len() + 2 => r.into_iter(),
            Ok(r) => {
                let e = format!(
                    "submit and lease: {} replies for a pipeline of {}",
                    r.len(),
                    tasks.len() + asks.len() + 2
                );
                return (Err(StoreError::Backend(e)), vec![None; asks.len()]);
            }
            Err(e) => return (Err(e), vec![None; asks.len()]),
        };
        let submitted: Vec<Result<()>> = replies
            .by_ref()
            .skip(1)
            .take(tasks.len())
            .map(|r| r.map(drop).map_err(|e| reply_error("submit", &e)))
            .collect();
        let leased = replies
            .skip(1)
            .zip(asks)
            .map(|(r, (queue, _))| {
                let r = r
                    .map_err(|e| reply_error("lease", &e))
                    .and_then(|v| leased(v, sent_ms));
                lease_answer(queue, r)
            })
            .collect();
        (Ok(submitted), leased)
    }
}

impl RedisTasks {
    /// A call of lease.lua on `queue` for `ask` (flow limits `flow`).
    pub(super) fn lease_call(
        &self,
        queue: &QueueName,
        ask: &LeaseAsk<'_>,
        flow: TaskLimits,
    ) -> Invocation<'_> {
        self.lease_call_reserving(queue, ask, flow, Reserving::plain(self.store.is_cluster()))
    }

    /// [`Self::lease_call`] that reserves on a Cluster (`flow_cluster.rs`).
    pub(super) fn lease_call_reserving(
        &self,
        queue: &QueueName,
        ask: &LeaseAsk<'_>,
        flow: TaskLimits,
        reserving: Reserving<'_>,
    ) -> Invocation<'_> {
        let keys = self.keys(queue);
        let mut lease = self.scripts().lease.call(self.clock());
        lease.queue_keys(&keys, None);
        lease_args(
            &mut lease,
            (&self.flow_base, queue),
            &keys,
            (ask, reserving),
            flow,
        );
        lease
    }

    /// Runs `pipe` once (it is not safe to repeat), each command's reply
    /// or error on its own.
    async fn each_reply(
        &self,
        pipe: &mut redis::Pipeline,
        deadline: Deadline,
    ) -> Result<Vec<RedisResult<Value>>> {
        let pipe = &*pipe.ignore_errors();
        self.store
            .run_once(
                deadline,
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await
    }
}

/// Whether Redis answered that it does not hold the script.
fn no_script(e: &RedisError) -> bool {
    e.code() == Some("NOSCRIPT")
}
