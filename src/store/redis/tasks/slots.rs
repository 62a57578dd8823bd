//! What a Redis Cluster changes for the task store, and the submit's
//! optional wait for replicas.
//!
//! Every task script touches the keys of one queue, which share the hash
//! tag `{t:QUEUE}` and so one slot: on a Cluster each runs on its queue's
//! master unchanged. What crosses slots is handled here:
//! - a batch submit (`submit_many`) is one pipeline per queue, run at once,
//!   each task's reply put back in its place;
//! - flow control (rate limits, back-offs, concurrency caps) keeps its keys
//!   in a slot of its own, which a lease reaches in steps: reserve, lease,
//!   give back (`flow_cluster.rs`);
//! - idempotency claims, worker records and dependencies across queues
//!   were already separate calls, each in its own slot (see `registry.rs`
//!   and `crate::tasks::engine`).
//!
//! `KOO_TASK_SUBMIT_WAIT_REPLICAS` (on any topology): a submit is
//! acknowledged only once that many replicas have its write (`WAIT`, in the
//! same round trip), so that a failover cannot lose it. Off (0), a submit
//! sends exactly what it did before.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{FromRedisValue, Script, ScriptInvocation};

use super::RedisTasks;
use crate::domain::task::{QueueName, Task};
use crate::store::redis::call::reply_error;
use crate::store::tasks::TaskLimits;
use crate::store::{Deadline, Result, StoreError};

