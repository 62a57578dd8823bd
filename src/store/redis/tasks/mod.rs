//! Task transitions on Redis: [`RedisTasks`] implements [`TaskBackend`]
//! (where each transition is specified) with one Lua script per transition
//! (`lua/tasks/*.lua`, declared in `scripts.rs`), each checking state and
//! fencing token before it writes and appending its event, all on the keys
//! of one queue (one Redis Cluster slot). Times come from Redis's own clock
//! inside the scripts (plus the store clock's offset, zero but in tests),
//! so koo instances with skewed clocks still agree on when a lease lapses.
//!
//! Reads live in `reads.rs` (run and wait times in `times.rs`), the event
//! stream in `events.rs`, worker
//! records, the lease key and idempotency claims in `registry.rs`, the
//! arguments and replies of the lease and finish scripts in `args.rs`, the
//! ends of an attempt in `ends.rs`, and flow control on a Redis Cluster
//! (reserve, lease, give back) in `flow_cluster.rs`.

mod args;
mod batch;
mod beat;
mod cap_repair;
mod debounce;
mod ends;
mod events;
mod flow;
mod flow_cluster;
mod handoff;
mod invoke;
mod reads;
mod registry;
mod scripts;
mod slots;
mod tally;
mod times;
mod wake;

pub use events::StreamReader;
pub(crate) use scripts::TaskScripts;
pub use wake::{SubmitWatch, Woken};

use args::leased;

use std::any::Any;
use std::time::Duration;

use tracing::instrument;

use super::RedisStore;
use super::script::{ClockArg, Key};
use crate::domain::flow::{Limit, LimitState};
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::domain::times::QueueTimes;
use crate::domain::{Outcome, Pause, QueueStats};
use crate::keys::QueueKeys;
use crate::store::clock::Clock;
use crate::store::tasks::{
    BatchEnd, Beat, CancelReply, DebounceReply, DependReply, EventReader, FinishItem, LeaseAsk,
    Leased, Recovered, RetryReply, TakeOver, TaskBackend, TaskLimits, Trimmed, WorkerRecord,
};
use crate::store::{Deadline, Result};

/// The task store on Redis: the pool, the key prefix, and the clock whose
/// offset every script adds to Redis's `TIME`.
pub struct RedisTasks {
    store: RedisStore,
    prefix: String,
    /// Flow control's keys' base, `{prefix}:v1:` (`{prefix}:v1:{fc}:` on a
    /// Cluster; each lease passes it).
    flow_base: String,
    /// On a Cluster, the candidate each queue's last lease stopped at
    /// (`flow_cluster.rs`).
    heads: flow_cluster::Heads,
    /// On a Cluster, the candidates this process's leases are reserving.
    in_flight: flow_cluster::InFlight,
    clock: Clock,
    /// The run and wait times ended here since the last flush.
    tally: tally::Tally,
    /// Replicas an idempotency claim waits for, and for how long (ms; see
    /// `slots.rs`).
    claim_wait: (std::sync::atomic::AtomicU32, std::sync::atomic::AtomicU64),
    /// This Redis refused the heartbeat's script flags (before 7.0): the
    /// unflagged heartbeat is used, which fails while Redis is full.
    flagless: std::sync::atomic::AtomicBool,
}

impl RedisTasks {
    /// Tasks on `store` under `prefix`, on `clock`.
    pub fn new(store: RedisStore, prefix: &str, clock: Clock) -> Self {
        let flow_base = match store.is_cluster() {
            true => crate::keys::flow_base_cluster(prefix),
            false => crate::keys::flow_base(prefix),
        };
        Self {
            store,
            prefix: prefix.to_owned(),
            flow_base,
            heads: flow_cluster::Heads::default(),
            in_flight: flow_cluster::InFlight::default(),
            clock,
            tally: tally::Tally::default(),
            claim_wait: (0.into(), 0.into()),
            flagless: false.into(),
        }
    }

    /// The pool and key prefix.
    pub fn parts(&self) -> (&RedisStore, &str) {
        (&self.store, &self.prefix)
    }

    fn keys(&self, queue: &QueueName) -> QueueKeys {
        QueueKeys::new(&self.prefix, queue)
    }

    fn scripts(&self) -> &TaskScripts {
        &self.store.inner.tasks
    }

    fn clock(&self) -> ClockArg {
        ClockArg::of(&self.clock)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait::async_trait]
impl TaskBackend for RedisTasks {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn is_shared(&self) -> bool {
        true
    }

