//! The task engine: validates submits and drives the store's transitions.
//!
//! A cheap-to-clone handle over a [`TaskStore`]: Redis (shared by any
//! number of koo processes) or the embedded store (one `koo serve`). Workers ([`super::worker`]) and the gRPC
//! service are its clients; the recovery loop ([`TaskEngine::run_recovery`])
//! runs on every koo instance, so a dead worker's task comes back within the
//! lease time plus one sweep wherever it ran.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::remote::secret::{LeasePolicy, Signer, SignerCell};
use super::retry::Backoff;
use crate::domain::task::{CacheTarget, Category, Priority, QueueName, State, Task, TaskId};
use crate::domain::{Outcome, QueueStats};
use crate::store::tasks::{
    Beat, CancelReply, DependReply, LeaseAsk, RetryReply, TaskLimits, TaskStore, Trimmed,
};
use crate::store::{Deadline, StoreError};

/// Largest `args` + `kwargs`, in bytes of JSON.
pub const MAX_ARGUMENTS: usize = 1024 * 1024;

/// Engine settings (the seed's Celery settings and koo's intervals).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConfig {
    /// Key prefix.
    pub prefix: String,
    /// Lease length; a worker heartbeats at a third of it.
    pub lease: Duration,
    /// How often lapsed leases are looked for.
    pub sweep_interval: Duration,
    /// Late acknowledgement: a lost worker's task runs again (Celery's
    /// `acks_late`); off, it ends FAILED ('worker lost').
    pub acks_late: bool,
    /// Retries when a submit names none.
    pub default_max_retries: u32,
    /// Soft time limit when a submit names none.
    pub soft_time_limit: Duration,
    /// Hard time limit when a submit names none.
    pub time_limit: Duration,
    /// How long results stay readable after the end.
    pub result_ttl: Duration,
    /// Retry spacing.
    pub backoff: Backoff,
    /// Caps on events, history and lease scans.
    pub limits: TaskLimits,
    /// How long an idle worker waits before looking again (a submit in the
    /// same process wakes it at once).
    pub poll_interval: Duration,
    /// How long ended tasks stay in history (database maintenance trims).
    pub history_max_age: Duration,
    /// How long a stopping worker lets a running task finish before it
    /// hands the task back to its queue.
    pub shutdown_grace: Duration,
    /// How long a cancelled handler may take to stop before it is
    /// abandoned.
    pub cancel_grace: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// How old a claim of an idempotency key whose task was never stored
    /// must be before another submit takes it over (the claimant's own
    /// store call gets at most half of it).
    pub idempotency_takeover: Duration,
    /// Whether reports without a lease secret are accepted on tasks no
    /// Work stream holds (`KOO_LEASE_SECRETS`, resolved).
    pub lease_secrets: LeasePolicy,
    /// Queues beyond the six category queues (KOO_TASK_QUEUES). Only known
    /// queues accept tasks, so that every queue is swept for lapsed leases.
    pub extra_queues: Vec<QueueName>,
}

impl TaskConfig {
    /// Every queue koo serves: the category queues, then the extra ones.
    pub fn queues(&self) -> Vec<QueueName> {
        let mut queues = Category::queues();
        for q in &self.extra_queues {
            if !queues.contains(q) {
                queues.push(q.clone());
            }
        }
        queues
    }
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            prefix: "koo".to_owned(),
            lease: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(1),
            acks_late: true,
            default_max_retries: 3,
            soft_time_limit: Duration::from_secs(1500),
            time_limit: Duration::from_secs(1800),
            result_ttl: Duration::from_secs(3600),
            backoff: Backoff::default(),
            limits: TaskLimits::default(),
            poll_interval: Duration::from_millis(100),
            history_max_age: Duration::from_secs(7 * 24 * 3600),
            shutdown_grace: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(10),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            idempotency_takeover: Duration::from_secs(15),
            extra_queues: Vec::new(),
            lease_secrets: LeasePolicy::default(),
        }
    }
}

/// A task to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Handler name.
    pub name: String,
    /// Category (and default queue).
    pub category: Category,
    /// Queue, when not the category's.
    pub queue: Option<QueueName>,
    /// Priority.
    pub priority: Priority,
    /// Positional arguments, a JSON array.
    pub args: String,
    /// Keyword arguments, a JSON object.
    pub kwargs: String,
    /// Retries; `None` means the default (zero is a valid choice).
    pub max_retries: Option<u32>,
    /// Countdown before it may run.
    pub delay: Duration,
    /// Soft time limit; `None` means the default.
    pub soft_time_limit: Option<Duration>,
    /// Hard time limit; `None` means the default.
    pub time_limit: Option<Duration>,
    /// Result retention; `None` means the default.
    pub result_ttl: Option<Duration>,
    /// Where a successful result is also cached.
    pub cache_result: Option<CacheTarget>,
    /// Submits with the same key (while its task is known) create one task.
    pub idempotency_key: Option<String>,
    /// Tasks (ids) that must succeed before this one is queued.
    pub depends_on: Vec<String>,
    /// The schedule submitting it (shown in the task and its history).
    pub schedule: Option<String>,
    /// The tick it is submitted for (ms since the epoch).
    pub schedule_tick_ms: Option<i64>,
}

