//! The arguments task scripts take and the replies they give, shared by
//! the transitions that run the same script alone or composed (lease, and
//! finish-then-lease).

use std::collections::HashMap;
use std::time::Duration;

use super::millis;
use crate::domain::Outcome;
use crate::domain::task::{QueueName, TaskId};
use crate::keys::QueueKeys;
use crate::store::redis::script::Invocation;
use crate::store::task_fields;
use crate::store::tasks::{LeaseAsk, Leased, TaskLimits};
use crate::store::{Result, StoreError};

/// Arguments of lease.lua (its keys are pushed with the queue's), for
/// `queue`, flow control's keys under `flow_base` ([`crate::keys::flow_base`]).
pub(super) fn lease_args(
    call: &mut Invocation<'_>,
    (flow_base, queue): (&str, &QueueName),
    keys: &QueueKeys,
    next: &LeaseAsk<'_>,
    limits: TaskLimits,
) {
    call.arg("prefix", keys.task_prefix())
        .arg("lease_ms", millis(next.lease))
        .arg("worker", next.worker)
        .arg("events_cap", limits.events)
        .arg("scan", limits.lease_scan)
        .arg("history_cap", limits.history)
        .arg("flow", u8::from(limits.flow))
        .arg("flow_base", flow_base)
        .arg("queue", queue.as_str());
    for name in next.names {
        call.extra(*name);
    }
}

/// Arguments of finish.lua.
pub(super) fn finish_args(
    call: &mut Invocation<'_>,
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
    call.arg("id", id.as_str())
        .arg("token", token)
        .arg("events_cap", limits.events)
        .arg("outcome", name)
        .arg("payload", payload.as_str())
        .arg("delay_ms", millis(delay))
        .arg("history_cap", limits.history)
        .arg("log", log)
        .arg("dead_ttl_ms", millis(limits.dead_ttl));
}

/// What lease.lua returns: the leased task's hash, nothing (nil), or how
/// long limits hold the queue (an integer: ms from now, or 0 when only
/// concurrency caps hold it).
/// `sent_ms`: when the call was sent, on this process's clock: the wait
/// counts from then (the script ran after it), so that the reply's own
/// latency does not make a worker late for a token.
pub(super) fn leased(reply: redis::Value, sent_ms: i64) -> Result<Leased> {
    match reply {
        redis::Value::Nil => Ok(Leased::Empty),
        // a wait from the script's now: on this process's clock, so that a
        // skew between it and Redis's cannot make a worker spin or oversleep
        redis::Value::Int(wait) => Ok(Leased::Held(
            (wait > 0).then(|| sent_ms.saturating_add(wait)),
        )),
        other => {
            let fields: HashMap<String, String> = redis::FromRedisValue::from_redis_value(other)
                .map_err(|e| StoreError::Backend(format!("a leased task's hash: {e}")))?;
            task_fields::from_fields(&fields, Vec::new())
                .map(|t| Leased::Task(Box::new(t)))
                .map_err(StoreError::Backend)
        }
    }
}