    #[instrument(skip_all, level = "debug", fields(task = %task.id))]
    async fn submit(
        &self,
        task: &Task,
        delay: Duration,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()> {
        let call = self.submit_call(task, delay, &[], limits, true);
        let script = self.scripts().submit.script();
        self.invoke_submit::<i64>(script, call.done(), limits, deadline)
            .await
            .map(drop)
    }

    #[instrument(skip_all, level = "debug", fields(task = %task.id))]
    async fn submit_and_lease(
        &self,
        task: &Task,
        limits: TaskLimits,
        ask: &LeaseAsk<'_>,
        lease_limits: TaskLimits,
        deadline: Deadline,
    ) -> (Result<()>, Option<Leased>) {
        self.submit_then_lease(task, limits, ask, lease_limits, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(tasks = tasks.len(), asks = asks.len()))]
    async fn submit_many_and_lease(
        &self,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        asks: &[(QueueName, LeaseAsk<'_>)],
        lease_limits: TaskLimits,
        deadline: Deadline,
    ) -> (Result<Vec<Result<()>>>, Vec<Option<Leased>>) {
        self.submit_many_then_lease(tasks, limits, asks, lease_limits, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(task = %task.id))]
    async fn submit_debounced(
        &self,
        task: &Task,
        window: Duration,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<DebounceReply> {
        self.debounced(task, window, limits, deadline).await
    }

    /// One pipeline, the script loaded first in the same round trip; on a
    /// Cluster, one per queue (see `slots.rs`).
    #[instrument(skip_all, level = "debug", fields(tasks = tasks.len()))]
    async fn submit_many(
        &self,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<Result<()>>> {
        if self.store.is_cluster() {
            return self.submit_per_queue(tasks, limits, deadline).await;
        }
        self.submit_pipeline(tasks.iter(), limits, deadline).await
    }

    #[instrument(skip_all, level = "debug", fields(%queue, worker))]
    async fn lease_or_hold(
        &self,
        queue: &QueueName,
        worker: &str,
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Leased> {
        let ask = LeaseAsk {
            worker,
            lease,
            names,
        };
        if self.store.is_cluster() {
            return self
                .lease_reserving(queue, &ask, limits, None, deadline)
                .await;
        }
        let call = self.lease_call(queue, &ask, limits);
        let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
        leased(
            self.store.invoke_once(call.done(), deadline).await?,
            sent_ms,
        )
    }

    async fn set_limit(&self, limit: &Limit, deadline: Deadline) -> Result<()> {
        self.store.set_limit(&self.flow_base, limit, deadline).await
    }

    async fn delete_limit(&self, field: &str, deadline: Deadline) -> Result<bool> {
        self.store
            .delete_limit(&self.flow_base, field, deadline)
            .await
    }

    async fn limits(&self, deadline: Deadline) -> Result<(u64, Vec<(Limit, LimitState)>)> {
        self.store
            .limits(&self.flow_base, self.clock.offset_ms(), deadline)
            .await
    }

    async fn limits_version(&self, deadline: Deadline) -> Result<u64> {
        self.store.limits_version(&self.flow_base, deadline).await
    }

    async fn back_off(&self, key: &str, wait: Duration, deadline: Deadline) -> Result<i64> {
        let mut call = self.scripts().backoff.call(self.clock());
        call.key(Key::Flow, format!("{}backoff:{key}", self.flow_base))
            .arg("wait_ms", millis(wait).max(1));
        // safe to repeat: it keeps the later end
        self.store.invoke(call.done(), deadline).await
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn heartbeat(
        &self,
        id: &TaskId,
        token: u32,
        lease: Duration,
        deadline: Deadline,
    ) -> Result<Beat> {
        let reply = self
            .flagged(|plain| self.beat(id, token, lease, plain, deadline))
            .await?;
        Ok(match reply {
            redis::Value::Int(1) => Beat::Held,
            redis::Value::BulkString(reason) => {
                Beat::CancelRequested(String::from_utf8_lossy(&reason).into_owned())
            }
            _ => Beat::Lost,
        })
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn take_over(
        &self,
        id: &TaskId,
        token: u32,
        worker: &str,
        lease: Duration,
        deadline: Deadline,
    ) -> Result<TakeOver> {
        self.take(id, token, worker, lease, deadline).await
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn cancel(
        &self,
        id: &TaskId,
        reason: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<CancelReply> {
        let call = self.cancel_call(id, reason, limits, false);
        let reply: String = self.store.invoke_once(call.done(), deadline).await?;
        Ok(CancelReply::parse(&reply))
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn retry(
        &self,
        id: &TaskId,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<RetryReply> {
        let mut call = self.scripts().retry.call(self.clock());
        call.queue_keys(&self.keys(&id.queue()), Some(id))
            .arg("id", id.as_str())
            .arg("events_cap", limits.events);
        let reply: String = self.store.invoke_once(call.done(), deadline).await?;
        Ok(RetryReply::parse(&reply))
    }

    #[instrument(skip_all, level = "debug", fields(task = %task.id))]
    async fn submit_pending(
        &self,
        task: &Task,
        waiting: &[TaskId],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()> {
        let call = self.submit_call(task, Duration::ZERO, waiting, limits, true);
        let script = self.scripts().submit.script();
        self.invoke_submit::<i64>(script, call.done(), limits, deadline)
            .await
            .map(drop)
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn depend_on(
        &self,
        id: &TaskId,
        dependent: &TaskId,
        deadline: Deadline,
    ) -> Result<DependReply> {
        let mut call = self.scripts().depend.call(self.clock());
        call.queue_keys(&self.keys(&id.queue()), Some(id))
            .arg("dependent", dependent.as_str());
        let reply: String = self.store.invoke(call.done(), deadline).await?;
        Ok(DependReply::parse(&reply))
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn dependents(&self, id: &TaskId, deadline: Deadline) -> Result<Vec<String>> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(format!("{}:dependents", self.keys(&id.queue()).task(id)));
        self.store.query(&cmd, deadline).await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn pending_tasks(
        &self,
        queue: &QueueName,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, Vec<String>)>> {
        self.store
            .pending_tasks(&self.keys(queue), count, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(task = %id, dependency))]
    async fn resolve_dependency(
        &self,
        id: &TaskId,
        dependency: &str,
        state: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<State>> {
        let mut call = self.scripts().resolve.call(self.clock());
        call.queue_keys(&self.keys(&id.queue()), Some(id))
            .arg("id", id.as_str())
            .arg("dependency", dependency)
            .arg("dependency_state", state)
            .arg("events_cap", limits.events)
            .arg("history_cap", limits.history);
        let reply: String = self.store.invoke(call.done(), deadline).await?;
        Ok(State::parse(&reply))
    }

    #[instrument(skip_all, level = "debug")]
    async fn claim_idempotency(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<Option<String>> {
        let mut call = self.scripts().idem_claim.call(self.clock());
        call.key(Key::Claim, crate::keys::idempotency(&self.prefix, key))
            .arg("value", value)
            .arg("ttl_ms", millis(ttl).max(1));
        // safe to retry: a second try finds our own claim
        let script = self.scripts().idem_claim.script();
        self.invoke_claim(script, call.done(), deadline).await
    }

    async fn swap_idempotency(
        &self,
        key: &str,
        old: &str,
        new: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut call = self.scripts().idem_swap.call(self.clock());
        call.key(Key::Claim, crate::keys::idempotency(&self.prefix, key))
            .arg("old", old)
            .arg("new", new)
            .arg("ttl_ms", millis(ttl).max(1));
        let script = self.scripts().idem_swap.script();
        let swapped: i64 = self.invoke_claim(script, call.done(), deadline).await?;
        Ok(swapped == 1)
    }

    #[instrument(skip_all, level = "debug")]
    async fn idempotency_claimed(&self, keys: &[String], deadline: Deadline) -> Result<Vec<bool>> {
        self.store
            .idempotency_claimed(&self.prefix, keys, self.clock.ahead_of_real_ms(), deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn dead_letters(
        &self,
        queue: &QueueName,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<String>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(self.keys(queue).dead())
            .arg(0)
            .arg(count.max(1) - 1);
        self.store.query(&cmd, deadline).await
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn release(
        &self,
        id: &TaskId,
        token: u32,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool> {
        self.release_attempt(id, token, log, limits, deadline).await
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn progress(
        &self,
        id: &TaskId,
        token: u32,
        progress: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut call = self.scripts().progress.call(self.clock());
        call.queue_keys(&self.keys(&id.queue()), Some(id))
            .arg("id", id.as_str())
            .arg("token", token)
            .arg("events_cap", limits.events)
            .arg("progress", progress);
        let ok: i64 = self.store.invoke_once(call.done(), deadline).await?;
        Ok(ok == 1)
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn finish(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<(State, bool)>> {
        self.finish_attempt(id, token, (outcome, log), limits, deadline)
            .await
    }

    /// finish.lua and lease.lua composed into one script (see
    /// `finish_lease.lua`).
    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn finish_and_lease(
        &self,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        next: &LeaseAsk<'_>,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<((State, bool), Leased)>> {
        self.finish_then_lease(id, token, (outcome, log), next, limits, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue, items = items.len()))]
    async fn finish_batch(
        &self,
        queue: &QueueName,
        items: &[FinishItem<'_>],
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<BatchEnd>> {
        self.batch(queue, items, (lease, names), limits, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn recover(
        &self,
        queue: &QueueName,
        acks_late: bool,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Recovered> {
        let keys = self.keys(queue);
        let mut call = self.scripts().recover.call(self.clock());
        call.queue_keys(&keys, None)
            .arg("prefix", keys.task_prefix())
            .arg("events_cap", limits.events)
            .arg("acks_late", if acks_late { "1" } else { "0" })
            .arg("history_cap", limits.history)
            .arg("dead_ttl_ms", millis(limits.dead_ttl));
        let reply: Vec<String> = self.store.invoke(call.done(), deadline).await?;
        self.recovered(queue, &reply)
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn trim(
        &self,
        queue: &QueueName,
        before_ms: i64,
        dead_before_ms: i64,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Trimmed> {
        let keys = self.keys(queue);
        let mut call = self.scripts().trim.call(self.clock());
        call.queue_keys(&keys, None)
            .arg("before_ms", before_ms)
            .arg("events_cap", limits.events)
            .arg("prefix", keys.task_prefix())
            .arg("dead_before_ms", dead_before_ms);
        let (history, dead, events): (u64, u64, u64) =
            self.store.invoke(call.done(), deadline).await?;
        Ok(Trimmed {
            history,
            dead,
            events,
        })
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn list_active(
        &self,
        queue: &QueueName,
        set: usize,
        offset: u64,
        count: usize,
        deadline: Deadline,
    ) -> Result<(Vec<Task>, Option<(usize, u64)>)> {
        let keys = self.keys(queue);
        self.store
            .list_active(&keys, set, offset, count, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn history_page(
        &self,
        queue: &QueueName,
        max_ms: i64,
        below_id: Option<&str>,
        min_ms: i64,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, i64, String)>> {
        let keys = self.keys(queue);
        self.store
            .history_page(&keys, max_ms, below_id, min_ms, count, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn queue_stats(&self, queue: &QueueName, deadline: Deadline) -> Result<QueueStats> {
        self.store
            .queue_stats(&self.keys(queue), self.clock(), deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn set_pause(
        &self,
        queue: &QueueName,
        pause: Option<&Pause>,
        deadline: Deadline,
    ) -> Result<Option<Pause>> {
        self.store
            .set_pause(&self.keys(queue), pause, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn task_times(&self, queue: &QueueName, deadline: Deadline) -> Result<QueueTimes> {
        self.read_times(queue, deadline).await
    }

    async fn flush_times(&self, deadline: Deadline) -> Result<()> {
        self.flush_tally(deadline).await
    }

    #[instrument(skip_all, level = "debug", fields(task = %id))]
    async fn get(&self, id: &TaskId, deadline: Deadline) -> Result<Option<Task>> {
        self.store
            .get_task(&self.keys(&id.queue()), id, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug", fields(%queue))]
    async fn event_reader(
        &self,
        queue: &QueueName,
        after: Option<&str>,
        deadline: Deadline,
    ) -> Result<EventReader> {
        let keys = self.keys(queue);
        Ok(EventReader::Redis(match after {
            Some(position) => {
                self.store
                    .event_reader_after(&keys, position, deadline)
                    .await?
            }
            None => self.store.event_reader(&keys, deadline).await?,
        }))
    }

    #[instrument(skip_all, level = "debug")]
    async fn announce_worker(
        &self,
        record: &WorkerRecord,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        self.store
            .announce_worker(&self.prefix, record, ttl, deadline)
            .await
    }

    #[instrument(skip_all, level = "debug")]
    async fn lease_key(&self, fresh: &str, deadline: Deadline) -> Result<String> {
        self.store.lease_key(&self.prefix, fresh, deadline).await
    }

    #[instrument(skip_all, level = "debug")]
    async fn retire_worker(&self, id: &str, deadline: Deadline) -> Result<()> {
        self.store.retire_worker(&self.prefix, id, deadline).await
    }

    #[instrument(skip_all, level = "debug")]
    async fn list_workers(&self, deadline: Deadline) -> Result<Vec<WorkerRecord>> {
        self.store.list_workers(&self.prefix, deadline).await
    }

    #[instrument(skip_all, level = "debug")]
    async fn usage(&self, deadline: Deadline) -> Result<serde_json::Value> {
        let m = self.store.memory(deadline).await?;
        Ok(serde_json::to_value(m).unwrap_or_default())
    }

    async fn recovered(&self) {
        self.store.recovered().await;
    }

    #[instrument(skip_all, level = "debug")]
    async fn ping(&self, deadline: Deadline) -> Result<Duration> {
        self.store.probe(deadline).await
    }
}
