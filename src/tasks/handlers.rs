//! Built-in diagnostic handlers, for smoke tests, tests and benchmarks:
//! a no-op, an echo, a sleep that reports progress, one that fails a given
//! number of times before it succeeds, and (only when the operator names a
//! file at start-up) a ledger of executions for the chaos suite.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::engine::TaskEngine;
use super::worker::{HandlerError, Registry, TaskContext};
use crate::domain::task::names;
use crate::store::Deadline;

/// Does nothing and succeeds with `null`.
pub const NOOP: &str = "koo.diagnostics.noop";
/// Succeeds with `kwargs.result` (`null` when absent): a result of any
/// size and shape, e.g. to exercise `cache_result`.
pub const ECHO: &str = "koo.diagnostics.echo";
/// Sleeps `kwargs.seconds` (default 1), reporting progress in `kwargs.steps`
/// (default 10) steps; stops early, failing retryably, when cancelled.
pub const SLEEP: &str = "koo.diagnostics.sleep";
/// Fails (retryably) until attempt `kwargs.failures + 1`, then succeeds with
/// the attempt number.
pub const FAIL_TIMES: &str = "koo.diagnostics.fail_times";
/// Ignores cancellation and blocks a thread for `kwargs.seconds`: shows that
/// the hard limit still frees the slot.
pub const STUBBORN: &str = "koo.diagnostics.stubborn";
/// Appends one JSON line per execution start (task id, attempt, lease
/// token, process id, time) to the file named by `KOO_DIAGNOSTICS_LEDGER`,
/// then sleeps `kwargs.ms` (default 0, at most 10 s) and succeeds with the
/// same facts: the chaos suite's record of what ran, kept outside koo.
pub const LEDGER: &str = "koo.diagnostics.ledger";

fn kwarg_f64(ctx: &TaskContext, name: &str, default: f64) -> f64 {
    serde_json::from_str::<serde_json::Value>(&ctx.task.kwargs)
        .ok()
        .and_then(|v| v.get(name).and_then(serde_json::Value::as_f64))
        .unwrap_or(default)
}

/// Registers the built-in health check: the task store's latency, every
/// queue's depth and oldest wait, and the worker pools alive.
pub fn register_health_check(registry: &mut Registry, engine: TaskEngine) {
    registry.register(names::HEALTH_CHECK, move |_ctx| {
        let engine = engine.clone();
        async move {
            let deadline = Deadline::after(Duration::from_secs(10));
            let latency = engine
                .ping(deadline)
                .await
                .map_err(|e| HandlerError::retry(e.to_string()))?;
            let queues: Vec<_> = engine.config().queues();
            let stats = engine
                .queue_stats(&queues, deadline)
                .await
                .map_err(|e| HandlerError::retry(e.to_string()))?;
            let queues: serde_json::Map<String, serde_json::Value> = stats
                .into_iter()
                .map(|(q, s)| {
                    let report = serde_json::json!({
                        "queued": s.ready,
                        "scheduled": s.scheduled,
                        "pending": s.pending,
                        "running": s.running,
                        "dead_letters": s.dead,
                        "oldest_wait_seconds": s.oldest_wait.map(|d| d.as_secs_f64()),
                        "paused": s.paused.is_some(),
                    });
                    (q.to_string(), report)
                })
                .collect();
            let now = crate::store::unix_millis(std::time::SystemTime::now());
            let workers: Vec<serde_json::Value> = engine
                .store()
                .list_workers(deadline)
                .await
                .map_err(|e| HandlerError::retry(e.to_string()))?
                .into_iter()
                .map(|w| {
                    serde_json::json!({
                        "id": w.id,
                        "kind": if w.kind.is_empty() { "builtin" } else { w.kind.as_str() },
                        "slots": w.slots,
                        "running": w.running,
                        "queues": w.queues,
                        "task_names": w.names,
                        "last_seen_seconds_ago": (now - w.seen_ms).max(0) as f64 / 1000.0,
                    })
                })
                .collect();
            let external = workers.iter().filter(|w| w["kind"] != "builtin").count();
            Ok(serde_json::json!({
                "workers_alive": workers.len(),
                "external_workers_alive": external,
                "workers": workers,
                "store": {
                    "kind": if engine.store().is_shared() { "redis" } else { "embedded" },
                    "reachable": true,
                    "latency_ms": latency.as_secs_f64() * 1000.0,
                },
                "queues": queues,
            }))
        }
    });
}

