//! The built-in worker pool: leases tasks, runs their handlers under soft and
//! hard time limits, heartbeats while they run, and reports how they ended.
//!
//! Each handler runs in a task of its own, so that the slot can abandon it:
//! at the soft limit the handler's cancellation token fires; at the hard
//! limit the task is aborted (a handler busy on `spawn_blocking` keeps its
//! thread, but the slot moves on and the task ends TIMED_OUT). If a heartbeat
//! is refused, the lease is someone else's: the handler is aborted and
//! nothing is reported, since the new holder owns the outcome.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::engine::{Finish, TaskEngine, TaskError};
use crate::cache::{Cache, CacheError, NewEntry, Value};
use crate::domain::task::{CacheTarget, QueueName, Task, TaskId};
use crate::store::Deadline;
use crate::store::StoreError;
use crate::store::tasks::WorkerRecord;

/// A handler's failure; `retryable` asks for another attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// What went wrong.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry will fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// What a handler gets: the task, a token that fires at the soft time limit
/// (or on cancellation), and a way to report progress.
pub struct TaskContext {
    /// The task as leased (attempts counts this attempt).
    pub task: Task,
    /// Fires when the handler should stop.
    pub cancel: CancellationToken,
    engine: TaskEngine,
}

impl TaskContext {
    /// Reports progress; an error means the lease is gone and the handler
    /// should stop.
    pub async fn progress(
        &self,
        percent: f64,
        message: &str,
        metadata: serde_json::Value,
    ) -> Result<(), TaskError> {
        let progress =
            serde_json::json!({ "percent": percent, "message": message, "metadata": metadata });
        self.engine
            .progress(
                &self.task.id,
                self.task.token,
                &progress.to_string(),
                Deadline::after(Duration::from_secs(5)),
            )
            .await
    }

    /// The results of the tasks this one depended on (each SUCCEEDED before
    /// it was queued), in `depends_on` order: `(id, result JSON)`, the
    /// result `None` once it has expired (`RESULT_EXPIRES` after its end).
    pub async fn dependency_results(&self) -> Vec<(String, Option<serde_json::Value>)> {
        let mut out = Vec::with_capacity(self.task.depends_on.len());
        for id in &self.task.depends_on {
            let result = self
                .engine
                .get(id, Deadline::after(Duration::from_secs(5)))
                .await
                .ok()
                .and_then(|t| t.result)
                .and_then(|r| serde_json::from_str(&r).ok());
            out.push((id.clone(), result));
        }
        out
    }
}

/// A handler's future.
pub type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<serde_json::Value, HandlerError>> + Send>>;

/// A task handler: an async function of the task's context.
pub type Handler = Arc<dyn Fn(TaskContext) -> HandlerFuture + Send + Sync>;

/// Handlers by task name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
    /// Where results of tasks that ask for it are cached.
    cache: Option<Cache>,
}

impl Registry {
    /// Results of tasks submitted with a cache target go to `cache`.
    pub fn set_cache(&mut self, cache: Cache) {
        self.cache = Some(cache);
    }

    /// Registers `handler` for `name`.
    pub fn register<F, Fut>(&mut self, name: &str, handler: F)
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, HandlerError>> + Send + 'static,
    {
        self.handlers
            .insert(name.to_owned(), Arc::new(move |ctx| Box::pin(handler(ctx))));
    }

    /// The names served, for leasing.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.handlers.keys().cloned().collect();
        names.sort();
        names
    }
}

/// A pool of worker slots.
pub struct WorkerPool {
    engine: TaskEngine,
    registry: Arc<Registry>,
    queues: Vec<QueueName>,
    concurrency: usize,
    id: String,
}

