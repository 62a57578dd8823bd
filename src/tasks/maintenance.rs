//! Built-in handlers for the upkeep koo owns: the cache's cleanup, warming
//! and maintenance (what CacheService's `Cleanup`, `Warm` and
//! `StartMaintenance` submit), and database maintenance of koo's own task
//! data. Their reports (JSON) are the tasks' results.
//!
//! They run where a [`Cache`] is at hand: the built-in pool of `koo serve`.
//! A `koo worker` process does not serve them, so it never leases them.
//!
//! [`CacheUpkeep`] is the other side: it submits one of these tasks for a
//! caller and, if asked, waits for its end, turning its stored result into
//! a typed report and its stored error into an [`UpkeepError`].

use std::time::Duration;

use serde_json::json;

use super::engine::{NewTask, TaskEngine, TaskError};
use super::worker::{HandlerError, Registry, TaskContext};
use crate::cache::{
    Cache, CacheError, CleanupReport, MaintenanceReport, WarmCompute, WarmFailure, WarmReport, warm,
};
use crate::domain::task::{CacheTarget, Category, Priority, QueueName, State};
use crate::quote::quote;
use crate::store::{Deadline, StoreError};
use crate::watch::Hub;

/// Removes what the cache backend does not expire by itself.
pub const CACHE_CLEANUP: &str = "koo.tasks.cache.cleanup";
/// Preloads `kwargs.entries` (warm-file lines) and, unless
/// `kwargs.skip_file`, the configured warm file.
pub const CACHE_WARM: &str = "koo.tasks.cache.warm";
/// A cleanup, then a memory report with the largest keys.
pub const CACHE_MAINTENANCE: &str = "koo.tasks.cache.maintenance";
/// Trims task history older than the retention (or `kwargs.older_than_hours`)
/// with its stored results, keeping dead letters younger than the
/// dead-letter TTL (unless `kwargs.include_dead_letters`), trims event logs,
/// forgets expired results, and reports the task store's memory and every
/// queue's depths.
pub const DATABASE_MAINTENANCE: &str = "koo.tasks.database.maintenance";

/// A cache failure as a handler error: an outage is worth retrying, a
/// configuration error (an unreadable warm file) is not.
fn cache_error(e: CacheError) -> HandlerError {
    match e {
        CacheError::Store(StoreError::Unavailable(_) | StoreError::DeadlineExceeded) => {
            HandlerError::retry(e.to_string())
        }
        other => HandlerError::fatal(other.to_string()),
    }
}

/// The deadline of one upkeep step: the task's soft limit.
fn deadline(ctx: &TaskContext) -> Deadline {
    Deadline::after(Duration::from_millis(ctx.task.soft_ms.max(1000)))
}

fn report(value: impl serde::Serialize) -> Result<serde_json::Value, HandlerError> {
    serde_json::to_value(value).map_err(|e| HandlerError::fatal(e.to_string()))
}

/// Registers the cache's upkeep handlers.
pub fn register_cache(registry: &mut Registry, cache: Cache, engine: TaskEngine) {
    let c = cache.clone();
    registry.register(CACHE_CLEANUP, move |ctx| {
        let cache = c.clone();
        async move {
            let done = cache.cleanup(deadline(&ctx)).await.map_err(cache_error)?;
            report(done)
        }
    });
    let c = cache.clone();
    registry.register(CACHE_MAINTENANCE, move |ctx| {
        let cache = c.clone();
        async move {
            let done = cache
                .maintenance(deadline(&ctx))
                .await
                .map_err(cache_error)?;
            report(done)
        }
    });
    registry.register(CACHE_WARM, move |ctx| {
        let cache = cache.clone();
        let engine = engine.clone();
        async move {
            let kwargs: serde_json::Value = serde_json::from_str(&ctx.task.kwargs)
                .map_err(|e| HandlerError::fatal(format!("kwargs: {e}")))?;
            let entries = match &kwargs["entries"] {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::Array(lines) => lines
                    .iter()
                    .enumerate()
                    .map(|(i, line)| {
                        let entry = match warm::parse_line(&line.to_string()) {
                            Ok(warm::WarmLine::Entry(e)) => Ok(e),
                            Ok(warm::WarmLine::Task { .. }) => {
                                Err("a request entry carries a value".to_owned())
                            }
                            Err(e) => Err(e),
                        };
                        (i as u64, entry)
                    })
                    .collect(),
                _ => return Err(HandlerError::fatal("kwargs.entries must be a list")),
            };
            let skip_file = kwargs["skip_file"].as_bool().unwrap_or(false);
            let mut done = cache
                .warm(entries, skip_file, deadline(&ctx))
                .await
                .map_err(cache_error)?;
            submit_computed(&engine, &cache, &mut done, deadline(&ctx)).await?;
            report(done)
        }
    });
}