impl NewTask {
    /// A task with every option at its default.
    pub fn new(name: &str, category: Category) -> Self {
        Self {
            name: name.to_owned(),
            category,
            queue: None,
            priority: Priority::Normal,
            args: "[]".to_owned(),
            kwargs: "{}".to_owned(),
            max_retries: None,
            delay: Duration::ZERO,
            soft_time_limit: None,
            time_limit: None,
            result_ttl: None,
            cache_result: None,
            idempotency_key: None,
            depends_on: Vec::new(),
            schedule: None,
            schedule_tick_ms: None,
        }
    }
}

/// Why a task operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskError {
    /// A request field is wrong.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// No such task (never existed, or its result expired).
    #[error("task {0} not found (unknown, or its result expired)")]
    NotFound(String),
    /// Something other than a task does not exist (the message says what).
    #[error("{0}")]
    Missing(String),
    /// The caller's lease is no longer valid: another holder has the task,
    /// or it ended.
    #[error("the lease on task {0} is no longer yours (it lapsed or the task ended)")]
    Fenced(String),
    /// The task is not in a state the call applies to.
    #[error("{0}")]
    FailedPrecondition(String),
    /// An idempotency key already names a different task.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller may not act on this lease: a report without the lease's
    /// secret, or with another (the message says which).
    #[error("{0}")]
    Forbidden(String),
    /// A worker holds as many tasks as it may in this process.
    #[error(
        "this worker holds {held} tasks in this koo process, its bound (KOO_MAX_HELD_PER_WORKER or its key's max_held is {bound}): complete or fail some first"
    )]
    TooManyHeld {
        /// Tasks it holds.
        held: u32,
        /// What it may hold.
        bound: u32,
    },
    /// The backend failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TaskError {
    /// `field` is wrong, for `reason`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// What an idempotent submit compares: everything a submit chose, except
/// when it may start (a retried submit computes its ETA again) and the id.
fn fingerprint(task: &Task) -> u64 {
    let content = format!(
        "{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{:?}",
        task.name,
        task.category.as_str(),
        task.id.queue(),
        task.priority.band(),
        task.args,
        task.kwargs,
        task.max_retries,
        task.soft_ms,
        task.hard_ms,
        task.result_ttl_ms,
        task.cache_result,
    );
    crate::store::fnv1a(content.as_bytes())
}

/// `Ok` when the store accepted a call made under a lease, else `Fenced`.
fn fenced_unless(accepted: bool, id: &TaskId) -> Result<(), TaskError> {
    if accepted {
        Ok(())
    } else {
        Err(TaskError::Fenced(id.to_string()))
    }
}

/// How a leased task ended, as its worker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// With a result (JSON).
    Succeeded(String),
    /// With an error; `retryable` asks for a retry with backoff.
    Failed {
        /// What went wrong.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
        /// Anything else the worker reported (a JSON object), kept with the
        /// error.
        details: Option<serde_json::Value>,
    },
    /// Stopped at the hard time limit.
    TimedOut,
}

impl Finish {
    /// A failure without details.
    pub fn failed(message: impl Into<String>, retryable: bool) -> Self {
        Self::Failed {
            message: message.into(),
            retryable,
            details: None,
        }
    }
}

/// A handle to the task engine.
#[derive(Clone)]
pub struct TaskEngine {
    inner: Arc<Inner>,
}

struct Inner {
    store: TaskStore,
    config: TaskConfig,
    /// Wakes this process's idle workers when it submits, naming the queue
    /// (a watch channel: a wake-up is never lost between a worker's empty
    /// lease and its wait).
    submitted: watch::Sender<Option<QueueName>>,
    /// Cancels asked for through this process, for its running handlers.
    cancels: tokio::sync::broadcast::Sender<TaskId>,
    /// The lease secrets' signer, read from the store once (a failed read
    /// is tried again by the next caller) and re-checked by
    /// [`TaskEngine::refresh_signer`].
    signer: SignerCell,
}