impl WorkerPool {
    /// `concurrency` slots serving `queues` with `registry`'s handlers.
    pub fn new(
        engine: TaskEngine,
        registry: Registry,
        queues: Vec<QueueName>,
        concurrency: usize,
    ) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "koo".to_owned());
        Self {
            engine,
            registry: Arc::new(registry),
            queues,
            concurrency: concurrency.max(1),
            id: format!(
                "{host}:{}:{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }

    /// This pool's worker id (slots append their number).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs every slot until `stop`; a slot lets its current task finish
    /// within the shutdown grace, or hands it back to its queue at once.
    pub async fn run(self, stop: CancellationToken) {
        let running = Arc::new(AtomicU32::new(0));
        let mut slots = tokio::task::JoinSet::new();
        for slot in 0..self.concurrency {
            let worker = format!("{}/{slot}", self.id);
            let engine = self.engine.clone();
            let registry = self.registry.clone();
            let queues = self.queues.clone();
            let stop = stop.clone();
            let running = running.clone();
            slots.spawn(async move {
                run_slot(engine, registry, queues, worker, slot, running, stop).await
            });
        }
        let presence = tokio::spawn(self.announce(running, stop.clone()));
        while slots.join_next().await.is_some() {}
        let _ = presence.await;
        let deadline = Deadline::after(Duration::from_secs(2));
        if let Err(e) = self.engine.store().retire_worker(&self.id, deadline).await {
            tracing::debug!(error = %e, "cannot remove this worker's presence record; it expires");
        }
    }

    /// Says this pool is alive every third of a lease (the record lives a
    /// lease), so that health checks see live workers and lose dead ones
    /// within a lease.
    fn announce(
        &self,
        running: Arc<AtomicU32>,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let engine = self.engine.clone();
        let lease = engine.config().lease;
        let mut record = WorkerRecord {
            id: self.id.clone(),
            slots: self.concurrency as u32,
            running: 0,
            queues: self.queues.iter().map(|q| q.to_string()).collect(),
            names: self.registry.names(),
            started_ms: crate::store::unix_millis(std::time::SystemTime::now()),
            seen_ms: 0,
            kind: "builtin".to_owned(),
            name: String::new(),
            held: Vec::new(),
            peer: String::new(),
        };
        async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                record.running = running.load(Ordering::Relaxed);
                record.seen_ms = crate::store::unix_millis(std::time::SystemTime::now());
                let deadline = Deadline::after(lease / 3);
                if let Err(e) = engine
                    .store()
                    .announce_worker(&record, lease, deadline)
                    .await
                {
                    tracing::debug!(error = %e, "cannot announce this worker");
                }
            }
        }
    }
}

