//! Submits: a new task validated into a stored one (its countdown, its
//! queue, its limits), one at a time or as a batch.

use std::time::{Duration, SystemTime};

use super::{TaskConfig, TaskEngine};
use crate::domain::task::{
    CacheTarget, Category, MAX_RETRIES, Priority, QueueName, State, Task, TaskId, TraceContext,
};
use crate::store::Deadline;
use crate::tasks::error::TaskError;

/// Largest `args` + `kwargs`, in bytes of JSON.
pub const MAX_ARGUMENTS: usize = 1024 * 1024;

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
    /// The submitting span's trace context, carried to whoever runs it.
    pub trace: Option<TraceContext>,
    /// Debounced: while the task holding the key has not started, this
    /// submit replaces it (see `debounce.rs`).
    pub debounce: Option<super::Debounce>,
    /// When it expires if not started by then (Celery's `expires`).
    pub expires: Option<Expiry>,
    /// Its rate-limit key, if any (see `crate::domain::flow`).
    pub rate_limit_key: Option<String>,
    /// Its concurrency key, if any.
    pub concurrency_key: Option<String>,
    /// How long its idempotency key is remembered, when not
    /// `KOO_IDEMPOTENCY_TTL`: a key only koo itself retries with, whose
    /// task is worthless past a bound (GetOrCompute's, past its lock), need
    /// not be kept a day.
    pub idempotency_ttl: Option<Duration>,
}

/// When a task not started in time expires instead of running late: at a
/// time, or a duration after its submit. Kept as the request said it, so
/// that a refusal names the field the caller set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// At this time (`expire_time`).
    At(SystemTime),
    /// This long after the submit (`expire_after`).
    After(Duration),
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
            trace: None,
            debounce: None,
            expires: None,
            rate_limit_key: None,
            concurrency_key: None,
            idempotency_ttl: None,
        }
    }
}

impl TaskEngine {
    /// Validates and stores a task; it is queued (or scheduled) when this
    /// returns. (Its span, named `submit`, is the store step's, which knows
    /// the task's id.)
    pub async fn submit(&self, new: NewTask, deadline: Deadline) -> Result<Task, TaskError> {
        let (task, delay) = self.prepare(new)?;
        if task.debounce_key.is_some() {
            return Ok(self.store_debounced(task, delay, deadline).await?.0);
        }
        self.store_task(task, delay, deadline).await
    }

