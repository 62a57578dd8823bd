//! A submit request as the engine takes it: arguments as JSON, times as
//! durations, the cached result's target with its level's default TTL.

use std::time::{Duration, SystemTime};

use prost_types::value::Kind;
use tonic::Status;

use super::model::{category, priority};
use crate::cache::Cache;
use crate::domain::task::{CacheTarget, QueueName, TraceContext};
use crate::grpc::json;
use crate::grpc::status::{at_index, invalid_argument};
use crate::grpc::time::{self, duration};
use crate::pb::tasks::v1 as pb;
use crate::tasks::engine::{Debounce, Expiry, NewTask};

/// A submit as the engine takes it; `cache` resolves a cached result's
/// default TTL; `trace` is the submitting call's trace context.
pub(super) fn new_task(
    r: pb::SubmitTaskRequest,
    cache: &Cache,
    trace: Option<TraceContext>,
) -> Result<NewTask, Status> {
    let cache_result = match r.cache_result {
        None => None,
        Some(c) => {
            let level = crate::grpc::cache::level("cache_result.level", c.level)?;
            let ttl = duration("cache_result.ttl", c.ttl, time::CACHE_TTL)?
                .unwrap_or(cache.default_ttl(level));
            let soft_ttl = duration("cache_result.soft_ttl", c.soft_ttl, time::CACHE_TTL)?;
            crate::cache::tags::check("cache_result.", &c.tags, soft_ttl, ttl)?;
            Some(CacheTarget {
                level,
                key: c.key,
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                tags: c.tags,
                soft_ttl_ms: soft_ttl.map(|s| u64::try_from(s.as_millis()).unwrap_or(u64::MAX)),
            })
        }
    };
    let args = prost_types::Value {
        kind: Some(Kind::ListValue(prost_types::ListValue { values: r.args })),
    };
    let kwargs = prost_types::Value {
        kind: Some(Kind::StructValue(r.kwargs.unwrap_or_default())),
    };
    let max_retries = match r.max_retries {
        Some(n) if n < 0 => return Err(invalid_argument("max_retries", "must not be negative")),
        Some(n) => Some(n as u32),
        None => None,
    };
    let queue = match r.queue.as_str() {
        "" => None,
        q => Some(QueueName::parse(q).map_err(|e| invalid_argument("queue", &e.to_string()))?),
    };
    let countdown = duration("countdown", r.countdown, time::COUNTDOWN)?;
    let eta = time::time("eta", r.eta, Some((time::COUNTDOWN.max(), "365 days")))?;
    let delay = match (countdown, eta) {
        (Some(_), Some(_)) => {
            return Err(invalid_argument(
                "eta",
                "give either countdown or eta, not both",
            ));
        }
        (Some(d), None) => d,
        // an ETA in the past means now
        (None, Some(eta)) => eta.duration_since(SystemTime::now()).unwrap_or_default(),
        (None, None) => Duration::ZERO,
    };
    let debounce = debounce(&r.debounce_key, r.debounce_window)?;
    let expires = expires(r.expire_time, r.expire_after)?;
    Ok(NewTask {
        debounce,
        name: r.name,
        category: category(r.category)?,
        queue,
        priority: priority(r.priority)?,
        args: json::to_json(&args).map_err(|e| invalid_argument("args", &e))?,
        kwargs: json::to_json(&kwargs).map_err(|e| invalid_argument("kwargs", &e))?,
        max_retries,
        delay,
        soft_time_limit: duration("soft_time_limit", r.soft_time_limit, time::SOFT_TIME_LIMIT)?,
        time_limit: duration("time_limit", r.time_limit, time::TIME_LIMIT)?,
        result_ttl: duration("result_ttl", r.result_ttl, time::RESULT_TTL)?,
        cache_result,
        idempotency_key: (!r.idempotency_key.is_empty()).then_some(r.idempotency_key),
        depends_on: r.depends_on,
        schedule: None,
        schedule_tick_ms: None,
        trace,
        expires,
        // empty means none; the engine checks the rest
        rate_limit_key: (!r.rate_limit_key.is_empty()).then_some(r.rate_limit_key),
        concurrency_key: (!r.concurrency_key.is_empty()).then_some(r.concurrency_key),
        idempotency_ttl: None,
    })
}

/// A debounced submit's key and window: both or neither (the engine
/// checks the key's length and what may come with it).
fn debounce(key: &str, window: Option<prost_types::Duration>) -> Result<Option<Debounce>, Status> {
    let window = duration("debounce_window", window, time::DEBOUNCE_WINDOW)?;
    match (key.is_empty(), window) {
        (true, None) => Ok(None),
        (true, Some(_)) => Err(invalid_argument(
            "debounce_window",
            "is only taken with a debounce_key",
        )),
        (false, None) => Err(invalid_argument(
            "debounce_window",
            "is required with a debounce_key (1 ms to 24 h)",
        )),
        (false, Some(window)) => Ok(Some(Debounce {
            key: key.to_owned(),
            window,
        })),
    }
}

/// The submit's expiry: `expire_time` or `expire_after`, not both (their
/// relation to now and to the countdown is the engine's check).
fn expires(
    at: Option<prost_types::Timestamp>,
    after: Option<prost_types::Duration>,
) -> Result<Option<Expiry>, Status> {
    let at = time::time(
        "expire_time",
        at,
        Some((time::EXPIRE_AFTER.max(), "366 days")),
    )?;
    let after = duration("expire_after", after, time::EXPIRE_AFTER)?;
    match (at, after) {
        (Some(_), Some(_)) => Err(invalid_argument(
            "expire_after",
            "give either expire_time or expire_after, not both",
        )),
        (Some(at), None) => Ok(Some(Expiry::At(at))),
        (None, Some(d)) => Ok(Some(Expiry::After(d))),
        (None, None) => Ok(None),
    }
}

/// Most tasks in one SubmitTasks.
pub(super) const MAX_BATCH: usize = 100;

/// A SubmitTasks batch as the engine takes it: at most [`MAX_BATCH`]
/// tasks, each named by its place when it is wrong, none with an
/// idempotency key or dependencies (only SubmitTask takes those).
pub(super) fn batch(
    requests: Vec<pb::SubmitTaskRequest>,
    cache: &Cache,
    trace: Option<TraceContext>,
) -> Result<Vec<NewTask>, Status> {
    if requests.len() > MAX_BATCH {
        return Err(invalid_argument(
            "tasks",
            &format!(
                "has {} tasks, over the limit of {MAX_BATCH}",
                requests.len()
            ),
        ));
    }
    let news = requests
        .into_iter()
        .enumerate()
        .map(|(i, r)| new_task(r, cache, trace.clone()).map_err(|s| at_index("tasks", i, &s)))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(i) = news.iter().position(|n| n.idempotency_key.is_some()) {
        return Err(invalid_argument(
            &format!("tasks[{i}].idempotency_key"),
            "only SubmitTask takes an idempotency key",
        ));
    }
    if let Some(i) = news.iter().position(|n| n.debounce.is_some()) {
        return Err(invalid_argument(
            &format!("tasks[{i}].debounce_key"),
            "only SubmitTask takes a debounce key",
        ));
    }
    if let Some(i) = news.iter().position(|n| !n.depends_on.is_empty()) {
        return Err(invalid_argument(
            &format!("tasks[{i}].depends_on"),
            "only SubmitTask takes dependencies",
        ));
    }
    Ok(news)
}