/// Submits the tasks that compute warm entries, each with its entry as the
/// result's cache target; a line whose task cannot be submitted becomes a
/// failure of the report.
async fn submit_computed(
    engine: &TaskEngine,
    cache: &Cache,
    report: &mut WarmReport,
    deadline: Deadline,
) -> Result<(), HandlerError> {
    let mut kept = Vec::with_capacity(report.computed.len());
    for mut c in std::mem::take(&mut report.computed) {
        match computing_task(&c, cache) {
            Ok(new) => match engine.submit(new, deadline).await {
                Ok(task) => {
                    c.task_id = Some(task.id.to_string());
                    kept.push(c);
                }
                Err(TaskError::InvalidArgument { field, reason }) => {
                    report.failures.push(WarmFailure {
                        source: c.source,
                        line: c.line,
                        reason: format!("task.{field}: {reason}"),
                    });
                }
                // the store is down: the warm-up is worth retrying
                Err(e) => return Err(HandlerError::retry(e.to_string())),
            },
            Err(reason) => report.failures.push(WarmFailure {
                source: c.source,
                line: c.line,
                reason,
            }),
        }
    }
    report.computed = kept;
    Ok(())
}

/// The task a warm `task` line names, with its entry as the cache target.
fn computing_task(c: &WarmCompute, cache: &Cache) -> Result<NewTask, String> {
    let text = |name: &str| c.task.get(name).and_then(serde_json::Value::as_str);
    let name = text("name").ok_or("task.name is missing")?;
    let category = match text("category") {
        None => Category::Cache,
        Some(raw) => Category::parse(raw)
            .ok_or_else(|| format!("task.category {} is unknown", quote(raw)))?,
    };
    let mut new = NewTask::new(name, category);
    if let Some(q) = text("queue") {
        new.queue = Some(QueueName::parse(q).map_err(|e| format!("task.queue: {e}"))?);
    }
    if let Some(p) = text("priority") {
        new.priority =
            Priority::parse(p).ok_or_else(|| format!("task.priority {} is unknown", quote(p)))?;
    }
    match c.task.get("args") {
        None => {}
        Some(a @ serde_json::Value::Array(_)) => new.args = a.to_string(),
        Some(_) => return Err("task.args must be a list".to_owned()),
    }
    match c.task.get("kwargs") {
        None => {}
        Some(k @ serde_json::Value::Object(_)) => new.kwargs = k.to_string(),
        Some(_) => return Err("task.kwargs must be an object".to_owned()),
    }
    let ttl = c.ttl_ms.unwrap_or_else(|| {
        u64::try_from(cache.default_ttl(c.level).as_millis()).unwrap_or(u64::MAX)
    });
    new.cache_result = Some(CacheTarget {
        level: c.level,
        key: c.key.clone(),
        ttl_ms: ttl,
    });
    Ok(new)
}