async fn run_slot(
    engine: TaskEngine,
    registry: Arc<Registry>,
    queues: Vec<QueueName>,
    worker: String,
    slot: usize,
    running: Arc<AtomicU32>,
    stop: CancellationToken,
) {
    let names = registry.names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let poll = engine.config().poll_interval;
    // Slots start at different queues and rotate, so that no queue starves.
    let mut next = slot;
    let mut submits = engine.submits();
    // When each queue was last found empty. It is skipped until the poll
    // interval has passed or a local submit names it, so that a busy slot
    // spends one lease call per task rather than one per queue, and still
    // looks at every queue at least once per poll interval.
    let mut empty: Vec<Option<Instant>> = vec![None; queues.len()];
    // The queue a local submit just named: looked at first, so that a task
    // submitted to an idle process starts after one lease call.
    let mut hint: Option<usize> = None;
    // A task leased by the call that reported the previous one.
    let mut carried: Option<Task> = None;
    // Cancels asked for through this process: one subscription per slot,
    // not one per task (messages about other tasks are skipped).
    let mut cancels = engine.cancels();
    let position = |q: Option<QueueName>| q.and_then(|q| queues.iter().position(|x| *x == q));
    while !stop.is_cancelled() {
        if submits.has_changed().unwrap_or(false) {
            hint = position(submits.borrow_and_update().clone());
        }
        if let Some(h) = hint {
            empty[h] = None;
        }
        let mut leased = carried.take();
        let start = next;
        let order = hint
            .take()
            .into_iter()
            .chain((0..queues.len()).map(|i| (start + i) % queues.len()));
        for (i, q) in order.enumerate() {
            if leased.is_some() || stop.is_cancelled() {
                break;
            }
            if empty[q].is_some_and(|at| at.elapsed() < poll) {
                continue;
            }
            let queue = &queues[q];
            match engine
                .lease(
                    queue,
                    &worker,
                    &names,
                    Deadline::after(Duration::from_secs(5)),
                )
                .await
            {
                Ok(Some(task)) => {
                    leased = Some(task);
                    // a hinted lease does not move the rotation
                    if i > 0 || q == start {
                        next = (q + 1) % queues.len();
                    }
                }
                Ok(None) => empty[q] = Some(Instant::now()),
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "cannot lease; retrying in a second");
                    // or as soon as the store answers again after an outage
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = engine.store().recovered() => {}
                    }
                    break;
                }
            }
        }
        match leased {
            Some(task) => {
                running.fetch_add(1, Ordering::Relaxed);
                let ended = execute(&engine, &registry, &task, &mut cancels, &stop).await;
                running.fetch_sub(1, Ordering::Relaxed);
                let finish = match ended {
                    Ended::Finished(finish) => {
                        cache_result(registry.cache.as_ref(), &task, finish).await
                    }
                    Ended::Lost => continue,
                    Ended::HandBack => {
                        let deadline = Deadline::after(Duration::from_secs(5));
                        match engine.release(&task, &worker, deadline).await {
                            Ok(()) => {
                                tracing::info!(task = %task.id, "stopping: task handed back to its queue")
                            }
                            Err(e) => outcome_not_recorded(&task, e),
                        }
                        continue;
                    }
                };
                // When every other queue was just found empty and no local
                // submit names one, this slot would come back to this queue
                // anyway: report and take its next task in one call.
                let q = position(Some(task.id.queue()));
                let chain = q.is_some_and(|q| {
                    (0..queues.len())
                        .filter(|i| *i != q)
                        .all(|i| empty[i].is_some_and(|at| at.elapsed() < poll))
                }) && !submits.has_changed().unwrap_or(true)
                    && !stop.is_cancelled();
                if chain {
                    carried = report_and_lease(&engine, &task, &worker, finish, &names).await;
                    if carried.is_none()
                        && let Some(q) = q
                    {
                        empty[q] = Some(Instant::now());
                    }
                } else {
                    report(&engine, &task, &worker, finish).await;
                }
            }
            None => {
                // until the first empty mark expires, unless a submit comes
                let wait = empty
                    .iter()
                    .flatten()
                    .map(|at| poll.saturating_sub(at.elapsed()))
                    .min()
                    .unwrap_or(poll);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    woke = engine.wait_for_work(&mut submits, wait) => hint = position(woke),
                }
            }
        }
    }
    // stopping with a task leased by the last report: hand it back at once
    if let Some(task) = carried {
        let deadline = Deadline::after(Duration::from_secs(5));
        if let Err(e) = engine.release(&task, &worker, deadline).await {
            outcome_not_recorded(&task, e);
        }
    }
}

/// Writes a successful result to the cache when the task asks for it,
/// before the success is reported: a task that reads SUCCEEDED has its
/// value cached. A cache failure fails the attempt (retryably when the cache
/// is unreachable).
pub(crate) async fn cache_result(cache: Option<&Cache>, task: &Task, finish: Finish) -> Finish {
    let (Finish::Succeeded(result), Some(target)) = (
        &finish,
        task.cache_result
            .as_deref()
            .and_then(CacheTarget::from_json),
    ) else {
        return finish;
    };
    let Some(cache) = cache else {
        return Finish::failed(
            "this worker has no cache to write the result to (cache_result needs REDIS_URL)",
            false,
        );
    };
    let entry = NewEntry {
        level: target.level,
        key: target.key,
        value: Value::Json(result.clone()),
        ttl: Some(Duration::from_millis(target.ttl_ms)),
    };
    match cache
        .set(entry, Deadline::after(Duration::from_secs(5)))
        .await
    {
        Ok(_) => finish,
        Err(e) => Finish::failed(
            format!("the result could not be cached: {e}"),
            matches!(
                e,
                CacheError::Store(StoreError::Unavailable(_) | StoreError::DeadlineExceeded)
            ),
        ),
    }
}

