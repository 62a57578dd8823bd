//! The worker protocol's messages as the domain's: a `Work` stream's
//! messages to and from a session's [`Inbound`] and [`Outbound`], and the
//! JSON a worker reports (progress metadata, results, failure details).

use std::time::SystemTime;

use prost_types::value::Kind;
use tonic::Status;

use crate::domain::task::State;
use crate::grpc::json;
use crate::grpc::tasks::{to_pb_state, to_pb_task};
use crate::pb::worker::v1 as pb;
use crate::pb::worker::v1::work_request::Message as In;
use crate::pb::worker::v1::work_response::Message as Out;
use crate::tasks::engine::TaskError;
use crate::tasks::remote::{Failure, Inbound, Outbound, Progress, ReplyKind, RetryDelay};

pub(super) fn state(s: State) -> i32 {
    to_pb_state(s) as i32
}

pub(super) fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A protobuf Struct as a JSON object (`{}` when absent).
pub(super) fn struct_json(
    field: &str,
    s: Option<prost_types::Struct>,
) -> Result<serde_json::Value, TaskError> {
    let value = prost_types::Value {
        kind: Some(Kind::StructValue(s.unwrap_or_default())),
    };
    json::to_serde(&value).map_err(|e| TaskError::invalid(field, e))
}

/// A protobuf Value as JSON (`null` when absent).
pub(super) fn value_json(
    field: &str,
    v: Option<prost_types::Value>,
) -> Result<serde_json::Value, TaskError> {
    match v {
        None | Some(prost_types::Value { kind: None }) => Ok(serde_json::Value::Null),
        Some(v) => json::to_serde(&v).map_err(|e| TaskError::invalid(field, e)),
    }
}

/// A failure's retry delay as sent: checked with the rest of the failure
/// (`Failure::into_finish`), so that a bad one is the report's refusal on a
/// stream, not the stream's end.
pub(super) fn retry_delay(d: prost_types::Duration) -> RetryDelay {
    RetryDelay {
        seconds: d.seconds,
        nanos: d.nanos,
    }
}

/// A protocol message as the session's input.
pub(super) fn inbound(msg: pb::WorkRequest) -> Inbound {
    // the whole message is what the worker got wrong: its field is named
    // in the reason
    let bad = |e: TaskError| Inbound::Invalid(TaskError::invalid("message", e.to_string()));
    match msg.message {
        None => Inbound::Invalid(TaskError::invalid("message", "a message with nothing set")),
        Some(In::Hello(_)) => Inbound::Invalid(TaskError::invalid(
            "message",
            "hello may only be the stream's first message",
        )),
        Some(In::Batch(b)) => batch(b.requests),
        Some(In::Heartbeat(_)) => Inbound::Heartbeat,
        Some(In::Started(s)) => Inbound::Started(s.task_ids),
        Some(In::Draining(_)) => Inbound::Draining,
        // the reason only goes to koo's log: a long one is cut, never
        // the stream (a stopping worker's tasks would count as lost)
        Some(In::Release(mut r)) => {
            if r.reason.len() > MAX_RELEASE_REASON {
                let mut end = MAX_RELEASE_REASON;
                while !r.reason.is_char_boundary(end) {
                    end -= 1;
                }
                r.reason.truncate(end);
            }
            Inbound::Release {
                id: r.task_id,
                token: r.lease_token,
                reason: r.reason,
            }
        }
        Some(In::Progress(p)) => match struct_json("progress.metadata", p.metadata) {
            Ok(metadata) => Inbound::Progress {
                id: p.task_id,
                token: p.lease_token,
                secret: p.lease_secret,
                progress: Progress {
                    percent: p.percent,
                    message: p.message,
                    metadata,
                },
            },
            Err(e) => bad(e),
        },
        Some(In::Complete(c)) => match value_json("complete.result", c.result) {
            Ok(result) => Inbound::Complete {
                id: c.task_id,
                token: c.lease_token,
                secret: c.lease_secret,
                result,
            },
            Err(e) => bad(e),
        },
        Some(In::Fail(f)) => {
            let details = match f.details {
                Some(d) => match struct_json("fail.details", Some(d)) {
                    Ok(d) => Some(d),
                    Err(e) => return bad(e),
                },
                None => None,
            };
            Inbound::Fail {
                id: f.task_id,
                token: f.lease_token,
                secret: f.lease_secret,
                failure: Failure {
                    message: f.message,
                    retryable: f.retryable,
                    details,
                    retry_delay: f.retry_delay.map(retry_delay),
                    key_retry_after: f.key_retry_after.map(retry_delay),
                },
            }
        }
    }
}

