//! Tasks as `TaskService` shows them, and the enums a request names them
//! by: categories, priorities, states, times and the JSON a task stores
//! (arguments, progress, results, errors) as protobuf values.

use prost_types::value::Kind;
use tonic::Status;

use crate::domain::task::{CacheTarget, Category, Priority, State, Task};
use crate::grpc::json;
use crate::grpc::status::invalid_argument;
use crate::pb::tasks::v1 as pb;

pub(crate) fn category(raw: i32) -> Result<Category, Status> {
    use pb::TaskCategory as C;
    match C::try_from(raw) {
        Ok(C::AiService) => Ok(Category::AiService),
        Ok(C::PdfProcessing) => Ok(Category::PdfProcessing),
        Ok(C::Database) => Ok(Category::Database),
        Ok(C::HealthCheck) => Ok(Category::HealthCheck),
        Ok(C::Research) => Ok(Category::Research),
        Ok(C::Cache) => Ok(Category::Cache),
        Ok(C::Unspecified) => Err(invalid_argument("category", "is required")),
        Err(_) => Err(invalid_argument(
            "category",
            &format!("{raw} is not a task category"),
        )),
    }
}

pub(crate) fn to_pb_category(c: Category) -> pb::TaskCategory {
    use pb::TaskCategory as C;
    match c {
        Category::AiService => C::AiService,
        Category::PdfProcessing => C::PdfProcessing,
        Category::Database => C::Database,
        Category::HealthCheck => C::HealthCheck,
        Category::Research => C::Research,
        Category::Cache => C::Cache,
    }
}

pub(crate) fn priority(raw: i32) -> Result<Priority, Status> {
    use pb::TaskPriority as P;
    match P::try_from(raw) {
        Ok(P::Unspecified | P::Normal) => Ok(Priority::Normal),
        Ok(P::Low) => Ok(Priority::Low),
        Ok(P::High) => Ok(Priority::High),
        Ok(P::Critical) => Ok(Priority::Critical),
        Err(_) => Err(invalid_argument(
            "priority",
            &format!("{raw} is not a task priority"),
        )),
    }
}

pub(crate) fn to_pb_priority(p: Priority) -> pb::TaskPriority {
    match p {
        Priority::Low => pb::TaskPriority::Low,
        Priority::Normal => pb::TaskPriority::Normal,
        Priority::High => pb::TaskPriority::High,
        Priority::Critical => pb::TaskPriority::Critical,
    }
}

pub(crate) fn to_pb_state(s: State) -> pb::TaskState {
    use pb::TaskState as S;
    match s {
        State::Pending => S::Pending,
        State::Scheduled => S::Scheduled,
        State::Queued => S::Queued,
        State::Running => S::Running,
        State::Succeeded => S::Succeeded,
        State::Failed => S::Failed,
        State::Cancelled => S::Cancelled,
        State::TimedOut => S::TimedOut,
    }
}

pub(crate) fn timestamp(ms: Option<i64>) -> Option<prost_types::Timestamp> {
    ms.map(|ms| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

pub(crate) fn pb_duration_ms(ms: u64) -> Option<prost_types::Duration> {
    (ms > 0).then(|| prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

fn json_value(text: &str) -> Option<prost_types::Value> {
    json::from_json(text).ok()
}

fn json_struct(text: &str) -> Option<prost_types::Struct> {
    match json::from_json(text).ok()?.kind? {
        Kind::StructValue(s) => Some(s),
        _ => None,
    }
}

/// A stored progress report as the API shows it.
pub(crate) fn progress(json: &str) -> Option<pb::TaskProgress> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(pb::TaskProgress {
        percent: v["percent"].as_f64().unwrap_or(0.0),
        message: v["message"].as_str().unwrap_or_default().to_owned(),
        metadata: json_struct(&v["metadata"].to_string()),
    })
}

/// A stored task as the API shows it.
pub(crate) fn to_pb_task(t: Task) -> pb::Task {
    let args = match json_value(&t.args).and_then(|v| v.kind) {
        Some(Kind::ListValue(l)) => l.values,
        _ => Vec::new(),
    };
    let progress = t.progress.as_deref().and_then(progress);
    let error = t.error.as_deref().and_then(|e| {
        let v: serde_json::Value = serde_json::from_str(e).ok()?;
        Some(pb::TaskError {
            message: v["message"].as_str().unwrap_or_default().to_owned(),
            retryable: v["retryable"].as_bool().unwrap_or(false),
            details: v.get("details").and_then(|d| json_struct(&d.to_string())),
        })
    });
    let attempt_log = t
        .log
        .iter()
        .filter_map(|entry| {
            let v: serde_json::Value = serde_json::from_str(entry).ok()?;
            Some(pb::TaskAttempt {
                attempt: v["attempt"].as_i64().unwrap_or(0) as i32,
                worker: v["worker"].as_str().unwrap_or_default().to_owned(),
                outcome: v["outcome"].as_str().unwrap_or_default().to_owned(),
                error: v["error"].as_str().unwrap_or_default().to_owned(),
                end_time: timestamp(v["ended_ms"].as_i64()),
                retry_time: timestamp(v["retry_at_ms"].as_i64()),
            })
        })
        .collect();
    let (trace_parent, trace_state) = t
        .trace
        .map(|c| (c.parent, c.state.unwrap_or_default()))
        .unwrap_or_default();
    pb::Task {
        trace_parent,
        trace_state,
        debounce_key: t.debounce_key.unwrap_or_default(),
        rate_limit_key: t.rate_limit_key.unwrap_or_default(),
        concurrency_key: t.concurrency_key.unwrap_or_default(),
        queue: t.id.queue().to_string(),
        id: t.id.to_string(),
        name: t.name,
        category: to_pb_category(t.category) as i32,
        priority: to_pb_priority(t.priority) as i32,
        args,
        kwargs: json_struct(&t.kwargs),
        state: to_pb_state(t.state) as i32,
        attempts: t.attempts as i32,
        max_retries: t.max_retries as i32,
        worker: t.worker.unwrap_or_default(),
        progress,
        result: t.result.as_deref().and_then(json_value),
        error,
        create_time: timestamp(Some(t.created_ms)),
        start_time: timestamp(t.started_ms),
        end_time: timestamp(t.finished_ms),
        soft_time_limit: pb_duration_ms(t.soft_ms),
        time_limit: pb_duration_ms(t.hard_ms),
        attempt_log,
        depends_on: t.depends_on,
        schedule: t.schedule.unwrap_or_default(),
        schedule_time: timestamp(t.schedule_tick_ms),
        expire_time: timestamp(t.expire_ms),
        cache_result: t
            .cache_result
            .as_deref()
            .and_then(CacheTarget::from_json)
            .map(|c| pb::CacheTarget {
                level: crate::grpc::cache::to_pb_level(c.level) as i32,
                key: c.key,
                ttl: pb_duration_ms(c.ttl_ms),
                soft_ttl: c.soft_ttl_ms.and_then(pb_duration_ms),
                tags: c.tags,
            }),
    }
}
