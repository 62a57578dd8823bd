//! Built-in handlers for the upkeep koo owns: the cache's cleanup, warming
//! and maintenance (what CacheService's `Cleanup`, `Warm` and
//! `StartMaintenance` submit), and database maintenance of koo's own task
//! data. Their reports (JSON) are the tasks' results.
//!
//! They run where a [`Cache`] is at hand: the built-in pool of `koo serve`.
//! A `koo worker` process does not serve them, so it never leases them.
//!
//! `watch::upkeep::CacheUpkeep` is the other side: it submits one of these
//! tasks for a caller and, if asked, waits for its end.

use std::time::Duration;

use serde_json::json;

use super::engine::{NewTask, TaskEngine, TaskError};
use super::worker::{HandlerError, Registry, TaskContext};
use crate::cache::{Cache, CacheError, WarmCompute, WarmFailure, WarmReport, warm};
use crate::domain::task::{CacheTarget, Category, Priority, QueueName};
use crate::quote::quote;
use crate::store::{Deadline, StoreError};

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
        tags: Vec::new(),
        soft_ttl_ms: None,
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