/// Registers the diagnostic handlers.
pub fn register_diagnostics(registry: &mut Registry) {
    registry.register(NOOP, |_ctx| async { Ok(serde_json::Value::Null) });
    registry.register(ECHO, |ctx| async move {
        let mut kwargs: serde_json::Value =
            serde_json::from_str(&ctx.task.kwargs).unwrap_or_default();
        Ok(kwargs
            .get_mut("result")
            .map(serde_json::Value::take)
            .unwrap_or_default())
    });
    registry.register(SLEEP, |ctx| async move {
        let total = Duration::try_from_secs_f64(kwarg_f64(&ctx, "seconds", 1.0).max(0.0))
            .map_err(|_| HandlerError::fatal("seconds must be a finite number"))?;
        let steps = kwarg_f64(&ctx, "steps", 10.0).clamp(1.0, 10_000.0) as u32;
        for step in 1..=steps {
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Err(HandlerError::retry("stopped when asked (a cancel, or the soft time limit)")),
                _ = tokio::time::sleep(total / steps) => {}
            }
            let percent = f64::from(step) * 100.0 / f64::from(steps);
            ctx.progress(percent, &format!("step {step} of {steps}"), serde_json::json!({ "step": step }))
                .await
                .map_err(|e| HandlerError::fatal(e.to_string()))?;
        }
        Ok(serde_json::json!({ "slept_seconds": total.as_secs_f64() }))
    });
    registry.register(FAIL_TIMES, |ctx| async move {
        let failures = kwarg_f64(&ctx, "failures", 1.0).max(0.0) as u32;
        if ctx.task.attempts <= failures {
            Err(HandlerError::retry(format!(
                "planned failure {} of {failures}",
                ctx.task.attempts
            )))
        } else {
            Ok(serde_json::json!({ "attempt": ctx.task.attempts }))
        }
    });
    registry.register(STUBBORN, |ctx| async move {
        let secs = kwarg_f64(&ctx, "seconds", 5.0).clamp(0.0, 3600.0);
        tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_secs_f64(secs)))
            .await
            .map_err(|e| HandlerError::fatal(e.to_string()))?;
        Ok(serde_json::Value::Null)
    });
}

/// Registers [`LEDGER`], appending to `path`. Only the operator chooses the
/// path (at start-up); without one the handler does not exist, so no
/// submitter can make koo write files.
pub fn register_ledger(registry: &mut Registry, path: PathBuf) {
    let path = Arc::new(path);
    registry.register(LEDGER, move |ctx| {
        let path = path.clone();
        async move {
            let facts = serde_json::json!({
                "task_id": ctx.task.id.to_string(),
                "attempt": ctx.task.attempts,
                "token": ctx.task.token,
                "pid": std::process::id(),
                "ms": crate::store::unix_millis(std::time::SystemTime::now()),
            });
            let line = format!("{facts}\n");
            // One write with O_APPEND: lines from several processes never
            // interleave, and the line is in the file before the handler
            // can be seen to have run.
            tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path.as_ref())?
                    .write_all(line.as_bytes())
            })
            .await
            .map_err(|e| HandlerError::fatal(e.to_string()))?
            .map_err(|e| HandlerError::retry(format!("cannot append to the ledger: {e}")))?;
            let ms = kwarg_f64(&ctx, "ms", 0.0).clamp(0.0, 10_000.0);
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Err(HandlerError::retry("cancelled")),
                _ = tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)) => {}
            }
            Ok(facts)
        }
    });
}
