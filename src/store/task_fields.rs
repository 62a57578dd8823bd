//! The stored form of a task: the field map of its Redis hash, which the
//! embedded store's snapshots reuse so that both backends read and write one
//! format (`v1`). It lives in the store, not in the domain model: the domain
//! does not know how it is kept.

use crate::domain::task::{Category, Priority, State, Task, TaskId, TraceContext};

/// The stored fields (a Redis hash), without the attempt log.
pub fn to_fields(task: &Task) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("id", task.id.to_string()),
        ("name", task.name.clone()),
        ("category", task.category.as_str().to_owned()),
        ("band", task.priority.band().to_string()),
        ("args", task.args.clone()),
        ("kwargs", task.kwargs.clone()),
        ("state", task.state.as_str().to_owned()),
        ("attempts", task.attempts.to_string()),
        ("max_retries", task.max_retries.to_string()),
        ("created_ms", task.created_ms.to_string()),
        ("soft_ms", task.soft_ms.to_string()),
        ("hard_ms", task.hard_ms.to_string()),
        ("result_ttl_ms", task.result_ttl_ms.to_string()),
        ("token", task.token.to_string()),
    ];
    if task.takeovers > 0 {
        f.push(("takeovers", task.takeovers.to_string()));
    }
    if let Some(t) = task.expire_ms {
        f.push(("expire_ms", t.to_string()));
    }
    if let Some(t) = task.schedule_tick_ms {
        f.push(("schedule_tick_ms", t.to_string()));
    }
    if !task.depends_on.is_empty() {
        f.push((
            "depends_on",
            serde_json::to_string(&task.depends_on).unwrap_or_default(),
        ));
    }
    if let Some(trace) = &task.trace {
        f.push(("trace_parent", trace.parent.clone()));
        if let Some(state) = &trace.state {
            f.push(("trace_state", state.clone()));
        }
    }
    for (name, value) in [
        ("cache_result", &task.cache_result),
        ("schedule", &task.schedule),
        ("debounce_key", &task.debounce_key),
        ("rate_limit_key", &task.rate_limit_key),
        ("concurrency_key", &task.concurrency_key),
        ("progress", &task.progress),
        ("result", &task.result),
        ("error", &task.error),
    ] {
        if let Some(v) = value {
            f.push((name, v.clone()));
        }
    }
    f
}

/// Rebuilds a task from its stored fields and log; says which field is
/// missing or malformed otherwise. The fields may be owned or borrowed (a
/// lease's reply is read in place: no string per field).
pub fn from_fields<K, V>(
    fields: &std::collections::HashMap<K, V>,
    log: Vec<String>,
) -> Result<Task, String>
where
    K: std::borrow::Borrow<str> + std::hash::Hash + Eq,
    V: AsRef<str>,
{
    let field = |name: &str| fields.get(name).map(AsRef::as_ref);
    let get = |name: &str| field(name).ok_or_else(|| format!("field {name} is missing"));
    let num = |name: &str| -> Result<i64, String> {
        get(name)?
            .parse()
            .map_err(|_| format!("field {name} is not a number"))
    };
    let opt_num = |name: &str| {
        field(name)
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|v| *v > 0)
    };
    let text = |name: &str| field(name).filter(|v| !v.is_empty()).map(str::to_owned);
    Ok(Task {
        id: TaskId::parse(get("id")?).map_err(|e| e.to_string())?,
        name: get("name")?.to_owned(),
        category: Category::parse(get("category")?).ok_or("field category is unknown")?,
        priority: Priority::from_band(num("band")? as u64).ok_or("field band is unknown")?,
        args: get("args")?.to_owned(),
        kwargs: get("kwargs")?.to_owned(),
        state: State::parse(get("state")?).ok_or("field state is unknown")?,
        cache_result: text("cache_result"),
        schedule: text("schedule"),
        schedule_tick_ms: field("schedule_tick_ms").and_then(|v| v.parse().ok()),
        depends_on: field("depends_on")
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_default(),
        attempts: num("attempts")? as u32,
        token: field("token")
            .and_then(|t| t.parse().ok())
            .unwrap_or(num("attempts")? as u32),
        takeovers: field("takeovers").and_then(|t| t.parse().ok()).unwrap_or(0),
        max_retries: num("max_retries")? as u32,
        worker: text("worker"),
        progress: text("progress"),
        result: text("result"),
        error: text("error"),
        created_ms: num("created_ms")?,
        started_ms: opt_num("started_ms"),
        finished_ms: opt_num("finished_ms"),
        soft_ms: num("soft_ms")? as u64,
        hard_ms: num("hard_ms")? as u64,
        result_ttl_ms: num("result_ttl_ms")? as u64,
        log,
        // absent from records written before traces were carried
        trace: text("trace_parent").map(|parent| TraceContext {
            parent,
            state: text("trace_state"),
        }),
        debounce_key: text("debounce_key"),
        expire_ms: opt_num("expire_ms"),
        rate_limit_key: text("rate_limit_key"),
        concurrency_key: text("concurrency_key"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::QueueName;

    /// A task survives the trip through its stored fields.
    #[test]
    fn task_fields_round_trip() {
        let q = QueueName::parse("research").unwrap();
        let task = Task {
            id: TaskId::generate(&q),
            name: "koo.tasks.research.sync".into(),
            category: Category::Research,
            priority: Priority::High,
            args: "[1,\"x\"]".into(),
            kwargs: "{}".into(),
            state: State::Queued,
            depends_on: vec![],
            schedule: Some("nightly".into()),
            schedule_tick_ms: Some(1_800_000_000_000),
            cache_result: None,
            attempts: 0,
            token: 0,
            takeovers: 2,
            max_retries: 3,
            worker: None,
            progress: None,
            result: None,
            error: Some("{\"message\":\"boom\"}".into()),
            created_ms: 1_800_000_000_000,
            started_ms: None,
            finished_ms: None,
            soft_ms: 1_500_000,
            hard_ms: 1_800_000,
            result_ttl_ms: 3_600_000,
            log: vec![],
            trace: Some(TraceContext {
                parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                state: Some("vendor=x".into()),
            }),
            debounce_key: Some("doc-7".into()),
            expire_ms: Some(1_800_000_060_000),
            rate_limit_key: Some("openai".into()),
            concurrency_key: Some("tenant-1".into()),
        };
        let fields = to_fields(&task)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(from_fields(&fields, vec![]).unwrap(), task);
        let mut broken = fields.clone();
        broken.remove("band");
        assert!(from_fields(&broken, vec![]).unwrap_err().contains("band"));
    }
}