    /// Validates and stores a batch in one round trip. Every task is
    /// validated before any is stored (a bad one refuses the batch, naming
    /// its index); then each is stored on its own: the result per task.
    #[tracing::instrument(level = "debug", skip_all, fields(count = news.len()))]
    pub async fn submit_many(
        &self,
        news: Vec<NewTask>,
        deadline: Deadline,
    ) -> Result<Vec<Result<Task, TaskError>>, (usize, TaskError)> {
        let c = &self.inner.config;
        let batch = news
            .into_iter()
            .enumerate()
            .map(|(i, new)| match new.debounce {
                Some(_) => Err((
                    i,
                    TaskError::invalid("debounce_key", "only SubmitTask takes a debounce key"),
                )),
                None => self.prepare(new).map_err(|e| (i, e)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // idle slots of this process get the burst's first tasks in the
        // same round trip (see `handoff`)
        let claims = self.claim_slots(&batch);
        let (batch, stored, took) = if claims.is_empty() {
            let stored = self
                .inner
                .store
                .submit_many(&batch, c.limits, deadline)
                .await
                .map_err(|e| (0, TaskError::from(e)))?;
            let stored = stored.into_iter().map(|r| r.map_err(TaskError::from));
            (batch, stored.collect(), Vec::new())
        } else {
            self.submit_many_handing(batch, claims, deadline)
                .await
                .map_err(|e| (0, e))?
        };
        let mut out = Vec::with_capacity(batch.len());
        for ((task, _), result) in batch.into_iter().zip(stored) {
            if result.is_ok() {
                self.submitted(&task, !took.contains(&task.id));
            }
            out.push(result.map(|()| task));
        }
        Ok(out)
    }

    /// Checks `new` as a submit would, without storing anything: a schedule
    /// template is checked when it is saved, not at every tick, where a
    /// refusal would only reach a log; a GetOrCompute's task on a hit too.
    /// Fields are named under `prefix`.
    pub fn check(&self, new: NewTask, prefix: &str) -> Result<(), TaskError> {
        self.prepare(new).map(drop).map_err(|e| match e {
            TaskError::InvalidArgument { field, reason } => TaskError::InvalidArgument {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        })
    }

    /// A validated task ready to store, and its countdown (a debounced
    /// task's: its window). Checks run in the order of the request's
    /// fields, so that the first wrong field is the one named.
    pub(super) fn prepare(&self, new: NewTask) -> Result<(Task, Duration), TaskError> {
        let c = &self.inner.config;
        crate::domain::task::check_task_name(&new.name)
            .map_err(|e| TaskError::invalid("name", e))?;
        check_arguments(&new)?;
        let (soft, hard, result_ttl) = limits(&new, c)?;
        check_dependencies(&new)?;
        check_cache_target(new.cache_result.as_ref())?;
        let queue = queue(&new, c)?;
        let debounce = super::debounce::check(&new)?.cloned();
        let delay = debounce.as_ref().map_or(new.delay, |d| d.window);
        let created_ms = crate::store::unix_millis(SystemTime::now());
        let expire_ms = expire_ms(new.expires, created_ms, new.delay)?;
        check_key("rate_limit_key", new.rate_limit_key.as_deref())?;
        check_key("concurrency_key", new.concurrency_key.as_deref())?;
        if let Some(n) = new.max_retries.filter(|n| *n > MAX_RETRIES) {
            return Err(TaskError::invalid(
                "max_retries",
                format!("{n} is over the limit of {MAX_RETRIES}"),
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
            state: if delay < Duration::from_millis(1) {
                State::Queued
            } else {
                State::Scheduled
            },
            attempts: 0,
            token: 0,
            takeovers: 0,
            cache_result: new.cache_result.as_ref().map(CacheTarget::to_json),
            depends_on: new.depends_on,
            schedule: new.schedule,
            schedule_tick_ms: new.schedule_tick_ms,
            max_retries: new.max_retries.unwrap_or(c.default_max_retries),
            worker: None,
            progress: None,
            result: None,
            error: None,
            created_ms,
            started_ms: None,
            finished_ms: None,
            soft_ms: soft.as_millis() as u64,
            hard_ms: hard.as_millis() as u64,
            result_ttl_ms: result_ttl.as_millis() as u64,
            log: Vec::new(),
            trace: new.trace,
            debounce_key: debounce.map(|d| d.key),
            expire_ms,
            rate_limit_key: new.rate_limit_key,
            concurrency_key: new.concurrency_key,
        };
        Ok((task, delay))
    }
}

/// `args` (a JSON array) and `kwargs` (a JSON object), together at most
/// [`MAX_ARGUMENTS`] bytes.
fn check_arguments(new: &NewTask) -> Result<(), TaskError> {
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
    Ok(())
}

/// The soft and hard time limits and the result's retention, defaults
/// applied: the soft limit within a non-zero hard one, a result readable
/// for at least a second.
///
/// A hard limit given alone below the default soft limit brings the soft
/// one down to it (Celery's `time_limit=` alone works the same): only limits
/// the caller gave can contradict each other.
fn limits(new: &NewTask, c: &TaskConfig) -> Result<(Duration, Duration, Duration), TaskError> {
    let hard = new.time_limit.unwrap_or(c.time_limit);
    let soft = match new.soft_time_limit {
        Some(soft) => soft,
        None if new.time_limit.is_some() => c.soft_time_limit.min(hard),
        None => c.soft_time_limit,
    };
    if hard.is_zero() {
        return Err(TaskError::invalid("time_limit", "must be above zero"));
    }
    if soft > hard {
        let field = if new.soft_time_limit.is_some() {
            "soft_time_limit"
        } else {
            "time_limit"
        };
        return Err(TaskError::invalid(
            field,
            format!(
                "the soft time limit ({}) must not exceed the time limit ({})",
                humantime::format_duration(soft),
                humantime::format_duration(hard)
            ),
        ));
    }
    let result_ttl = new.result_ttl.unwrap_or(c.result_ttl);
    if result_ttl < Duration::from_secs(1) {
        return Err(TaskError::invalid(
            "result_ttl",
            "must be at least 1 s, so that the result can be read",
        ));
    }
    Ok((soft, hard, result_ttl))
}

/// At most 100 dependencies, each a task id listed once; a task with
/// dependencies has no countdown (it runs when they succeed).
fn check_dependencies(new: &NewTask) -> Result<(), TaskError> {
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
    Ok(())
}

/// The expiry's time (ms since the epoch): after the submit and after the
/// countdown or ETA (`delay`), since a task that expires before it may
/// start could never run. A task with dependencies may expire while it
/// waits on them: that is what an expiry is for.
fn expire_ms(
    expires: Option<Expiry>,
    now_ms: i64,
    delay: Duration,
) -> Result<Option<i64>, TaskError> {
    let (field, at_ms) = match expires {
        None => return Ok(None),
        Some(Expiry::At(at)) => ("expire_time", crate::store::unix_millis(at)),
        Some(Expiry::After(d)) => (
            "expire_after",
            now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        ),
    };
    let start_ms = now_ms.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    let time = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms).map_or_else(
            || format!("{ms} ms since the epoch"),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    };
    if at_ms <= now_ms {
        return Err(TaskError::invalid(
            field,
            format!(
                "is in the past (expires {}, now {}): the task could never run",
                time(at_ms),
                time(now_ms)
            ),
        ));
    }
    if at_ms <= start_ms {
        return Err(TaskError::invalid(
            field,
            format!(
                "is not after the countdown or ETA (expires {}, may start {}): the task could never run",
                time(at_ms),
                time(start_ms)
            ),
        ));
    }
    Ok(Some(at_ms))
}

/// A rate-limit or concurrency key: 1 to [`MAX_KEY`] bytes, no control
/// characters, and not `*` (which names every key's default limit).
///
/// [`MAX_KEY`]: crate::domain::flow::MAX_KEY
fn check_key(field: &str, key: Option<&str>) -> Result<(), TaskError> {
    let Some(key) = key else { return Ok(()) };
    let max = crate::domain::flow::MAX_KEY;
    let reason = if key.is_empty() {
        "must not be empty (leave it out for no key)".to_owned()
    } else if key.len() > max {
        format!(
            "{} is over the limit of {max} bytes",
            crate::quote::quote_sized(key)
        )
    } else if key == "*" {
        "\"*\" names every key's default limit; it cannot be a task's key".to_owned()
    } else if key.chars().any(char::is_control) {
        format!("{} holds control characters", crate::quote::quote(key))
    } else {
        return Ok(());
    };
    Err(TaskError::invalid(field, reason))
}

fn check_cache_target(target: Option<&CacheTarget>) -> Result<(), TaskError> {
    let Some(target) = target else { return Ok(()) };
    if target.key.is_empty() || target.key.len() > 1024 {
        let key = crate::quote::quote_sized(&target.key);
        return Err(TaskError::invalid(
            "cache_result.key",
            format!("{key} must be 1 to 1024 bytes"),
        ));
    }
    if target.ttl_ms == 0 {
        return Err(TaskError::invalid("cache_result.ttl", "must be positive"));
    }
    Ok(())
}

/// The task's queue: the one named, else its category's; only known
/// queues accept tasks, so that every queue is swept for lapsed leases.
fn queue(new: &NewTask, c: &TaskConfig) -> Result<QueueName, TaskError> {
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
    Ok(queue)
}