/// How a run of a leased task ended.
enum Ended {
    /// The handler ended (or hit a time limit): report it.
    Finished(Finish),
    /// The lease was lost: the new holder owns the outcome.
    Lost,
    /// The worker is stopping and the handler did not end within the
    /// shutdown grace: hand the task back.
    HandBack,
}

/// Runs one leased task to its end. When `stop` fires, the handler gets the
/// shutdown grace to end, then is abandoned and the task handed back.
async fn execute(
    engine: &TaskEngine,
    registry: &Registry,
    task: &Task,
    cancels: &mut tokio::sync::broadcast::Receiver<TaskId>,
    stop: &CancellationToken,
) -> Ended {
    let token = task.token;
    // Cancels sent before this run began are about earlier runs (a cancel
    // for this one since its lease is also in the store: the heartbeat
    // carries it).
    while !matches!(
        cancels.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Empty
            | tokio::sync::broadcast::error::TryRecvError::Closed)
    ) {}
    let Some(handler) = registry.handlers.get(&task.name).cloned() else {
        // Leasing filters by name, so this is a registry that changed.
        return Ended::Finished(Finish::failed(
            format!("no handler for {}", task.name),
            true,
        ));
    };
    let cancel = CancellationToken::new();
    let ctx = TaskContext {
        task: task.clone(),
        cancel: cancel.clone(),
        engine: engine.clone(),
    };
    let mut running = tokio::spawn(handler(ctx));
    let soft = tokio::time::sleep(Duration::from_millis(task.soft_ms));
    let hard = tokio::time::sleep(Duration::from_millis(task.hard_ms));
    // armed when `stop` fires
    let hand_back = tokio::time::sleep(Duration::ZERO);
    let mut stopping = false;
    // armed when a cancel is asked for: the handler's token fires at once,
    // and a handler still running at the end of the grace is abandoned
    let cancel_grace = tokio::time::sleep(Duration::ZERO);
    let mut cancelling = false;
    let mut cancels_open = true;
    tokio::pin!(soft, hard, hand_back, cancel_grace);
    let start_cancel = |cancelling: &mut bool, grace: std::pin::Pin<&mut tokio::time::Sleep>| {
        if !*cancelling {
            *cancelling = true;
            tracing::info!(task = %task.id, "cancel asked for; asking the handler to stop");
            cancel.cancel();
            grace.reset(tokio::time::Instant::now() + engine.config().cancel_grace);
        }
    };
    let mut soft_fired = task.soft_ms == 0;
    // The first heartbeat is due a third of a lease from now. (Not
    // `interval` + its immediate first tick: a timer due "now" still waits
    // for the timer wheel's next millisecond, a millisecond per task.)
    let period = engine.config().lease / 3;
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut last_beat = tokio::time::Instant::now();
    let finish = loop {
        tokio::select! {
            joined = &mut running => {
                break match joined {
                    Ok(Ok(result)) => Finish::Succeeded(result.to_string()),
                    Ok(Err(e)) => Finish::failed(e.message, e.retryable),
                    Err(e) if e.is_panic() => Finish::failed("the handler panicked".to_owned(), true),
                    Err(_) => Finish::failed("the handler was aborted".to_owned(), true),
                };
            }
            _ = &mut soft, if !soft_fired => {
                soft_fired = true;
                tracing::info!(task = %task.id, "soft time limit reached; asking the handler to stop");
                cancel.cancel();
            }
            _ = &mut hard, if task.hard_ms > 0 => {
                running.abort();
                tracing::warn!(task = %task.id, "hard time limit reached; handler abandoned");
                break Finish::TimedOut;
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                let grace = engine.config().shutdown_grace;
                hand_back.as_mut().reset(tokio::time::Instant::now() + grace);
            }
            _ = &mut hand_back, if stopping => {
                running.abort();
                if cancelling {
                    // a cancelled task is not handed back to run again
                    break Finish::failed("the worker stopped while the task was being cancelled".to_owned(), false);
                }
                return Ended::HandBack;
            }
            got = cancels.recv(), if cancels_open && !cancelling => match got {
                Ok(id) if id == task.id => start_cancel(&mut cancelling, cancel_grace.as_mut()),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                // the heartbeat still carries cancels
                Err(tokio::sync::broadcast::error::RecvError::Closed) => cancels_open = false,
            },
            _ = &mut cancel_grace, if cancelling => {
                running.abort();
                tracing::warn!(task = %task.id, "the handler did not stop after a cancel; abandoned");
                break Finish::failed("the handler did not stop within the cancel grace".to_owned(), false);
            }
            _ = beat.tick() => {
                match engine.heartbeat(&task.id, token, Deadline::after(engine.config().lease / 3)).await {
                    Ok(cancel_asked) => {
                        last_beat = tokio::time::Instant::now();
                        if cancel_asked {
                            start_cancel(&mut cancelling, cancel_grace.as_mut());
                        }
                    }
                    Err(TaskError::Fenced(_)) => {
                        running.abort();
                        tracing::warn!(task = %task.id, "lease lost; handler abandoned, the new holder owns the outcome");
                        return Ended::Lost;
                    }
                    // A whole lease without a heartbeat: the lease has lapsed
                    // and the task may run elsewhere; stop running it here.
                    Err(e) if last_beat.elapsed() >= engine.config().lease => {
                        running.abort();
                        tracing::warn!(task = %task.id, error = %e, "no heartbeat for a whole lease; handler abandoned");
                        return Ended::Lost;
                    }
                    Err(e) => tracing::warn!(task = %task.id, error = %e, "heartbeat failed; will retry"),
                }
            }
        }
    };
    Ended::Finished(finish)
}