/// Longest reason a release gives, in bytes.
const MAX_RELEASE_REASON: usize = 1024;

/// Most messages in one batch, either way.
pub(super) const MAX_BATCH: usize = 4096;

/// A worker's batch as the session's input: its messages in order, or
/// the first one koo cannot read (named by its index) as the reason the
/// stream ends.
fn batch(requests: Vec<pb::WorkRequest>) -> Inbound {
    let invalid = |reason: String| Inbound::Invalid(TaskError::invalid("message", reason));
    if requests.is_empty() {
        return invalid("batch.requests: an empty batch".to_owned());
    }
    if requests.len() > MAX_BATCH {
        return invalid(format!(
            "batch.requests: {} messages, at most {MAX_BATCH}",
            requests.len()
        ));
    }
    let mut items = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        let item = match r.message {
            Some(In::Hello(_)) => {
                return invalid(format!(
                    "batch.requests[{i}]: hello may only be the stream's first message"
                ));
            }
            Some(In::Batch(_)) => {
                return invalid(format!(
                    "batch.requests[{i}]: a batch may not hold another batch"
                ));
            }
            message => inbound(pb::WorkRequest { message }),
        };
        match item {
            Inbound::Invalid(TaskError::InvalidArgument { reason, .. }) => {
                return invalid(format!("batch.requests[{i}]: {reason}"));
            }
            Inbound::Invalid(e) => return Inbound::Invalid(e),
            item => items.push(item),
        }
    }
    Inbound::Batch(items)
}

/// A session's output as a protocol message.
pub(super) fn outbound(msg: Outbound) -> pb::WorkResponse {
    let message = match msg {
        Outbound::Task { task, secret } => {
            let lease_token = task.token;
            Out::Task(pb::TaskAssignment {
                task: Some(to_pb_task(*task)),
                lease_token,
                lease_secret: secret,
                push_time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            })
        }
        Outbound::Cancel { id, reason } => Out::Cancel(pb::CancelRequested {
            task_id: id.to_string(),
            reason,
        }),
        Outbound::SoftLimit(id) => Out::SoftTimeLimit(pb::SoftTimeLimitReached {
            task_id: id.to_string(),
        }),
        Outbound::Revoked { id, reason } => Out::Revoked(pb::LeaseRevoked {
            task_id: id.to_string(),
            reason,
        }),
        Outbound::Reply { id, kind, outcome } => Out::Reply(reply(id, kind, outcome)),
        Outbound::Batch(messages) => Out::Batch(pb::WorkResponseBatch {
            responses: messages.into_iter().map(outbound).collect(),
        }),
    };
    pb::WorkResponse {
        message: Some(message),
    }
}

/// A session's output as protocol messages, one per message a batch holds
/// (for workers that read no batches, and for koo's own batching).
pub(super) fn outbound_each(msg: Outbound) -> impl Iterator<Item = pb::WorkResponse> {
    let messages = match msg {
        Outbound::Batch(messages) => messages,
        one => vec![one],
    };
    messages.into_iter().map(outbound)
}

/// The answer to a report on the stream: the state it moved the task to,
/// or the status of the error it met (as a unary call would have).
fn reply(task_id: String, kind: ReplyKind, outcome: Result<Option<State>, TaskError>) -> pb::Reply {
    let kind = match kind {
        ReplyKind::Progress => pb::ReplyKind::Progress,
        ReplyKind::Complete => pb::ReplyKind::Complete,
        ReplyKind::Fail => pb::ReplyKind::Fail,
        ReplyKind::Release => pb::ReplyKind::Release,
    } as i32;
    match outcome {
        Ok(s) => pb::Reply {
            task_id,
            kind,
            code: 0,
            message: String::new(),
            state: s.map_or(0, state),
        },
        Err(e) => {
            let status = Status::from(e);
            pb::Reply {
                task_id,
                kind,
                code: status.code() as i32,
                message: status.message().to_owned(),
                state: 0,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report that cannot be read is the session's invalid input, naming
    /// the field once in its reason; an empty message is one too.
    #[test]
    fn unreadable_reports_are_invalid_input() {
        let reason = |msg| match inbound(msg) {
            Inbound::Invalid(TaskError::InvalidArgument { field, reason }) => {
                assert_eq!(field, "message");
                reason
            }
            _ => panic!("not invalid"),
        };
        assert_eq!(
            reason(pb::WorkRequest { message: None }),
            "a message with nothing set"
        );
        let nan = prost_types::Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        let r = reason(pb::WorkRequest {
            message: Some(In::Complete(pb::Complete {
                result: Some(nan),
                ..Default::default()
            })),
        });
        assert!(r.starts_with("complete.result: "), "{r}");
    }
}