/// Registers database maintenance of the task store.
pub fn register_database(registry: &mut Registry, engine: TaskEngine) {
    registry.register(DATABASE_MAINTENANCE, move |ctx| {
        let engine = engine.clone();
        async move {
            let config = engine.config();
            let kwargs: serde_json::Value =
                serde_json::from_str(&ctx.task.kwargs).unwrap_or_default();
            let max_age = match kwargs.get("older_than_hours") {
                None | Some(serde_json::Value::Null) => config.history_max_age,
                Some(h) => h
                    .as_f64()
                    .and_then(|h| Duration::try_from_secs_f64(h * 3600.0).ok())
                    .ok_or_else(|| {
                        HandlerError::fatal("older_than_hours must be a non-negative number")
                    })?,
            };
            let include_dead = kwargs
                .get("include_dead_letters")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            let store = engine.store();
            let mut queues = serde_json::Map::new();
            let trimmed = engine
                .cleanup(&config.queues(), max_age, include_dead, deadline(&ctx))
                .await
                .map_err(|e| HandlerError::retry(e.to_string()))?;
            for (queue, total) in trimmed {
                let stats = store
                    .queue_stats(&queue, deadline(&ctx))
                    .await
                    .map_err(|e| HandlerError::retry(e.to_string()))?;
                queues.insert(
                    queue.to_string(),
                    json!({
                        "removed_history": total.history,
                        "removed_dead_letters": total.dead,
                        "trimmed_events": total.events,
                        "queued": stats.ready,
                        "scheduled": stats.scheduled,
                        "running": stats.running,
                        "dead_letters": stats.dead,
                    }),
                );
            }
            let memory = store
                .usage(deadline(&ctx))
                .await
                .map_err(|e| HandlerError::retry(e.to_string()))?;
            Ok(json!({
                "history_max_age_seconds": max_age.as_secs_f64(),
                "queues": queues,
                "memory": memory,
            }))
        }
    });
}

/// Submits the cache's upkeep tasks for callers (CacheService's `Cleanup`,
/// `Warm` and `StartMaintenance`) and waits for their ends: a cheap-to-clone
/// handle.
#[derive(Clone)]
pub struct CacheUpkeep {
    /// Where the tasks are submitted.
    engine: TaskEngine,
    /// Where their ends are followed.
    hub: Hub,
}

/// A submitted upkeep task.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted<R> {
    /// Its id.
    pub task_id: String,
    /// Its report, when the caller waited and it succeeded in time.
    pub report: Option<R>,
}

/// Why an upkeep call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpkeepError {
    /// The warm entries make a task koo refuses (its kwargs are too large).
    #[error("entries: {reason}")]
    InvalidEntries {
        /// Why.
        reason: String,
    },
    /// The task could not be submitted or followed.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The task ended otherwise than SUCCEEDED.
    #[error("task {id} ended {}: {message}", state.as_str())]
    Ended {
        /// The task.
        id: String,
        /// Its end state.
        state: State,
        /// Its error's message (empty when it stored none).
        message: String,
    },
    /// The task succeeded with a result that is not its report.
    #[error("the task's report does not parse: {0}")]
    Report(String),
}

/// Time kept, before the caller's deadline, to answer after a wait.
const ANSWER_MARGIN: Duration = Duration::from_millis(100);

impl CacheUpkeep {
    /// Submits through `engine`, follows ends through `hub`.
    pub fn new(engine: TaskEngine, hub: Hub) -> Self {
        Self { engine, hub }
    }

    /// A [`CACHE_CLEANUP`] task.
    pub async fn cleanup(
        &self,
        wait: bool,
        deadline: Deadline,
    ) -> Result<Submitted<CleanupReport>, UpkeepError> {
        self.run(CACHE_CLEANUP, json!({}), wait, deadline).await
    }

    /// A [`CACHE_MAINTENANCE`] task.
    pub async fn maintenance(
        &self,
        wait: bool,
        deadline: Deadline,
    ) -> Result<Submitted<MaintenanceReport>, UpkeepError> {
        self.run(CACHE_MAINTENANCE, json!({}), wait, deadline).await
    }

    /// A [`CACHE_WARM`] task loading `entries` (warm-file lines, as
    /// [`warm::to_line`] writes them) and, unless `skip_file`, the warm file.
    pub async fn warm(
        &self,
        entries: Vec<serde_json::Value>,
        skip_file: bool,
        wait: bool,
        deadline: Deadline,
    ) -> Result<Submitted<WarmReport>, UpkeepError> {
        let kwargs = json!({ "entries": entries, "skip_file": skip_file });
        self.run(CACHE_WARM, kwargs, wait, deadline).await
    }