/// Reports how an attempt ended and leases the next task of its queue in
/// the same call; the next task, if there is one. Failures are handled as
/// by [`report`].
async fn report_and_lease(
    engine: &TaskEngine,
    task: &Task,
    worker: &str,
    finish: Finish,
    names: &[&str],
) -> Option<Task> {
    let deadline = Deadline::after(Duration::from_secs(5));
    match engine
        .finish_and_lease(task, task.token, worker, finish, names, deadline)
        .await
    {
        Ok((state, next)) => {
            tracing::debug!(task = %task.id, state = state.as_str(), "task attempt ended");
            next
        }
        Err(e) => {
            outcome_not_recorded(task, e);
            None
        }
    }
}

fn outcome_not_recorded(task: &Task, e: TaskError) {
    match e {
        TaskError::Fenced(_) => {
            tracing::warn!(task = %task.id, "completion refused: the lease lapsed")
        }
        e => tracing::warn!(
            task = %task.id,
            error = %e,
            "cannot report the outcome; the lease will lapse and the task run again"
        ),
    }
}

/// Reports how an attempt ended. A refusal means the lease lapsed and the
/// new holder owns the outcome; any other failure leaves the lease to lapse,
/// and the task runs again.
async fn report(engine: &TaskEngine, task: &Task, worker: &str, finish: Finish) {
    let deadline = Deadline::after(Duration::from_secs(5));
    match engine
        .finish(task, task.token, worker, finish, deadline)
        .await
    {
        Ok(state) => tracing::debug!(task = %task.id, state = state.as_str(), "task attempt ended"),
        Err(e) => outcome_not_recorded(task, e),
    }
}
