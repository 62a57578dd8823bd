//! Task transitions on Redis: one Lua script per transition
//! (`lua/tasks/*.lua`), each checking state and fencing token before it
//! writes and appending its event, all on the keys of one queue (one Redis
//! Cluster slot). Times come from Redis's own clock inside the scripts, so
//! koo instances with skewed clocks still agree on when a lease lapses.
//!
//! These are building blocks of the task engine (issue 3); the engine that
//! drives them follows `docs/design/tasks.md`.

use std::collections::HashMap;
use std::time::Duration;

use redis::Script;

use super::RedisStore;
use crate::domain::task::{State, Task, TaskId};
use crate::domain::{Counts, Outcome, QueueStats};
use crate::keys::QueueKeys;
use crate::store::task_fields;
use crate::store::tasks::{
    Beat, CancelReply, DependReply, LeaseAsk, RetryReply, TaskEvent, TaskLimits, Trimmed,
    WorkerRecord,
};
use crate::store::{Deadline, Result, StoreError};

/// The compiled task scripts (loaded by SHA, sent in full on a cache miss).
pub(super) struct TaskScripts {
    submit: Script,
    lease: Script,
    heartbeat: Script,
    progress: Script,
    finish: Script,
    recover: Script,
    trim: Script,
    finish_lease: Script,
    release: Script,
    cancel: Script,
    retry: Script,
    idem_swap: Script,
    depend: Script,
    resolve: Script,
}

/// A script with the shared library (`lua/tasks/lib.lua`) prepended.
fn with_lib(body: &str) -> Script {
    Script::new(&format!("{}\n{body}", include_str!("lua/tasks/lib.lua")))
}

impl TaskScripts {
    pub(super) fn new() -> Self {
        Self {
            submit: Script::new(include_str!("lua/tasks/submit.lua")),
            lease: Script::new(include_str!("lua/tasks/lease.lua")),
            heartbeat: Script::new(include_str!("lua/tasks/heartbeat.lua")),
            progress: Script::new(include_str!("lua/tasks/progress.lua")),
            finish: with_lib(include_str!("lua/tasks/finish.lua")),
            recover: with_lib(include_str!("lua/tasks/recover.lua")),
            trim: Script::new(include_str!("lua/tasks/trim.lua")),
            release: Script::new(include_str!("lua/tasks/release.lua")),
            cancel: with_lib(include_str!("lua/tasks/cancel.lua")),
            retry: Script::new(include_str!("lua/tasks/retry.lua")),
            idem_swap: Script::new(include_str!("lua/tasks/idem_swap.lua")),
            depend: Script::new(include_str!("lua/tasks/depend.lua")),
            resolve: with_lib(include_str!("lua/tasks/resolve.lua")),
            finish_lease: with_lib(&format!(
                "local function finish(KEYS, ARGV)\n{}\nend\nlocal function lease(KEYS, ARGV)\n{}\nend\n{}",
                include_str!("lua/tasks/finish.lua"),
                include_str!("lua/tasks/lease.lua"),
                include_str!("lua/tasks/finish_lease.lua"),
            )),
        }
    }
}

/// Follows one queue's event stream on a connection of its own, from the
/// moment it was opened.
pub struct StreamReader {
    conn: Option<redis::aio::MultiplexedConnection>,
    store: RedisStore,
    stream: String,
    last: String,
}

impl StreamReader {
    /// The position after the last event read.
    pub fn position(&self) -> &str {
        &self.last
    }

