//! The arguments task scripts take and the replies they give, shared by
//! the transitions that run the same script alone or composed (lease, and
//! finish-then-lease).

use std::collections::HashMap;
use std::time::Duration;

use super::{RedisTasks, millis};
use crate::domain::Outcome;
use crate::domain::task::{QueueName, Task, TaskId};
use crate::keys::QueueKeys;
use crate::store::redis::script::Invocation;
use crate::store::task_fields;
use crate::store::tasks::{LeaseAsk, Leased, TaskLimits};
use crate::store::{Result, StoreError};

/// How many candidates that need flow control a chained lease names on a
/// Cluster: slots of a process that end at once meet the same head, and
/// each goes on with the first that no other one is reserving (with one,
/// all but one would lease again to learn of the next).
const CHAINED_NEEDS: u8 = 4;

/// How a lease meets flow control on a Redis Cluster (lease.lua's
/// `cluster`, `grant` and `denied`; see `flow_cluster.rs`): `grant` and
/// `denied` are `""` but in a lease that reserves (and a chained one's
/// `denied`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Reserving<'a> {
    pub(super) cluster: bool,
    /// How many candidates that need flow control a reserving call names
    /// (see lease.lua; one but in `flow_cluster.rs`'s later rounds).
    pub(super) needs: u8,
    pub(super) grant: &'a str,
    pub(super) denied: &'a str,
}

impl<'a> Reserving<'a> {
    /// A lease that does not reserve: on a Cluster, a candidate that needs
    /// flow control ends it held for 1 ms (the next lease reserves).
    pub(super) fn plain(cluster: bool) -> Self {
        Self {
            cluster,
            needs: 1,
            grant: "",
            denied: "",
        }
    }

    /// A lease chained to a finish: on a Cluster, a candidate that needs
    /// flow control ends it naming the candidate, and the caller goes on
    /// reserving from them (`flow_cluster.rs`); it passes over the
    /// candidates other leases of the process are reserving (`denied`:
    /// their `id:` lines) and names up to [`CHAINED_NEEDS`].
    pub(super) fn chained(cluster: bool, denied: &'a str) -> Self {
        Self {
            cluster,
            needs: CHAINED_NEEDS,
            grant: if cluster { "-" } else { "" },
            denied,
        }
    }
}

/// Arguments of lease.lua (its keys are pushed with the queue's), for
/// `queue`, flow control's keys under `flow_base` ([`crate::keys::flow_base`]).
pub(super) fn lease_args(
    call: &mut Invocation<'_>,
    (flow_base, queue): (&str, &QueueName),
    keys: &QueueKeys,
    (next, reserving): (&LeaseAsk<'_>, Reserving<'_>),
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
        .arg("queue", queue.as_str())
        // (lease.lua's `cluster`: 0 on one Redis, else how many candidates
        // a reserving call may name)
        .arg(
            "cluster",
            if reserving.cluster {
                reserving.needs.max(1)
            } else {
                0
            },
        )
        .arg("grant", reserving.grant)
        .arg("denied", reserving.denied);
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
            let task = match borrowed_hash(&other) {
                Some(fields) => task_fields::from_fields(&fields, Vec::new()),
                None => {
                    let fields: HashMap<String, String> =
                        redis::FromRedisValue::from_redis_value(other).map_err(|e| {
                            StoreError::Backend(format!("a leased task's hash: {e}"))
                        })?;
                    task_fields::from_fields(&fields, Vec::new())
                }
            };
            task.map(|t| Leased::Task(Box::new(t)))
                .map_err(StoreError::Backend)
        }
    }
}