impl RedisTasks {
    /// Runs a script that stores a task, once; with
    /// `limits.submit_wait_replicas`, followed by `WAIT` in the same round
    /// trip (the script loaded first: a pipeline cannot recover from
    /// NOSCRIPT), and refused as UNAVAILABLE when fewer replicas confirmed.
    pub(super) async fn invoke_submit<T: FromRedisValue>(
        &self,
        script: &Script,
        inv: &ScriptInvocation<'_>,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<T> {
        let replicas = limits.submit_wait_replicas;
        if replicas == 0 {
            return self.store.invoke_once(inv, deadline).await;
        }
        let mut pipe = redis::pipe();
        pipe.load_script(script).ignore();
        pipe.invoke_script(inv);
        let wait = wait_ms(deadline, limits.submit_wait_timeout);
        pipe.cmd("WAIT").arg(replicas).arg(wait);
        let pipe = &pipe;
        let (reply, acked): (T, u32) = self
            .store
            .run_once(
                deadline,
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await?;
        confirmed(acked, replicas)?;
        Ok(reply)
    }

    /// Makes idempotency claims wait for `replicas` as submits do
    /// (`KOO_TASK_SUBMIT_WAIT_REPLICAS`; the engine sets it once): a claim
    /// lives in its own slot, and one lost in a failover after its task
    /// was acknowledged would let a resubmit store a second task.
    pub(crate) fn wait_claims_for(&self, replicas: u32, timeout: Duration) {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.claim_wait.1.store(ms, Ordering::Relaxed);
        self.claim_wait.0.store(replicas, Ordering::Relaxed);
    }

    /// Runs a claim script (safe to repeat); with [`Self::wait_claims_for`]
    /// set, followed by `WAIT` in the same round trip.
    pub(super) async fn invoke_claim<T: FromRedisValue>(
        &self,
        script: &Script,
        inv: &ScriptInvocation<'_>,
        deadline: Deadline,
    ) -> Result<T> {
        let replicas = self.claim_wait.0.load(Ordering::Relaxed);
        if replicas == 0 {
            return self.store.invoke(inv, deadline).await;
        }
        let cap = Duration::from_millis(self.claim_wait.1.load(Ordering::Relaxed));
        let mut pipe = redis::pipe();
        pipe.load_script(script).ignore();
        pipe.invoke_script(inv);
        pipe.cmd("WAIT").arg(replicas).arg(wait_ms(deadline, cap));
        let pipe = &pipe;
        let (reply, acked): (T, u32) = self
            .store
            .run(
                deadline,
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await?;
        confirmed(acked, replicas)?;
        Ok(reply)
    }

    /// `submit_many` on a Cluster: one pipeline per queue (a queue's keys
    /// share one slot), all at once; a pipeline that fails fails its own
    /// tasks only.
    pub(super) async fn submit_per_queue(
        &self,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<Result<()>>> {
        let mut out: Vec<Option<Result<()>>> = vec![None; tasks.len()];
        let mut groups: Vec<(QueueName, Vec<usize>)> = Vec::new();
        for (i, (task, _)) in tasks.iter().enumerate() {
            let queue = task.id.queue();
            match groups.iter_mut().find(|(q, _)| *q == queue) {
                Some((_, members)) => members.push(i),
                None => groups.push((queue, vec![i])),
            }
        }
        let runs = groups.iter().map(|(_, members)| {
            self.submit_pipeline(members.iter().map(|&i| &tasks[i]), limits, deadline)
        });
        let replies = futures::future::join_all(runs).await;
        for ((_, members), reply) in groups.iter().zip(replies) {
            match reply {
                Ok(replies) => {
                    for (&i, r) in members.iter().zip(replies) {
                        out[i] = Some(r);
                    }
                }
                Err(e) => {
                    for &i in members {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Backend("no reply".into()))))
            .collect())
    }

    /// One pipeline of submits (the script loaded first in the same round
    /// trip), then `WAIT` when asked for: each task's reply. On a Cluster
    /// the tasks must share a slot.
    pub(super) async fn submit_pipeline<'t>(
        &self,
        tasks: impl Iterator<Item = &'t (Task, Duration)>,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<Result<()>>> {
        let calls: Vec<_> = tasks
            .map(|(task, delay)| self.submit_call(task, *delay, &[], limits, true))
            .collect();
        let mut pipe = redis::pipe();
        pipe.load_script(self.scripts().submit.script());
        for call in &calls {
            pipe.invoke_script(call.done());
        }
        let replicas = limits.submit_wait_replicas;
        if replicas > 0 {
            let wait = wait_ms(deadline, limits.submit_wait_timeout);
            pipe.cmd("WAIT").arg(replicas).arg(wait);
        }
        pipe.ignore_errors();
        let pipe = &pipe;
        let mut replies: Vec<redis::RedisResult<redis::Value>> = self
            .store
            .run_once(
                deadline,
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await?;
        let unconfirmed = if replicas > 0 {
            let acked = replies
                .pop()
                .and_then(|r| r.ok())
                .and_then(|v| u32::from_redis_value(v).ok())
                .unwrap_or(0);
            confirmed(acked, replicas).err()
        } else {
            None
        };
        Ok(replies
            .into_iter()
            .skip(1)
            .map(|r| {
                r.map(drop)
                    .map_err(|e| reply_error("submit", &e))
                    .and_then(|()| unconfirmed.clone().map_or(Ok(()), Err))
            })
            .collect())
    }
}

/// How long `WAIT` may block: a third of what is left of the call, at
/// most `cap` (`KOO_TASK_SUBMIT_WAIT_TIMEOUT`), at least 1 ms (`WAIT 0`
/// would block for ever).
fn wait_ms(deadline: Deadline, cap: Duration) -> u64 {
    let ms = (deadline.remaining() / 3).min(cap).as_millis();
    u64::try_from(ms).unwrap_or(1).max(1)
}

/// Whether `acked` replicas suffice for `wanted`: else UNAVAILABLE, saying
/// that the write is on the master but may not survive a failover.
fn confirmed(acked: u32, wanted: u32) -> Result<()> {
    if acked >= wanted {
        return Ok(());
    }
    Err(StoreError::Unavailable(format!(
        "the task was stored, but only {acked} of the {wanted} replicas of \
         KOO_TASK_SUBMIT_WAIT_REPLICAS confirmed it in time (a failover now could lose it); \
         resubmit with the same idempotency key to be sure"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait is bounded by the cap and never 0 (which blocks for ever).
    #[test]
    fn waits_are_bounded_and_never_zero() {
        let cap = Duration::from_millis(200);
        assert_eq!(wait_ms(Deadline::after(Duration::from_secs(60)), cap), 200);
        let third = wait_ms(Deadline::after(Duration::from_millis(300)), cap);
        assert!((90..=100).contains(&third), "{third}");
        assert_eq!(wait_ms(Deadline::after(Duration::ZERO), cap), 1);
        assert_eq!(
            wait_ms(Deadline::after(Duration::from_secs(60)), Duration::ZERO),
            1
        );
    }

    /// Fewer replicas than asked for is UNAVAILABLE, naming the setting.
    #[test]
    fn too_few_replicas_is_unavailable() {
        assert!(confirmed(1, 1).is_ok());
        assert!(confirmed(2, 1).is_ok());
        let err = confirmed(0, 1).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(err.to_string().contains("KOO_TASK_SUBMIT_WAIT_REPLICAS"));
    }
}