    /// The next events, at most `max`, waiting up to `block` for some
    /// (empty after that).
    pub async fn next(&mut self, block: Duration, max: usize) -> Result<Vec<TaskEvent>> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.store.inner.connect_timeout))
                    .set_response_timeout(Some(block + Duration::from_secs(5)));
                let conn = self
                    .store
                    .inner
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| {
                        StoreError::Unavailable(format!("cannot open an event connection: {e}"))
                    })?;
                self.conn.insert(conn)
            }
        };
        // Field-value pairs as read, not a map: an event has five fields, and
        // hashing them costs more than a scan.
        type Entries = Vec<(String, Vec<(String, String)>)>;
        let reply: redis::RedisResult<Option<Vec<(String, Entries)>>> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("COUNT")
            .arg(max)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(&self.last)
            .query_async(conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // reconnect on the next call
                self.conn = None;
                return Err(StoreError::Unavailable(format!(
                    "event stream read failed: {e}"
                )));
            }
        };
        let mut events = Vec::new();
        for (stream_id, fields) in reply.into_iter().flatten().flat_map(|(_, entries)| entries) {
            self.last.clone_from(&stream_id);
            let (mut id, mut state, mut name, mut progress, mut at_ms) =
                (None, None, None, None, 0);
            for (field, value) in fields {
                match field.as_str() {
                    "id" => id = Some(value),
                    "state" => state = Some(value),
                    "name" => name = Some(value),
                    "progress" => progress = Some(value),
                    "at" => at_ms = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
            if let (Some(id), Some(state)) = (id, state) {
                events.push(TaskEvent {
                    stream_id,
                    id,
                    name: name.unwrap_or_default(),
                    state,
                    progress,
                    at_ms,
                });
            }
        }
        Ok(events)
    }
}

/// Keys and arguments of lease.lua, appended to `inv`.
fn lease_params(
    inv: &mut redis::ScriptInvocation<'_>,
    keys: &QueueKeys,
    worker: &str,
    lease: Duration,
    names: &[&str],
    limits: TaskLimits,
) {
    inv.key(keys.ready())
        .key(keys.scheduled())
        .key(keys.leases())
        .key(keys.events());
    inv.arg(keys.task_prefix())
        .arg(millis(lease))
        .arg(worker)
        .arg(limits.events)
        .arg(limits.lease_scan);
    for name in names {
        inv.arg(*name);
    }
}

/// Keys and arguments of finish.lua, appended to `inv`.
fn finish_params(
    inv: &mut redis::ScriptInvocation<'_>,
    keys: &QueueKeys,
    id: &TaskId,
    token: u32,
    outcome: &Outcome,
    log: &str,
    limits: TaskLimits,
) {
    let (name, payload, delay) = match outcome {
        Outcome::Succeeded(r) => ("succeeded", r, Duration::ZERO),
        Outcome::Retry { error, delay } => ("retry", error, *delay),
        Outcome::Failed(e) => ("failed", e, Duration::ZERO),
        Outcome::TimedOut(e) => ("timed_out", e, Duration::ZERO),
        Outcome::Cancelled(e) => ("cancelled", e, Duration::ZERO),
    };
    inv.key(keys.task(id))
        .key(keys.leases())
        .key(keys.scheduled())
        .key(keys.history())
        .key(keys.history_data())
        .key(keys.dead())
        .key(keys.events())
        .key(keys.stats());
    inv.arg(id.as_str())
        .arg(token)
        .arg(limits.events)
        .arg(name)
        .arg(payload.as_str())
        .arg(millis(delay))
        .arg(limits.history)
        .arg(log)
        .arg(millis(limits.dead_ttl));
}

/// finish.lua's reply: the new state, and whether tasks wait on it.
fn parse_end(reply: &str) -> Option<(State, bool)> {
    match reply.strip_suffix('+') {
        Some(state) => State::parse(state).map(|s| (s, true)),
        None => State::parse(reply).map(|s| (s, false)),
    }
}