/// A hash returned by a script as a flat array of field, value pairs, read
/// in place (every lease makes one: a string per field would be its
/// largest allocation); `None` for any other shape or bytes that are not
/// UTF-8, which the caller reads the general way (and reports).
fn borrowed_hash(reply: &redis::Value) -> Option<HashMap<&str, &str>> {
    let redis::Value::Array(items) = reply else {
        return None;
    };
    if items.len() % 2 != 0 {
        return None;
    }
    fn text(v: &redis::Value) -> Option<&str> {
        match v {
            redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
    let mut fields = HashMap::with_capacity(items.len() / 2);
    for pair in items.chunks_exact(2) {
        fields.insert(text(&pair[0])?, text(&pair[1])?);
    }
    Some(fields)
}

impl RedisTasks {
    /// A submit.lua call for `task` (PENDING on `waiting` when not empty);
    /// `wake`: whether a task due now wakes an idle process (not when the
    /// caller leases it for an idle worker of its own in the same trip).
    pub(super) fn submit_call(
        &self,
        task: &Task,
        delay: Duration,
        waiting: &[TaskId],
        limits: TaskLimits,
        wake: bool,
    ) -> Invocation<'_> {
        let keys = self.keys(&task.id.queue());
        let mut call = self.scripts().submit.call(self.clock());
        call.queue_keys(&keys, Some(&task.id))
            .arg("id", task.id.as_str())
            .arg("band", task.priority.band())
            .arg("delay_ms", millis(delay))
            .arg("events_cap", limits.events)
            .arg("deps", waiting.len())
            .arg("expire_ms", task.expire_ms.unwrap_or(0))
            // the fair key (see "Fair order"): the concurrency key, else the
            // rate-limit key; empty for none
            .arg(
                "fkey",
                task.concurrency_key
                    .as_deref()
                    .or(task.rate_limit_key.as_deref())
                    .unwrap_or(""),
            )
            .arg("name", task.name.as_str())
            .arg("wake", u8::from(wake));
        for dep in waiting {
            call.extra(dep.as_str());
        }
        for (field, value) in task_fields::to_fields(task) {
            call.extra(field).extra(value);
        }
        call
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn hash(pairs: &[(&str, &[u8])]) -> Vec<Value> {
        pairs
            .iter()
            .flat_map(|(k, v)| {
                [
                    Value::BulkString(k.as_bytes().to_vec()),
                    Value::BulkString(v.to_vec()),
                ]
            })
            .collect()
    }

    /// A lease's reply (a flat array, as a script returns a hash) is read in
    /// place; a map (RESP3's shape) the general way, to the same task; bytes
    /// that are not UTF-8 are an error naming the hash, never a panic.
    #[test]
    fn a_leased_hash_is_read_in_place_or_the_general_way() {
        let id = TaskId::generate(&QueueName::parse("research").unwrap());
        let pairs: Vec<(&str, &[u8])> = vec![
            ("id", id.as_str().as_bytes()),
            ("name", b"noop"),
            ("category", b"research"),
            ("band", b"2"),
            ("args", b"[]"),
            ("kwargs", b"{}"),
            ("state", b"running"),
            ("attempts", b"1"),
            ("token", b"1"),
            ("max_retries", b"3"),
            ("created_ms", b"1796533099057"),
            ("soft_ms", b"0"),
            ("hard_ms", b"0"),
            ("result_ttl_ms", b"3600000"),
            ("worker", b"w/0"),
        ];
        let flat = Value::Array(hash(&pairs));
        assert!(borrowed_hash(&flat).is_some());
        let Ok(Leased::Task(in_place)) = leased(flat, 0) else {
            panic!("not read");
        };
        assert_eq!(
            (in_place.id.as_str(), in_place.name.as_str()),
            (id.as_str(), "noop")
        );
        assert_eq!(in_place.worker.as_deref(), Some("w/0"));
        let map = Value::Map(
            hash(&pairs)
                .chunks_exact(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect(),
        );
        assert!(borrowed_hash(&map).is_none());
        let Ok(Leased::Task(general)) = leased(map, 0) else {
            panic!("not read");
        };
        assert_eq!(general, in_place);
        let mut bad = pairs.clone();
        bad[1] = ("name", b"\xff\xfe");
        let err = leased(Value::Array(hash(&bad)), 0).unwrap_err();
        assert!(err.to_string().contains("a leased task's hash"), "{err}");
    }
}