    /// Submits upkeep task `name` with `kwargs`; with `wait`, also waits
    /// (until shortly before `deadline`) for its end and reads its report.
    async fn run<R: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        kwargs: serde_json::Value,
        wait: bool,
        deadline: Deadline,
    ) -> Result<Submitted<R>, UpkeepError> {
        let mut new = NewTask::new(name, Category::Cache);
        new.priority = Priority::High;
        new.kwargs = kwargs.to_string();
        let task = self
            .engine
            .submit(new, deadline)
            .await
            .map_err(|e| match e {
                TaskError::InvalidArgument { reason, .. } => UpkeepError::InvalidEntries { reason },
                other => other.into(),
            })?;
        let task_id = task.id.to_string();
        if !wait {
            return Ok(Submitted {
                task_id,
                report: None,
            });
        }
        let until = Deadline::after(deadline.remaining().saturating_sub(ANSWER_MARGIN));
        let ended = self.hub.wait_final(&self.engine, &task.id, until).await?;
        let report = match ended {
            None => None,
            Some(t) if t.state == State::Succeeded => {
                t.result.as_deref().map(parse_report).transpose()?
            }
            Some(t) => {
                return Err(UpkeepError::Ended {
                    message: error_message(t.error.as_deref()),
                    id: task_id,
                    state: t.state,
                });
            }
        };
        Ok(Submitted { task_id, report })
    }
}

/// A task's JSON result as its report.
fn parse_report<R: serde::de::DeserializeOwned>(result: &str) -> Result<R, UpkeepError> {
    serde_json::from_str(result).map_err(|e| UpkeepError::Report(e.to_string()))
}

/// The message of a task's stored error (JSON with a `message`), or `""`.
fn error_message(stored: Option<&str>) -> String {
    stored
        .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .and_then(|e| e["message"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tasks::TaskStore;
    use crate::tasks::engine::TaskConfig;
    use crate::watch::Watchers;
    use tokio_util::sync::CancellationToken;

    /// A stored error's message is read from its JSON; anything else is
    /// an empty message, not a failure.
    #[test]
    fn stored_errors_give_their_message() {
        let stored = r#"{"message":"warm file unreadable","retryable":false}"#;
        assert_eq!(error_message(Some(stored)), "warm file unreadable");
        assert_eq!(error_message(Some("not json")), "");
        assert_eq!(error_message(None), "");
        let e = UpkeepError::Ended {
            id: "cache~1".into(),
            state: State::Failed,
            message: "warm file unreadable".into(),
        };
        assert_eq!(
            e.to_string(),
            "task cache~1 ended failed: warm file unreadable"
        );
        let r: Result<CleanupReport, _> = parse_report("[1]");
        assert!(matches!(r, Err(UpkeepError::Report(_))));
    }

    /// An upkeep task that fails is a typed error naming its end state and
    /// its stored message; one not waited for is only its id.
    #[tokio::test]
    async fn a_failed_upkeep_task_is_a_typed_error() {
        let stop = CancellationToken::new();
        let engine = TaskEngine::new(TaskStore::memory(), TaskConfig::default());
        let hub = Hub::new(engine.clone(), Watchers::new(8), 64, stop.clone());
        let upkeep = CacheUpkeep::new(engine.clone(), hub);
        let deadline = || Deadline::after(Duration::from_secs(5));
        let queued = upkeep.cleanup(false, deadline()).await.unwrap();
        assert_eq!(queued.report, None);
        // a worker that fails whatever it leases
        let failing = {
            let engine = engine.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(t) = lease_one(&engine).await {
                        fail(&engine, t).await;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let e = upkeep.cleanup(true, deadline()).await.unwrap_err();
        failing.abort();
        stop.cancel();
        match e {
            UpkeepError::Ended { state, message, .. } => {
                assert_eq!(state, State::Failed);
                assert_eq!(message, "no cleanup here");
            }
            other => panic!("{other:?}"),
        }
    }

    async fn lease_one(engine: &TaskEngine) -> Option<crate::domain::task::Task> {
        let queue = Category::Cache.default_queue();
        let deadline = Deadline::after(Duration::from_secs(1));
        engine.lease(&queue, "test", &["*"], deadline).await.ok()?
    }

    async fn fail(engine: &TaskEngine, task: crate::domain::task::Task) {
        let finish = crate::tasks::engine::Finish::failed("no cleanup here", false);
        let deadline = Deadline::after(Duration::from_secs(1));
        engine
            .finish(&task, task.token, "test", finish, deadline)
            .await
            .unwrap();
    }
}