impl TaskEngine {
    /// An engine over `store`.
    pub fn new(store: TaskStore, config: TaskConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                submitted: watch::Sender::new(None),
                cancels: tokio::sync::broadcast::Sender::new(256),
                signer: SignerCell::default(),
            }),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &TaskConfig {
        &self.inner.config
    }

    /// Where tasks are kept.
    pub fn store(&self) -> &TaskStore {
        &self.inner.store
    }

    /// Validates and stores a task; it is queued (or scheduled) when this
    /// returns.
    pub async fn submit(&self, new: NewTask, deadline: Deadline) -> Result<Task, TaskError> {
        let (task, delay) = self.prepare(new)?;
        self.store_task(task, delay, deadline).await
    }

    /// Stores a prepared task: queued (or scheduled) now, or PENDING on
    /// the dependencies that have not ended. The dependencies are
    /// registered first, so an end after that releases the task; one that
    /// ended in between is caught by the check after the store.
    async fn store_task(
        &self,
        mut task: Task,
        delay: Duration,
        deadline: Deadline,
    ) -> Result<Task, TaskError> {
        let c = &self.inner.config;
        let store = &self.inner.store;
        let mut waiting = Vec::new();
        for (i, dep) in task.depends_on.iter().enumerate() {
            let dep_id =
                TaskId::parse(dep).map_err(|e| TaskError::invalid("depends_on", e.to_string()))?;
            match store.depend_on(&dep_id, &task.id, deadline).await? {
                DependReply::Waiting => waiting.push(dep_id),
                DependReply::Ended(State::Succeeded) => {}
                DependReply::Missing => {
                    return Err(TaskError::invalid(
                        &format!("depends_on[{i}]"),
                        format!("no task {dep} (unknown, or its result expired)"),
                    ));
                }
                DependReply::Ended(state) => {
                    return Err(TaskError::FailedPrecondition(format!(
                        "dependency {dep} already ended {}: the task could never run",
                        state.as_str().to_uppercase()
                    )));
                }
            }
        }
        if waiting.is_empty() {
            store.submit(&task, delay, c.limits, deadline).await?;
            self.inner.submitted.send_replace(Some(task.id.queue()));
            return Ok(task);
        }
        store
            .submit_pending(&task, &waiting, c.limits, deadline)
            .await?;
        task.state = State::Pending;
        for dep in &waiting {
            if let Ok(d) = self.get(dep.as_str(), deadline).await
                && d.state.is_final()
            {
                self.resolve(&task.id, dep.as_str(), d.state.as_str(), deadline)
                    .await?;
            }
        }
        Ok(task)
    }

    /// Dependency `dep` of PENDING task `id` ended in `state`: release or
    /// cancel the task, and, if it was cancelled, its own dependents.
    async fn resolve(
        &self,
        id: &TaskId,
        dep: &str,
        state: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let c = &self.inner.config;
        match self
            .inner
            .store
            .resolve_dependency(id, dep, state, c.limits, deadline)
            .await?
        {
            Some(State::Queued) => {
                self.inner.submitted.send_replace(Some(id.queue()));
            }
            Some(State::Cancelled) => {
                Box::pin(self.release_dependents(id, State::Cancelled, deadline)).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Task `id` ended in `state`: its dependents stop waiting on it (on
    /// Redis; the embedded store does this as the task ends). A process
    /// that dies before this is covered by the recovery sweep's repair.
    pub async fn release_dependents(
        &self,
        id: &TaskId,
        state: State,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        for dependent in self.inner.store.dependents(id, deadline).await? {
            let Ok(dependent) = TaskId::parse(&dependent) else {
                continue;
            };
            self.resolve(&dependent, id.as_str(), state.as_str(), deadline)
                .await?;
        }
        Ok(())
    }

    /// Releases a task's dependents after it ended; a failure is left to
    /// the recovery sweep's repair.
    async fn release_after_end(&self, id: &TaskId, state: State, deadline: Deadline) {
        if let Err(e) = self.release_dependents(id, state, deadline).await {
            tracing::warn!(task = %id, error = %e, "cannot release dependents now; the sweep will");
        }
    }

    /// Repairs releases a dead process did not make: every PENDING task of
    /// `queue` (at most 100 a call) whose dependency has ended is resolved.
    async fn repair_pending(&self, queue: &QueueName, deadline: Deadline) -> Result<(), TaskError> {
        for (id, deps) in self.inner.store.pending_tasks(queue, 100, deadline).await? {
            let Ok(task_id) = TaskId::parse(&id) else {
                continue;
            };
            for dep in deps {
                let state = match self.get(&dep, deadline).await {
                    Ok(d) if d.state.is_final() => d.state.as_str().to_owned(),
                    Ok(_) => continue,
                    Err(TaskError::NotFound(_) | TaskError::InvalidArgument { .. }) => {
                        "gone".to_owned()
                    }
                    Err(e) => return Err(e),
                };
                self.resolve(&task_id, &dep, &state, deadline).await?;
            }
        }
        Ok(())
    }

    /// [`Self::submit`], deduplicated by the task's idempotency key: while
    /// the task first submitted with the key is known, a submit with the
    /// same key and content returns it (`true`: deduplicated), and one with
    /// other content is `AlreadyExists`. Any number of concurrent submits of
    /// one key, on any number of koo processes, store one task.
    pub async fn submit_keyed(
        &self,
        new: NewTask,
        deadline: Deadline,
    ) -> Result<(Task, bool), TaskError> {
        let Some(key) = new.idempotency_key.clone() else {
            return self.submit(new, deadline).await.map(|t| (t, false));
        };
        if key.is_empty() || key.len() > 256 {
            return Err(TaskError::invalid(
                "idempotency_key",
                "must be 1 to 256 bytes",
            ));
        }
        let c = &self.inner.config;
        let store = &self.inner.store;
        let (task, delay) = self.prepare(new)?;
        let fp = format!("{:016x}", fingerprint(&task));
        let now = || crate::store::unix_millis(std::time::SystemTime::now());
        let mut ours = format!("{fp}|{}|{}", task.id, now());
        let mut claim = store
            .claim_idempotency(&key, &ours, c.idempotency_ttl, deadline)
            .await?;
        loop {
            // ours (also when a retried claim call finds its own claim)
            if claim.as_deref().is_none_or(|held| held == ours) {
                // A failure leaves the claim; a later submit finds no task
                // behind it and, once the claim is old enough, takes it over.
                // The store call gets at most half the takeover age, so that
                // a claim is never taken over while its submit may land.
                let submit_deadline = deadline.min(Deadline::after(c.idempotency_takeover / 2));
                let stored = self.store_task(task, delay, submit_deadline).await?;
                return Ok((stored, false));
            }
            let held = claim.unwrap_or_default();
            let mut parts = held.splitn(3, '|');
            let (theirs, id, claimed_ms) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts
                    .next()
                    .and_then(|t| t.parse::<i64>().ok())
                    .unwrap_or(0),
            );
            if theirs != fp {
                return Err(TaskError::AlreadyExists(format!(
                    "idempotency key {} was used for a different task ({id})",
                    crate::quote::quote(&key)
                )));
            }
            // The claimant may be between its claim and its submit: give it
            // a moment to store its task.
            for _ in 0..20 {
                match self.get(id, deadline).await {
                    Ok(existing) => return Ok((existing, true)),
                    Err(TaskError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let age = Duration::from_millis(u64::try_from(now() - claimed_ms).unwrap_or(0));
            if age < c.idempotency_takeover {
                return Err(TaskError::Store(StoreError::Unavailable(format!(
                    "an earlier submit with idempotency key {} (task {id}) has not stored its task yet; retry shortly",
                    crate::quote::quote(&key)
                ))));
            }
            // Its task was never stored (or is long gone): take the claim
            // over, unless another submitter just did.
            ours = format!("{fp}|{}|{}", task.id, now());
            claim = if store
                .swap_idempotency(&key, &held, &ours, c.idempotency_ttl, deadline)
                .await?
            {
                None
            } else {
                store
                    .claim_idempotency(&key, &ours, c.idempotency_ttl, deadline)
                    .await?
            };
        }
    }

    /// Validates and stores a batch in one round trip. Every task is
    /// validated before any is stored (a bad one refuses the batch, naming
    /// its index); then each is stored on its own: the result per task.
    pub async fn submit_many(
        &self,
        news: Vec<NewTask>,
        deadline: Deadline,
    ) -> Result<Vec<Result<Task, TaskError>>, (usize, TaskError)> {
        let c = &self.inner.config;
        let batch = news
            .into_iter()
            .enumerate()
            .map(|(i, new)| self.prepare(new).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let stored = self
            .inner
            .store
            .submit_many(&batch, c.limits, deadline)
            .await
            .map_err(|e| (0, TaskError::from(e)))?;
        let mut out = Vec::with_capacity(batch.len());
        for ((task, _), result) in batch.into_iter().zip(stored) {
            if result.is_ok() {
                self.inner.submitted.send_replace(Some(task.id.queue()));
            }
            out.push(result.map(|()| task).map_err(TaskError::from));
        }
        Ok(out)
    }

    /// Checks `new` as a submit would, without storing anything: a schedule
    /// template is checked when it is saved, not at every tick, where a
    /// refusal would only reach a log. Fields are named under `prefix`.
    pub fn check(&self, new: NewTask, prefix: &str) -> Result<(), TaskError> {
        self.prepare(new).map(drop).map_err(|e| match e {
            TaskError::InvalidArgument { field, reason } => TaskError::InvalidArgument {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        })
    }

    /// A validated task ready to store, and its countdown.
    fn prepare(&self, new: NewTask) -> Result<(Task, Duration), TaskError> {
        let c = &self.inner.config;
        crate::domain::task::check_task_name(&new.name)
            .map_err(|e| TaskError::invalid("name", e))?;
        if new.args.len() + new.kwargs.len() > MAX_ARGUMENTS {
            return Err(TaskError::invalid(
                "args",
                format!(
                    "arguments are {} bytes, over the limit of {MAX_ARGUMENTS}",
                    new.args.len() + new.kwargs.len()
                ),
            ));
        }
        match serde_json::from_str::<serde_json::Value>(&new.args) {
            Ok(serde_json::Value::Array(_)) => {}
            _ => return Err(TaskError::invalid("args", "must be a JSON array")),
        }
        match serde_json::from_str::<serde_json::Value>(&new.kwargs) {
            Ok(serde_json::Value::Object(_)) => {}
            _ => return Err(TaskError::invalid("kwargs", "must be a JSON object")),
        }
        let soft = new.soft_time_limit.unwrap_or(c.soft_time_limit);
        let hard = new.time_limit.unwrap_or(c.time_limit);
        if hard.is_zero() || soft > hard {
            return Err(TaskError::invalid(
                "soft_time_limit",
                "must not exceed the (non-zero) time limit",
            ));
        }
        let result_ttl = new.result_ttl.unwrap_or(c.result_ttl);
        if result_ttl < Duration::from_secs(1) {
            return Err(TaskError::invalid(
                "result_ttl",
                "must be at least 1 s, so that the result can be read",
            ));
        }
        if new.depends_on.len() > 100 {
            return Err(TaskError::invalid("depends_on", "at most 100 dependencies"));
        }
        for (i, dep) in new.depends_on.iter().enumerate() {
            TaskId::parse(dep)
                .map_err(|e| TaskError::invalid(&format!("depends_on[{i}]"), e.to_string()))?;
            if new.depends_on[..i].contains(dep) {
                return Err(TaskError::invalid(
                    &format!("depends_on[{i}]"),
                    "is listed twice",
                ));
            }
        }
        if !new.depends_on.is_empty() && !new.delay.is_zero() {
            return Err(TaskError::invalid(
                "countdown",
                "a task with dependencies runs when they succeed: no countdown or ETA",
            ));
        }
        if let Some(target) = &new.cache_result
            && (target.key.is_empty() || target.key.len() > 1024 || target.ttl_ms == 0)
        {
            return Err(TaskError::invalid(
                "cache_result",
                "needs a key of 1 to 1024 bytes and a positive TTL",
            ));
        }
        let queue = new
            .queue
            .clone()
            .unwrap_or_else(|| new.category.default_queue());
        if !Category::queues().contains(&queue) && !c.extra_queues.contains(&queue) {
            return Err(TaskError::invalid(
                "queue",
                format!(
                    "unknown queue \"{queue}\": tasks go to a category's queue or to one named in KOO_TASK_QUEUES"
                ),
            ));
        }
        let task = Task {
            id: TaskId::generate(&queue),
            name: new.name,
            category: new.category,
            priority: new.priority,
            args: new.args,
            kwargs: new.kwargs,
            // Redis schedules in whole milliseconds.
            state: if new.delay < Duration::from_millis(1) {
                State::Queued
            } else {
                State::Scheduled
            },
            attempts: 0,
            token: 0,
            cache_result: new.cache_result.as_ref().map(CacheTarget::to_json),
            depends_on: new.depends_on.clone(),
            schedule: new.schedule.clone(),
            schedule_tick_ms: new.schedule_tick_ms,
            max_retries: new.max_retries.unwrap_or(c.default_max_retries),
            worker: None,
            progress: None,
            result: None,
            error: None,
            created_ms: crate::store::unix_millis(std::time::SystemTime::now()),
            started_ms: None,
            finished_ms: None,
            soft_ms: soft.as_millis() as u64,
            hard_ms: hard.as_millis() as u64,
            result_ttl_ms: result_ttl.as_millis() as u64,
            log: Vec::new(),
        };
        Ok((task, new.delay))
    }

    /// Reads a task.
    pub async fn get(&self, id: &str, deadline: Deadline) -> Result<Task, TaskError> {
        let id = TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
        self.inner
            .store
            .get(&id, deadline)
            .await?
            .ok_or_else(|| TaskError::NotFound(id.to_string()))
    }

    /// The lease secrets' signer: its key read from the store (created
    /// there by the first koo process that needs it) once per process.
    pub async fn signer(&self, deadline: Deadline) -> Result<Arc<Signer>, TaskError> {
        if let Some(s) = self.inner.signer.get() {
            return Ok(s);
        }
        let key = self
            .inner
            .store
            .lease_key(&Signer::fresh_key()?, deadline)
            .await?;
        Ok(self.inner.signer.adopt(&key))
    }

    /// Writes this process's key of lease secrets back when the shared
    /// store lost it, or adopts the one stored since: after Redis restarts
    /// empty, every process converges on one key within one refresh.
    pub async fn refresh_signer(&self, deadline: Deadline) -> Result<(), TaskError> {
        let Some(current) = self.inner.signer.get() else {
            return Ok(());
        };
        if self.inner.store.is_shared() {
            let key = self
                .inner
                .store
                .lease_key(current.stored(), deadline)
                .await?;
            self.inner.signer.adopt(&key);
        }
        Ok(())
    }

    /// The secret of `task`'s current lease (see [`super::remote::secret`]).
    pub async fn lease_secret(&self, task: &Task, deadline: Deadline) -> Result<String, TaskError> {
        Ok(self.signer(deadline).await?.of_lease(task))
    }

    /// Leases a task of `queue` whose name is in `names` (`*`: any).
    pub async fn lease(
        &self,
        queue: &QueueName,
        worker: &str,
        names: &[&str],
        deadline: Deadline,
    ) -> Result<Option<Task>, TaskError> {
        let c = &self.inner.config;
        Ok(self
            .inner
            .store
            .lease(queue, worker, c.lease, names, c.limits, deadline)
            .await?)
    }

    /// Extends the lease held with `token`; `true` when a cancel was asked
    /// for (the holder should stop the task).
    pub async fn heartbeat(
        &self,
        id: &TaskId,
        token: u32,
        deadline: Deadline,
    ) -> Result<bool, TaskError> {
        match self
            .inner
            .store
            .heartbeat(id, token, self.inner.config.lease, deadline)
            .await?
        {
            Beat::Held => Ok(false),
            Beat::CancelRequested => Ok(true),
            Beat::Lost => Err(TaskError::Fenced(id.to_string())),
        }
    }

    /// Cancels a task: waiting, it ends CANCELLED at once; running, its
    /// worker is told to stop (at once in this process, at its next
    /// heartbeat elsewhere) and the task ends CANCELLED unless it succeeds
    /// first. The task as it is after the call.
    pub async fn cancel(
        &self,
        id: &str,
        reason: &str,
        deadline: Deadline,
    ) -> Result<Task, TaskError> {
        let task_id =
            TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
        if reason.len() > 1024 {
            return Err(TaskError::invalid("reason", "must be at most 1024 bytes"));
        }
        let reason = if reason.is_empty() {
            "cancelled by request"
        } else {
            reason
        };
        match self
            .inner
            .store
            .cancel(&task_id, reason, self.inner.config.limits, deadline)
            .await?
        {
            CancelReply::Missing => return Err(TaskError::NotFound(id.to_owned())),
            CancelReply::Ended(state) => {
                return Err(TaskError::FailedPrecondition(format!(
                    "task {id} already ended {}",
                    state.as_str().to_uppercase()
                )));
            }
            CancelReply::Requested => {
                // The reply shows the task as the cancel found it (running,
                // told to stop): read before this process's own worker is
                // told, which may end the task at once.
                let task = self.get(id, deadline).await;
                let _ = self.inner.cancels.send(task_id.clone());
                return task;
            }
            CancelReply::Cancelled => {
                self.release_after_end(&task_id, State::Cancelled, deadline)
                    .await;
            }
        }
        self.get(id, deadline).await
    }

    /// A subscription to cancels asked for through this process, so that a
    /// running handler here is told at once.
    pub fn cancels(&self) -> tokio::sync::broadcast::Receiver<TaskId> {
        self.inner.cancels.subscribe()
    }

    /// Runs a FAILED, TIMED_OUT or CANCELLED task again under its id, with
    /// a fresh retry budget; its attempt log keeps the earlier attempts.
    pub async fn retry(&self, id: &str, deadline: Deadline) -> Result<Task, TaskError> {
        let task_id =
            TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
        match self
            .inner
            .store
            .retry(&task_id, self.inner.config.limits, deadline)
            .await?
        {
            RetryReply::Missing => Err(TaskError::NotFound(id.to_owned())),
            RetryReply::NotEnded(state) => Err(TaskError::FailedPrecondition(format!(
                "task {id} is {}: only FAILED, TIMED_OUT or CANCELLED tasks can be retried",
                state.as_str().to_uppercase()
            ))),
            RetryReply::Queued => {
                self.inner.submitted.send_replace(Some(task_id.queue()));
                self.get(id, deadline).await
            }
        }
    }

    /// Queues dead letters again (as [`Self::retry`]): up to `limit` of each
    /// of `queues`, oldest first. The ids requeued.
    pub async fn requeue_dead_letters(
        &self,
        queues: &[QueueName],
        limit: usize,
        deadline: Deadline,
    ) -> Result<Vec<String>, TaskError> {
        let mut requeued = Vec::new();
        for queue in queues {
            for id in self
                .inner
                .store
                .dead_letters(queue, limit, deadline)
                .await?
            {
                match self.retry(&id, deadline).await {
                    Ok(_) => requeued.push(id),
                    // gone or already requeued meanwhile
                    Err(TaskError::NotFound(_) | TaskError::FailedPrecondition(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(requeued)
    }

    /// Removes tasks that ended more than `older_than` ago from history and
    /// storage in `queues`; what was removed. Dead letters younger than the
    /// dead-letter TTL stay unless `include_dead` (older ones have expired:
    /// their entries go either way).
    pub async fn cleanup(
        &self,
        queues: &[QueueName],
        older_than: Duration,
        include_dead: bool,
        deadline: Deadline,
    ) -> Result<Vec<(QueueName, Trimmed)>, TaskError> {
        let now = crate::store::unix_millis(std::time::SystemTime::now());
        let ago =
            |d: Duration| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let limits = self.inner.config.limits;
        let before_ms = ago(older_than);
        let expired_ms = ago(limits.dead_ttl);
        let dead_before_ms = if include_dead {
            before_ms.max(expired_ms)
        } else {
            expired_ms
        };
        let mut out = Vec::with_capacity(queues.len());
        for queue in queues {
            let mut total = Trimmed::default();
            // at most 1000 history entries per call; a backlog takes more
            for _ in 0..1000 {
                let t = self
                    .inner
                    .store
                    .trim(queue, before_ms, dead_before_ms, limits, deadline)
                    .await?;
                total.history += t.history;
                total.dead += t.dead;
                total.events += t.events;
                if t.history < 1000 {
                    break;
                }
            }
            out.push((queue.clone(), total));
        }
        Ok(out)
    }

    /// Records progress (JSON `{percent, message, metadata}`).
    pub async fn progress(
        &self,
        id: &TaskId,
        token: u32,
        progress: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let ok = self
            .inner
            .store
            .progress(id, token, progress, self.inner.config.limits, deadline)
            .await?;
        fenced_unless(ok, id)
    }

    /// Ends the attempt held with `token`; the state the task moved to.
    pub async fn finish(
        &self,
        task: &Task,
        token: u32,
        worker: &str,
        finish: Finish,
        deadline: Deadline,
    ) -> Result<State, TaskError> {
        let (outcome, entry) = self.outcome(task, worker, &finish);
        let state = self
            .inner
            .store
            .finish(
                &task.id,
                token,
                &outcome,
                &entry,
                self.inner.config.limits,
                deadline,
            )
            .await?
            .ok_or_else(|| TaskError::Fenced(task.id.to_string()))?;
        let (state, waited_on) = state;
        if waited_on {
            self.release_after_end(&task.id, state, deadline).await;
        }
        Ok(state)
    }

    /// [`Self::finish`], then a lease of the next task of the same queue
    /// whose name is in `names`, in one round trip (a busy worker's path).
    pub async fn finish_and_lease(
        &self,
        task: &Task,
        token: u32,
        worker: &str,
        finish: Finish,
        names: &[&str],
        deadline: Deadline,
    ) -> Result<(State, Option<Task>), TaskError> {
        let c = &self.inner.config;
        let (outcome, entry) = self.outcome(task, worker, &finish);
        let next = LeaseAsk {
            worker,
            lease: c.lease,
            names,
        };
        let ((state, waited_on), leased) = self
            .inner
            .store
            .finish_and_lease(&task.id, token, &outcome, &entry, &next, c.limits, deadline)
            .await?
            .ok_or_else(|| TaskError::Fenced(task.id.to_string()))?;
        if waited_on {
            self.release_after_end(&task.id, state, deadline).await;
        }
        Ok((state, leased))
    }

    /// What the store records for a finish: the outcome and the attempt's
    /// log entry.
    fn outcome(&self, task: &Task, worker: &str, finish: &Finish) -> (Outcome, String) {
        let error = |message: &str, retryable: bool, details: Option<&serde_json::Value>| {
            let mut e = serde_json::json!({ "message": message, "retryable": retryable });
            if let Some(d) = details {
                e["details"] = d.clone();
            }
            e.to_string()
        };
        let (outcome, log) = match finish {
            Finish::Succeeded(result) => (Outcome::Succeeded(result.clone()), "succeeded"),
            Finish::Failed {
                message,
                retryable: true,
                details,
            } => (
                Outcome::Retry {
                    error: error(message, true, details.as_ref()),
                    delay: self.inner.config.backoff.delay(task.attempts),
                },
                "failed",
            ),
            Finish::Failed {
                message,
                retryable: false,
                details,
            } => (
                Outcome::Failed(error(message, false, details.as_ref())),
                "failed",
            ),
            Finish::TimedOut => (
                Outcome::TimedOut(error("hard time limit reached", false, None)),
                "timed_out",
            ),
        };
        let message = match finish {
            Finish::Failed { message, .. } => Some(message.as_str()),
            Finish::TimedOut => Some("hard time limit reached"),
            Finish::Succeeded(_) => None,
        };
        let entry = serde_json::json!({
            "attempt": task.attempts,
            "worker": worker,
            "started_ms": task.started_ms,
            "outcome": log,
            "error": message,
        })
        .to_string();
        (outcome, entry)
    }

    /// Hands a running task back to its queue at once, its attempt given
    /// back (the worker is stopping before the task ended).
    pub async fn release(
        &self,
        task: &Task,
        worker: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let why = "the worker stopped before the task ended; it runs again";
        self.give_back(task, worker, why, deadline).await
    }

    /// Hands back, its attempt given back, a task pushed to an external
    /// worker whose stream vanished before the worker said a word about it:
    /// it never started there (see `remote::Session` for the rule).
    pub async fn release_unstarted(
        &self,
        task: &Task,
        worker: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let why = "pushed to a worker whose stream closed before it said anything about the task: never started; it runs again";
        self.give_back(task, worker, why, deadline).await
    }

    /// The `release` transition: queued again in its original place, the
    /// attempt given back, logged as `handed_back` with `why`.
    async fn give_back(
        &self,
        task: &Task,
        worker: &str,
        why: &str,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let entry = serde_json::json!({
            "attempt": task.attempts,
            "worker": worker,
            "started_ms": task.started_ms,
            "outcome": "handed_back",
            "error": why,
        })
        .to_string();
        let ok = self
            .inner
            .store
            .release(
                &task.id,
                task.token,
                &entry,
                self.inner.config.limits,
                deadline,
            )
            .await?;
        fenced_unless(ok, &task.id)
    }

    /// Ends the lease held with `token` now, as if it had lapsed: the
    /// attempt counts and the task goes back to its queue (or to a final
    /// state when its retries are spent), logged as lost. For a worker whose
    /// connection dropped: the recovery sweep would do the same a lease later.
    pub async fn abandon(
        &self,
        id: &TaskId,
        token: u32,
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        let c = &self.inner.config;
        let store = &self.inner.store;
        match store.heartbeat(id, token, Duration::ZERO, deadline).await? {
            Beat::Lost => return Err(TaskError::Fenced(id.to_string())),
            Beat::Held | Beat::CancelRequested => {}
        }
        store
            .recover(&id.queue(), c.acks_late, c.limits, deadline)
            .await?;
        Ok(())
    }

    /// Depths and counters of `queues`.
    pub async fn queue_stats(
        &self,
        queues: &[QueueName],
        deadline: Deadline,
    ) -> Result<Vec<(QueueName, QueueStats)>, TaskError> {
        let stats = queues.iter().map(|q| async move {
            self.inner
                .store
                .queue_stats(q, deadline)
                .await
                .map(|s| (q.clone(), s))
        });
        Ok(futures::future::try_join_all(stats).await?)
    }

    /// Pings the task store and returns the round trip.
    pub async fn ping(&self, deadline: Deadline) -> Result<Duration, TaskError> {
        Ok(self.inner.store.ping(deadline).await?)
    }

    /// A worker's subscription to this process's submits.
    pub fn submits(&self) -> watch::Receiver<Option<QueueName>> {
        self.inner.submitted.subscribe()
    }

    /// Waits until this process submits something since `submits` last
    /// looked, or `timeout` passes: the queue submitted to, if any.
    pub async fn wait_for_work(
        &self,
        submits: &mut watch::Receiver<Option<QueueName>>,
        timeout: Duration,
    ) -> Option<QueueName> {
        match tokio::time::timeout(timeout, submits.changed()).await {
            Ok(Ok(())) => submits.borrow_and_update().clone(),
            _ => None,
        }
    }

    /// Recovers lapsed leases of `queues` every sweep interval until `stop`.
    pub async fn run_recovery(self, queues: Vec<QueueName>, stop: CancellationToken) {
        let c = self.inner.config.clone();
        let mut tick = tokio::time::interval(c.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for queue in &queues {
                // One call handles at most 100 lapsed leases and 100 due
                // tasks; a backlog is worked off in a few more calls.
                for _ in 0..50 {
                    let deadline = Deadline::after(c.sweep_interval.max(Duration::from_secs(1)));
                    match self
                        .inner
                        .store
                        .recover(queue, c.acks_late, c.limits, deadline)
                        .await
                    {
                        Ok(n) if n < 100 => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(queue = %queue, error = %e, "cannot recover lapsed leases");
                            break;
                        }
                    }
                }
                let deadline = Deadline::after(c.sweep_interval.max(Duration::from_secs(1)));
                if let Err(e) = self.repair_pending(queue, deadline).await {
                    tracing::warn!(queue = %queue, error = %e, "cannot check pending tasks' dependencies");
                }
            }
        }
    }
}