/// A stream entry id `ms-seq` as a comparable pair.
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisStore {
    /// Runs a script that is safe to repeat (it checks before it writes),
    /// with the retries of [`RedisStore::run`].
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        deadline: Deadline,
    ) -> Result<T> {
        self.run(
            deadline,
            |mut c| async move { inv.invoke_async(&mut c).await },
        )
        .await
    }

    /// Runs a script that moves a task, once: after a lost reply, sending it
    /// again could apply it twice.
    async fn invoke_once<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        deadline: Deadline,
    ) -> Result<T> {
        self.run_once(
            deadline,
            |mut c| async move { inv.invoke_async(&mut c).await },
        )
        .await
    }
    /// Stores a new task: queued now, or scheduled `delay` from now.
    pub async fn submit_task(
        &self,
        keys: &QueueKeys,
        task: &Task,
        delay: Duration,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()> {
        let inv = self.submit_invocation(keys, task, delay, &[], limits);
        self.invoke_once::<i64>(&inv, deadline).await.map(drop)
    }

    /// Stores a batch of new tasks in one pipeline (the script is loaded
    /// first, in the same round trip): the outcome of each.
    pub async fn submit_tasks(
        &self,
        prefix: &str,
        tasks: &[(Task, Duration)],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<Result<()>>> {
        let invocations: Vec<_> = tasks
            .iter()
            .map(|(task, delay)| {
                let keys = QueueKeys::new(prefix, &task.id.queue());
                self.submit_invocation(&keys, task, *delay, &[], limits)
            })
            .collect();
        let mut pipe = redis::pipe();
        pipe.load_script(&self.inner.tasks.submit);
        for inv in &invocations {
            pipe.invoke_script(inv);
        }
        pipe.ignore_errors();
        let pipe = &pipe;
        let replies: Vec<redis::RedisResult<redis::Value>> = self
            .run_once(
                deadline,
                |mut c| async move { pipe.query_async(&mut c).await },
            )
            .await?;
        Ok(replies
            .into_iter()
            .skip(1)
            .map(|r| {
                r.map(drop)
                    .map_err(|e| StoreError::Backend(format!("submit failed: {e}")))
            })
            .collect())
    }

    /// Stores a new task PENDING on the dependencies in `waiting`.
    pub async fn submit_pending_task(
        &self,
        keys: &QueueKeys,
        task: &Task,
        waiting: &[TaskId],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()> {
        let inv = self.submit_invocation(keys, task, Duration::ZERO, waiting, limits);
        self.invoke_once::<i64>(&inv, deadline).await.map(drop)
    }

    /// Registers `dependent` on the dependency `id` (see `depend.lua`).
    pub async fn depend_on(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        dependent: &TaskId,
        deadline: Deadline,
    ) -> Result<DependReply> {
        let mut inv = self.inner.tasks.depend.prepare_invoke();
        inv.key(keys.task(id));
        inv.arg(dependent.as_str());
        let reply: String = self.invoke(&inv, deadline).await?;
        Ok(DependReply::parse(&reply))
    }

    /// The tasks waiting on `id`.
    pub async fn dependents(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        deadline: Deadline,
    ) -> Result<Vec<String>> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(format!("{}:dependents", keys.task(id)));
        self.query(&cmd, deadline).await
    }

    /// Up to `count` PENDING tasks of the queue with the dependencies each
    /// still waits on.
    pub async fn pending_tasks(
        &self,
        keys: &QueueKeys,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, Vec<String>)>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(keys.pending()).arg(0).arg(count.max(1) - 1);
        let ids: Vec<String> = self.query(&cmd, deadline).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("SMEMBERS")
                .arg(format!("{}{id}:deps", keys.task_prefix()));
        }
        let deps: Vec<Vec<String>> = self.query_pipe(&pipe, deadline).await?;
        Ok(ids.into_iter().zip(deps).collect())
    }

    /// A dependency of PENDING task `id` ended in `state` (see
    /// `resolve.lua`); the task's state after.
    pub async fn resolve_dependency(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        dependency: &str,
        state: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<State>> {
        let mut inv = self.inner.tasks.resolve.prepare_invoke();
        inv.key(keys.task(id))
            .key(keys.pending())
            .key(keys.ready())
            .key(keys.history())
            .key(keys.history_data())
            .key(keys.dead())
            .key(keys.events())
            .key(keys.stats());
        inv.arg(id.as_str())
            .arg(dependency)
            .arg(state)
            .arg(limits.events)
            .arg(limits.history);
        let reply: String = self.invoke(&inv, deadline).await?;
        Ok(State::parse(&reply))
    }

    fn submit_invocation(
        &self,
        keys: &QueueKeys,
        task: &Task,
        delay: Duration,
        waiting: &[TaskId],
        limits: TaskLimits,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self.inner.tasks.submit.prepare_invoke();
        inv.key(keys.task(&task.id))
            .key(keys.ready())
            .key(keys.scheduled())
            .key(keys.events())
            .key(keys.stats())
            .key(keys.pending());
        inv.arg(task.id.as_str())
            .arg(task.priority.band())
            .arg(millis(delay))
            .arg(limits.events)
            .arg(waiting.len());
        for dep in waiting {
            inv.arg(dep.as_str());
        }
        for (field, value) in task_fields::to_fields(task) {
            inv.arg(field).arg(value);
        }
        inv
    }

    /// Leases the best ready task of the queue whose name is in `names`
    /// (`*` serves all), counting the attempt; `None` when there is none.
    pub async fn lease_task(
        &self,
        keys: &QueueKeys,
        worker: &str,
        lease: Duration,
        names: &[&str],
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<Task>> {
        let mut inv = self.inner.tasks.lease.prepare_invoke();
        lease_params(&mut inv, keys, worker, lease, names, limits);
        let fields: Option<HashMap<String, String>> = self.invoke_once(&inv, deadline).await?;
        fields
            .map(|f| task_fields::from_fields(&f, Vec::new()).map_err(StoreError::Backend))
            .transpose()
    }

    /// Extends a lease; whether it is still held, and whether a cancel was
    /// asked for.
    pub async fn heartbeat_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        token: u32,
        lease: Duration,
        deadline: Deadline,
    ) -> Result<Beat> {
        let mut inv = self.inner.tasks.heartbeat.prepare_invoke();
        inv.key(keys.task(id)).key(keys.leases());
        inv.arg(id.as_str()).arg(token).arg(millis(lease));
        let reply: i64 = self.invoke(&inv, deadline).await?;
        Ok(match reply {
            1 => Beat::Held,
            2 => Beat::CancelRequested,
            _ => Beat::Lost,
        })
    }

    /// Cancels a task that has not ended (see `cancel.lua`).
    pub async fn cancel_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        reason: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<CancelReply> {
        let mut inv = self.inner.tasks.cancel.prepare_invoke();
        inv.key(keys.task(id))
            .key(keys.ready())
            .key(keys.scheduled())
            .key(keys.history())
            .key(keys.history_data())
            .key(keys.dead())
            .key(keys.events())
            .key(keys.stats())
            .key(keys.pending());
        inv.arg(id.as_str())
            .arg(limits.events)
            .arg(limits.history)
            .arg(reason);
        let reply: String = self.invoke_once(&inv, deadline).await?;
        Ok(CancelReply::parse(&reply))
    }

    /// Queues an ended (failed, timed out, cancelled) task again with a
    /// fresh retry budget (see `retry.lua`).
    pub async fn retry_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<RetryReply> {
        let mut inv = self.inner.tasks.retry.prepare_invoke();
        inv.key(keys.task(id))
            .key(keys.ready())
            .key(keys.history())
            .key(keys.history_data())
            .key(keys.dead())
            .key(keys.events())
            .key(keys.stats());
        inv.arg(id.as_str()).arg(limits.events);
        let reply: String = self.invoke_once(&inv, deadline).await?;
        Ok(RetryReply::parse(&reply))
    }

    /// Claims idempotency key `key` with `value` for `ttl` unless it is
    /// claimed: `None` when claimed now, else the existing claim.
    pub async fn claim_idempotency(
        &self,
        prefix: &str,
        key: &str,
        value: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<Option<String>> {
        let name = crate::keys::idempotency(prefix, key);
        let mut set = redis::cmd("SET");
        set.arg(&name)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1));
        let set = &set;
        // SET NX is safe to retry: a second try finds our own claim
        let claimed: Option<String> = self
            .run(
                deadline,
                |mut c| async move { set.query_async(&mut c).await },
            )
            .await?;
        if claimed.is_some() {
            return Ok(None);
        }
        let mut get = redis::cmd("GET");
        get.arg(&name);
        let existing: Option<String> = self.query(&get, deadline).await?;
        // expired between the two calls: claim again
        match existing {
            Some(v) => Ok(Some(v)),
            None => Box::pin(self.claim_idempotency(prefix, key, value, ttl, deadline)).await,
        }
    }

    /// Which of `keys` are claimed idempotency keys: one pipelined round
    /// trip of `EXISTS` (a read, safe to retry).
    pub async fn idempotency_claimed(
        &self,
        prefix: &str,
        keys: &[String],
        deadline: Deadline,
    ) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("EXISTS")
                .arg(crate::keys::idempotency(prefix, key));
        }
        self.query_pipe(&pipe, deadline).await
    }

    /// Replaces claim `old` of `key` with `new` (an empty `new` deletes it)
    /// if it still holds `old`; whether it did.
    pub async fn swap_idempotency(
        &self,
        prefix: &str,
        key: &str,
        old: &str,
        new: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut inv = self.inner.tasks.idem_swap.prepare_invoke();
        inv.key(crate::keys::idempotency(prefix, key));
        inv.arg(old).arg(new).arg(millis(ttl).max(1));
        let swapped: i64 = self.invoke(&inv, deadline).await?;
        Ok(swapped == 1)
    }

    /// Up to `count` dead-lettered ids of the queue, oldest first.
    pub async fn dead_letters(
        &self,
        keys: &QueueKeys,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<String>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(keys.dead()).arg(0).arg(count.max(1) - 1);
        self.query(&cmd, deadline).await
    }

    /// Hands a running task back to its queue at once, giving its attempt
    /// back; `false` when fenced. `log` is the attempt's log entry.
    pub async fn release_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        token: u32,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut inv = self.inner.tasks.release.prepare_invoke();
        inv.key(keys.task(id))
            .key(keys.leases())
            .key(keys.ready())
            .key(keys.events());
        inv.arg(id.as_str()).arg(token).arg(limits.events).arg(log);
        let ok: i64 = self.invoke_once(&inv, deadline).await?;
        Ok(ok == 1)
    }

    /// Records progress (JSON); `false` when fenced.
    pub async fn progress_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        token: u32,
        progress: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut inv = self.inner.tasks.progress.prepare_invoke();
        inv.key(keys.task(id)).key(keys.events());
        inv.arg(id.as_str())
            .arg(token)
            .arg(limits.events)
            .arg(progress);
        let ok: i64 = self.invoke_once(&inv, deadline).await?;
        Ok(ok == 1)
    }

    /// Ends the attempt held with `token`; the state the task moved to, or
    /// `None` when fenced. `log` is the attempt's log entry (a JSON object).
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<(State, bool)>> {
        let mut inv = self.inner.tasks.finish.prepare_invoke();
        finish_params(&mut inv, keys, id, token, outcome, log, limits);
        let state: Option<String> = self.invoke_once(&inv, deadline).await?;
        Ok(state.as_deref().and_then(parse_end))
    }

    /// [`Self::finish_task`], then, when it was accepted, a lease of the
    /// next task of the same queue served by `names`, in one call.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_and_lease_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        token: u32,
        outcome: &Outcome,
        log: &str,
        next: &LeaseAsk<'_>,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<((State, bool), Option<Task>)>> {
        let mut inv = self.inner.tasks.finish_lease.prepare_invoke();
        finish_params(&mut inv, keys, id, token, outcome, log, limits);
        lease_params(&mut inv, keys, next.worker, next.lease, next.names, limits);
        let (state, fields): (Option<String>, Option<HashMap<String, String>>) =
            self.invoke_once(&inv, deadline).await?;
        let Some(ended) = state.as_deref().and_then(parse_end) else {
            return Ok(None);
        };
        let next = fields
            .map(|f| task_fields::from_fields(&f, Vec::new()).map_err(StoreError::Backend))
            .transpose()?;
        Ok(Some((ended, next)))
    }

    /// Recovers the queue's lapsed leases and queues its due scheduled tasks
    /// (at most 100 of each per call); how many were handled.
    pub async fn recover_tasks(
        &self,
        keys: &QueueKeys,
        acks_late: bool,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<u64> {
        let mut inv = self.inner.tasks.recover.prepare_invoke();
        inv.key(keys.leases())
            .key(keys.ready())
            .key(keys.history())
            .key(keys.history_data())
            .key(keys.dead())
            .key(keys.events())
            .key(keys.stats())
            .key(keys.scheduled());
        inv.arg(keys.task_prefix())
            .arg(limits.events)
            .arg(if acks_late { "1" } else { "0" })
            .arg(limits.history)
            .arg(millis(limits.dead_ttl));
        self.invoke(&inv, deadline).await
    }

    /// Removes the queue's tasks that ended before `before_ms` (history,
    /// stored results; at most 1000 per call), except dead letters that
    /// ended at or after `dead_before_ms`, and trims its event stream.
    pub async fn trim_tasks(
        &self,
        keys: &QueueKeys,
        before_ms: i64,
        dead_before_ms: i64,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Trimmed> {
        let mut inv = self.inner.tasks.trim.prepare_invoke();
        inv.key(keys.history())
            .key(keys.history_data())
            .key(keys.dead())
            .key(keys.events());
        inv.arg(before_ms)
            .arg(limits.events)
            .arg(keys.task_prefix())
            .arg(dead_before_ms);
        let (history, dead, events): (u64, u64, u64) = self.invoke(&inv, deadline).await?;
        Ok(Trimmed {
            history,
            dead,
            events,
        })
    }

    /// Up to `count` active tasks of the queue from position `offset` of set
    /// `set` (0 running, 1 queued, 2 scheduled), and where the next call
    /// should start (`None`: the queue is done).
    pub async fn list_active(
        &self,
        keys: &QueueKeys,
        mut set: usize,
        mut offset: u64,
        count: usize,
        deadline: Deadline,
    ) -> Result<(Vec<Task>, Option<(usize, u64)>)> {
        let sets = [
            keys.leases(),
            keys.ready(),
            keys.scheduled(),
            keys.pending(),
        ];
        let mut tasks = Vec::new();
        while set < sets.len() && tasks.len() < count {
            let want = (count - tasks.len()) as u64;
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&sets[set])
                .arg(offset)
                .arg(offset.saturating_add(want - 1));
            let ids: Vec<String> = self.query(&cmd, deadline).await?;
            let got = ids.len() as u64;
            let mut pipe = redis::pipe();
            let mut parsed = Vec::new();
            for id in ids {
                if let Ok(id) = TaskId::parse(&id) {
                    pipe.cmd("HGETALL").arg(keys.task(&id));
                    parsed.push(id);
                }
            }
            if !parsed.is_empty() {
                let hashes: Vec<HashMap<String, String>> = self.query_pipe(&pipe, deadline).await?;
                tasks.extend(
                    hashes
                        .into_iter()
                        .filter(|h| !h.is_empty())
                        .filter_map(|h| task_fields::from_fields(&h, Vec::new()).ok()),
                );
            }
            if got < want {
                set += 1;
                offset = 0;
            } else {
                offset += got;
            }
        }
        Ok((tasks, (set < sets.len()).then_some((set, offset))))
    }

    /// Up to `count` history entries ending at or before `max_ms` (newest
    /// first, ties by id descending, skipping ids at `max_ms` that are not
    /// below `below_id`) and at or after `min_ms`: `(id, end ms, summary)`.
    pub async fn history_page(
        &self,
        keys: &QueueKeys,
        max_ms: i64,
        below_id: Option<&str>,
        min_ms: i64,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, i64, String)>> {
        // All entries ending exactly at max_ms (ties, e.g. one sweep's
        // recoveries) are read in full and those not yet shown kept; then the
        // older ones, up to `count`. A limit on the ties could hide some.
        let mut pipe = redis::pipe();
        pipe.cmd("ZREVRANGEBYSCORE")
            .arg(keys.history())
            .arg(max_ms)
            .arg(max_ms)
            .arg("WITHSCORES");
        pipe.cmd("ZREVRANGEBYSCORE")
            .arg(keys.history())
            .arg(format!("({max_ms}"))
            .arg(min_ms)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(count);
        type Scored = Vec<(String, f64)>;
        let (ties, older): (Scored, Scored) = self.query_pipe(&pipe, deadline).await?;
        let mut entries: Vec<(String, i64)> = ties
            .into_iter()
            .filter(|(id, _)| below_id.is_none_or(|b| id.as_str() < b))
            .chain(older)
            .map(|(id, score)| (id, score as i64))
            .filter(|(_, ms)| *ms >= min_ms)
            .collect();
        entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        entries.truncate(count);
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(keys.history_data());
        for (id, _) in &entries {
            hmget.arg(id);
        }
        let summaries: Vec<Option<String>> = self.query(&hmget, deadline).await?;
        Ok(entries
            .into_iter()
            .zip(summaries)
            .filter_map(|((id, ms), summary)| Some((id, ms, summary?)))
            .collect())
    }

    /// The queue's depths, oldest wait and outcome counters.
    pub async fn queue_stats(&self, keys: &QueueKeys, deadline: Deadline) -> Result<QueueStats> {
        let band = 1u64 << 42;
        let mut pipe = redis::pipe();
        pipe.cmd("ZCARD").arg(keys.ready());
        pipe.cmd("ZCARD").arg(keys.scheduled());
        pipe.cmd("ZCARD").arg(keys.leases());
        pipe.cmd("ZCARD").arg(keys.dead());
        pipe.cmd("ZCARD").arg(keys.pending());
        pipe.cmd("HGETALL").arg(keys.stats());
        pipe.cmd("TIME");
        // the oldest ready task of each priority band
        for b in 0..4u64 {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(keys.ready())
                .arg(b * band)
                .arg(format!("({}", (b + 1) * band))
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(1);
        }
        type Oldest = Vec<(String, f64)>;
        #[allow(clippy::type_complexity)]
        let (ready, scheduled, running, dead, pending, counts, time, b0, b1, b2, b3): (
            u64,
            u64,
            u64,
            u64,
            u64,
            HashMap<String, u64>,
            (String, String),
            Oldest,
            Oldest,
            Oldest,
            Oldest,
        ) = self.query_pipe(&pipe, deadline).await?;
        let now_ms =
            time.0.parse::<i64>().unwrap_or(0) * 1000 + time.1.parse::<i64>().unwrap_or(0) / 1000;
        let oldest = [b0, b1, b2, b3]
            .into_iter()
            .enumerate()
            .filter_map(|(b, entries)| {
                entries
                    .first()
                    .map(|(_, score)| *score as i64 - (b as i64) * band as i64)
            })
            .min();
        Ok(QueueStats {
            ready,
            scheduled,
            running,
            dead,
            pending,
            oldest_wait: oldest
                .map(|queued| Duration::from_millis((now_ms - queued).max(0) as u64)),
            counts: Counts::from_stored(counts),
        })
    }

    /// A reader of the queue's events from now on: every event appended
    /// after this returns will be read.
    pub async fn event_reader(&self, keys: &QueueKeys, deadline: Deadline) -> Result<StreamReader> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(keys.events()).arg("+").arg("-").arg("COUNT").arg(1);
        type Entries = Vec<(String, HashMap<String, String>)>;
        let newest: Entries = self.query(&cmd, deadline).await?;
        Ok(StreamReader {
            conn: None,
            store: self.clone(),
            stream: keys.events(),
            last: newest
                .into_iter()
                .next()
                .map_or_else(|| "0-0".to_owned(), |(id, _)| id),
        })
    }

    /// A reader of the queue's events after stream position `after` (a
    /// resume token's position). `Expired` when the stream has trimmed
    /// entries and its oldest kept entry is past `after`: resuming would
    /// silently skip what was trimmed. (Redis does not say which ids it
    /// trimmed, so a position exactly at the last trimmed entry is refused
    /// too: a spurious refusal costs a re-watch, a silent gap costs events.)
    pub async fn event_reader_after(
        &self,
        keys: &QueueKeys,
        after: &str,
        deadline: Deadline,
    ) -> Result<StreamReader> {
        let Some(position) = stream_id(after) else {
            return Err(StoreError::InvalidCursor(format!(
                "{} is not an event position",
                crate::quote::quote(after)
            )));
        };
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("STREAM").arg(keys.events());
        // no stream yet: nothing was trimmed
        let info: HashMap<String, redis::Value> =
            self.query(&cmd, deadline).await.unwrap_or_default();
        let number = |name: &str| {
            info.get(name)
                .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
        };
        let first = info
            .get("recorded-first-entry-id")
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .and_then(|id| stream_id(&id));
        let trimmed = matches!(
            (number("entries-added"), number("length")),
            (Some(added), Some(length)) if added > length
        );
        if trimmed && first.is_some_and(|first| first > position) {
            return Err(StoreError::Expired(format!(
                "events after position {after} are no longer kept (each queue keeps a capped number of recent events); watch again without a resume token"
            )));
        }
        Ok(StreamReader {
            conn: None,
            store: self.clone(),
            stream: keys.events(),
            last: after.to_owned(),
        })
    }

    /// Records a worker pool as alive for `ttl`: its record (with that TTL)
    /// and its place in the index, from which records older than a few
    /// TTLs are dropped.
    pub async fn announce_worker(
        &self,
        prefix: &str,
        record: &WorkerRecord,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        let index = crate::keys::workers_index(prefix);
        let json = serde_json::to_string(record)
            .map_err(|e| StoreError::Backend(format!("worker record: {e}")))?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(crate::keys::worker_record(prefix, &record.id))
            .arg(json)
            .arg("PX")
            .arg(millis(ttl).max(1))
            .ignore();
        pipe.cmd("ZADD")
            .arg(&index)
            .arg(record.seen_ms)
            .arg(&record.id)
            .ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(record.seen_ms - 10 * millis(ttl) as i64)
            .ignore();
        // the index itself lives as long as some pool keeps announcing
        pipe.cmd("PEXPIRE")
            .arg(&index)
            .arg(10 * millis(ttl).max(1))
            .ignore();
        self.query_pipe::<()>(&pipe, deadline).await
    }

    /// The stored key of lease secrets, after storing `fresh` when there
    /// was none. Both commands only write a missing key, so a retry is safe.
    pub async fn lease_key(&self, prefix: &str, fresh: &str, deadline: Deadline) -> Result<String> {
        let key = crate::keys::lease_key(prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&key).arg(fresh).arg("NX").ignore();
        pipe.cmd("GET").arg(&key);
        let (stored,): (Option<String>,) = self.query_pipe(&pipe, deadline).await?;
        match stored {
            Some(k) if k.len() >= 32 => Ok(k),
            _ => Err(StoreError::Unavailable(format!(
                "the key of lease secrets at {key} is missing or shorter than 32 bytes"
            ))),
        }
    }

    /// Removes a stopping worker pool's record.
    pub async fn retire_worker(&self, prefix: &str, id: &str, deadline: Deadline) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(crate::keys::worker_record(prefix, id))
            .ignore();
        pipe.cmd("ZREM")
            .arg(crate::keys::workers_index(prefix))
            .arg(id)
            .ignore();
        self.query_pipe::<()>(&pipe, deadline).await
    }

    /// The worker pools whose records have not expired.
    pub async fn list_workers(
        &self,
        prefix: &str,
        deadline: Deadline,
    ) -> Result<Vec<WorkerRecord>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(crate::keys::workers_index(prefix)).arg(0).arg(999);
        let ids: Vec<String> = self.query(&cmd, deadline).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for id in &ids {
            mget.arg(crate::keys::worker_record(prefix, id));
        }
        let records: Vec<Option<String>> = self.query(&mget, deadline).await?;
        Ok(records
            .into_iter()
            .flatten()
            .filter_map(|r| serde_json::from_str(&r).ok())
            .collect())
    }

    /// Reads a task and its attempt log; `None` once it has expired.
    pub async fn get_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        deadline: Deadline,
    ) -> Result<Option<Task>> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(keys.task(id))
            .cmd("LRANGE")
            .arg(keys.task_log(id))
            .arg(0)
            .arg(-1);
        let (fields, log): (HashMap<String, String>, Vec<String>) =
            self.query_pipe(&pipe, deadline).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        task_fields::from_fields(&fields, log)
            .map(Some)
            .map_err(StoreError::Backend)
    }
}
