//! The one mapping from domain errors to gRPC statuses.
//!
//! Every variant is matched explicitly, so that a new error forces a decision
//! about its code. Argument errors carry a `google.rpc.BadRequest` detail
//! naming the field, for clients that read rich error details.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthError;
use crate::cache::CacheError;
use crate::schedule::ScheduleError;
use crate::store::StoreError;
use crate::tasks::engine::TaskError;
use crate::tasks::requeue::RequeueError;
use crate::watch::WatchError;
use crate::watch::upkeep::UpkeepError;

/// Longest status message koo sends. Messages quote input through
/// [`crate::quote::quote`]; this is the last bound, so that no message can
/// push the `grpc-message` trailer past a client's metadata limit (the client
/// would then see RESOURCE_EXHAUSTED instead of the real status).
const MAX_MESSAGE: usize = 1024;

/// `message`, cut to [`MAX_MESSAGE`].
fn bounded(message: String) -> String {
    match crate::quote::clip(&message, MAX_MESSAGE) {
        std::borrow::Cow::Borrowed(_) => message,
        std::borrow::Cow::Owned(cut) => cut,
    }
}

/// `INVALID_ARGUMENT` with a `BadRequest` field violation.
pub fn invalid_argument(field: &str, reason: &str) -> Status {
    let field = crate::quote::clip(field, 256);
    let reason = crate::quote::clip(reason, MAX_MESSAGE / 2);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {reason}"),
        ErrorDetails::with_bad_request_violation(field, reason),
    )
}

/// `status`, an argument error about one element of a batch, as an error of
/// the whole request: its field named by its place (`tasks[1].category`),
/// its reason unchanged. The reason is taken from the `BadRequest` detail,
/// not from the message, which already names the field once
/// (`category: is required` must not become
/// `tasks[1].category: category: is required`).
pub fn at_index(batch: &str, index: usize, status: &Status) -> Status {
    let details = status.get_error_details();
    match details
        .bad_request()
        .and_then(|b| b.field_violations.first())
    {
        Some(v) => invalid_argument(&format!("{batch}[{index}].{}", v.field), &v.description),
        None => invalid_argument(&format!("{batch}[{index}]"), status.message()),
    }
}

/// `e` with an argument error's field placed under `path` (`hello.` +
/// `queues[0]`): for domain calls that check part of a request.
pub fn task_error_in(path: &str, e: TaskError) -> Status {
    match e {
        TaskError::InvalidArgument { field, reason } => {
            invalid_argument(&format!("{path}{field}"), &reason)
        }
        other => other.into(),
    }
}

/// `e`, the error of element `element` of a batch that is applied in order,
/// as the status of the whole call: its code, its message after the
/// element's name, and what the call did before it (`done_label`: `done`,
/// or `none`), so that the caller knows what to retry.
pub fn after_partial_batch(
    e: impl Into<Status>,
    element: &str,
    done_label: &str,
    done: &[&str],
) -> Status {
    let status = e.into();
    let done = if done.is_empty() {
        "none".to_owned()
    } else {
        done.join(", ")
    };
    Status::new(
        status.code(),
        format!("{element}: {}; {done_label}: {done}", status.message()),
    )
}

/// The protocol statuses of a `WorkerService.Work` stream: what ends it
/// before a session starts, or because the worker sent what koo cannot read.
pub mod work {
    use std::time::Duration;

    use tonic::{Code, Status};

    /// Longest quote of a read error in the status that ends a stream.
    pub const MAX_QUOTE: usize = 300;

    /// No hello within `within` (the request timeout).
    pub fn no_hello(within: Duration) -> Status {
        Status::deadline_exceeded(format!(
            "no hello within {}",
            humantime::format_duration(within)
        ))
    }

    /// The first message was not a hello.
    pub fn hello_not_first() -> Status {
        super::invalid_argument("hello", "the first message of a Work stream must be hello")
    }

    /// The worker closed the stream before its hello.
    pub fn closed_before_hello() -> Status {
        Status::cancelled("the worker closed the stream before hello")
    }

    /// The trailer that tells a re-attaching worker its leases were kept.
    pub const LEASES_KEPT: &str = "koo-leases-kept";

    /// How a re-attaching worker's stream ends when koo stops: its `kept`
    /// leases stay, for it to re-attach to the next koo (the trailer
    /// [`LEASES_KEPT`] says how many, so that the worker can tell this end
    /// from one that ended its leases).
    pub fn leases_kept(kept: usize) -> Status {
        let mut status = Status::unavailable(format!(
            "koo is stopping: the {kept} tasks this stream holds keep their leases; re-attach them (hello.held) to the next koo within the lease"
        ));
        status
            .metadata_mut()
            .insert(LEASES_KEPT, kept.to_string().parse().expect("digits"));
        status
    }

    /// A hello to a koo that is stopping.
    pub fn stopping() -> Status {
        Status::unavailable(
            "koo is stopping: connect to another koo, or to this one once it is back",
        )
    }

    /// Whether a read error of a Work stream is a message koo could not read
    /// (over the size limit, not valid protobuf, nested too deep: tonic's
    /// OUT_OF_RANGE, koo's codec's INVALID_ARGUMENT, a decompression
    /// RESOURCE_EXHAUSTED) rather than a connection that broke. The worker
    /// was talking, so the stream ends with that status, and its tasks count.
    pub fn unreadable(status: &Status) -> bool {
        matches!(
            status.code(),
            Code::OutOfRange | Code::InvalidArgument | Code::ResourceExhausted
        )
    }

    /// The status that ends a stream whose worker sent a message koo could
    /// not read: the read error's code, and its reason quoted.
    pub fn unreadable_status(status: &Status) -> Status {
        Status::new(
            status.code(),
            format!(
                "a message on this Work stream could not be read, so the stream ends (tasks it held go back to their queues): {}",
                head_and_tail(status.message(), MAX_QUOTE)
            ),
        )
    }

    /// `text`, or its head and tail around an ellipsis when longer than
    /// `max` bytes (a decode error ends with its reason, after a field path
    /// that can be long).
    pub fn head_and_tail(text: &str, max: usize) -> String {
        if text.len() <= max {
            return text.to_owned();
        }
        let floor = |mut i: usize| {
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        let head = floor(max / 3);
        let mut tail = text.len() - (max - head);
        while !text.is_char_boundary(tail) {
            tail += 1;
        }
        format!("{}…{}", &text[..head], &text[tail..])
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A long read error is quoted by its head and its tail (where a
        /// decode error says why), within the bound, on character boundaries.
        #[test]
        fn quotes_are_bounded() {
            assert_eq!(head_and_tail("short", 10), "short");
            let long = format!(
                "{}é{}recursion limit reached",
                "a".repeat(99),
                "b".repeat(500)
            );
            let q = head_and_tail(&long, MAX_QUOTE);
            assert!(q.len() <= MAX_QUOTE + '…'.len_utf8() + 1, "{}", q.len());
            assert!(
                q.starts_with("aaa") && q.ends_with("recursion limit reached"),
                "{q}"
            );
            assert!(unreadable(&Status::out_of_range("too large")));
            assert!(!unreadable(&Status::unknown("h2 protocol error")));
            assert!(!unreadable(&Status::cancelled("gone")));
        }
    }
}

impl From<UpkeepError> for Status {
    fn from(e: UpkeepError) -> Self {
        let message = || bounded(e.to_string());
        match e {
            UpkeepError::InvalidEntries { reason } => invalid_argument("entries", &reason),
            UpkeepError::Task(task) => task.into(),
            UpkeepError::Ended { .. } | UpkeepError::Unserved { .. } => {
                Status::failed_precondition(message())
            }
            UpkeepError::Report(_) => Status::internal(message()),
        }
    }
}

impl From<RequeueError> for Status {
    fn from(e: RequeueError) -> Self {
        let at = format!("task_ids[{}]", e.index);
        match e.error {
            TaskError::InvalidArgument { reason, .. } => invalid_argument(&at, &reason),
            other => {
                let requeued: Vec<&str> = e.requeued.iter().map(String::as_str).collect();
                after_partial_batch(other, &at, "requeued before it", &requeued)
            }
        }
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        let message = bounded(e.to_string());
        match e {
            StoreError::Unavailable(_) => Status::unavailable(message),
            StoreError::DeadlineExceeded => Status::deadline_exceeded(message),
            StoreError::OutOfMemory(_) => Status::resource_exhausted(message),
            StoreError::WrongType(_) => Status::data_loss(message),
            StoreError::Backend(_) => Status::internal(message),
            StoreError::InvalidCursor(_) => Status::invalid_argument(message),
            StoreError::Expired(_) => Status::out_of_range(message),
            StoreError::InvalidConfig(_) => Status::failed_precondition(message),
        }
    }
}

impl From<CacheError> for Status {
    fn from(e: CacheError) -> Self {
        let message = || bounded(e.to_string());
        match e {
            CacheError::InvalidArgument { field, reason } => invalid_argument(&field, &reason),
            // the field once: the message is `field: reason`, the detail
            // names it apart
            CacheError::ValueTooLarge { field, size, limit } => invalid_argument(
                &field,
                &format!("is {size} bytes, over the limit of {limit} bytes (CACHE_MAX_VALUE_SIZE)"),
            ),
            CacheError::ReplyTooLarge { .. } => Status::resource_exhausted(message()),
            CacheError::Corrupt { .. } => Status::data_loss(message()),
            CacheError::WarmFile { .. } => Status::failed_precondition(message()),
            CacheError::LockLost => Status::failed_precondition(message()),
            CacheError::DeadlineExceeded => Status::deadline_exceeded(message()),
            CacheError::Store(store) => store.into(),
        }
    }
}

impl From<crate::watch::compute::ComputeError> for Status {
    fn from(e: crate::watch::compute::ComputeError) -> Self {
        use crate::watch::compute::ComputeError as E;
        match e {
            E::Cache(e) => e.into(),
            E::Task(e) => e.into(),
            E::Failed { .. } | E::Vanished { .. } => {
                Status::failed_precondition(bounded(e.to_string()))
            }
            E::Unfinished { .. } => Status::deadline_exceeded(bounded(e.to_string())),
        }
    }
}

impl From<TaskError> for Status {
    fn from(e: TaskError) -> Self {
        let message = || bounded(e.to_string());
        match e {
            TaskError::InvalidArgument { field, reason } => invalid_argument(&field, &reason),
            TaskError::NotFound(_) => Status::not_found(message()),
            TaskError::Fenced(_) => Status::aborted(message()),
            TaskError::Missing(_) => Status::not_found(message()),
            TaskError::FailedPrecondition(_) => Status::failed_precondition(message()),
            TaskError::AlreadyExists(_) => Status::already_exists(message()),
            TaskError::Forbidden(_) => Status::permission_denied(message()),
            TaskError::TooManyHeld { held, bound } => Status::with_error_details(
                Code::ResourceExhausted,
                message(),
                ErrorDetails::with_error_info(
                    "TOO_MANY_HELD",
                    "koo",
                    [
                        ("held".to_owned(), held.to_string()),
                        ("max_held_per_worker".to_owned(), bound.to_string()),
                    ],
                ),
            ),
            TaskError::Store(store) => store.into(),
        }
    }
}

impl From<WatchError> for Status {
    fn from(e: WatchError) -> Self {
        let message = bounded(e.to_string());
        match e {
            WatchError::TooMany { max } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_error_info(
                    "TOO_MANY_WATCHERS",
                    "koo",
                    [("max_watchers".to_owned(), max.to_string())],
                ),
            ),
            // The token is whole in the details (a client needs all of it);
            // the message does not quote it.
            WatchError::FellBehind {
                buffer,
                resume_token,
            } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_error_info(
                    "WATCHER_FELL_BEHIND",
                    "koo",
                    [
                        ("resume_token".to_owned(), resume_token),
                        ("watch_buffer".to_owned(), buffer.to_string()),
                    ],
                ),
            ),
            WatchError::Gap { .. } => Status::out_of_range(message),
            WatchError::ResumeToken { reason } => invalid_argument("resume_token", &reason),
            WatchError::Stopped => Status::unavailable(message),
            WatchError::Store(store) => store.into(),
            WatchError::Task(task) => task.into(),
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        let message = bounded(e.to_string());
        match e {
            AuthError::NoCredentials { .. }
            | AuthError::Malformed
            | AuthError::Repeated
            | AuthError::UnknownKey
            | AuthError::WrongWorkerToken
            | AuthError::UnknownPrincipal { .. } => Status::unauthenticated(message),
            AuthError::Denied { .. } | AuthError::OutOfScope { .. } => {
                Status::permission_denied(message)
            }
            AuthError::Unimplemented(_) => Status::unimplemented(message),
            AuthError::Shed { limit } => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                ErrorDetails::with_error_info(
                    "TOO_MANY_INFLIGHT_CALLS",
                    "koo",
                    [("KOO_MAX_INFLIGHT_CALLS".to_owned(), limit.to_string())],
                ),
            ),
        }
    }
}

impl From<ScheduleError> for Status {
    fn from(e: ScheduleError) -> Self {
        let message = || bounded(e.to_string());
        match e {
            ScheduleError::InvalidArgument { field, reason } => invalid_argument(&field, &reason),
            ScheduleError::NotFound(_) => Status::not_found(message()),
            ScheduleError::AlreadyExists(_) => Status::already_exists(message()),
            ScheduleError::ConfigDefault { .. } => Status::failed_precondition(message()),
            ScheduleError::Store(store) => store.into(),
            ScheduleError::Task(task) => task.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each error lands on its documented code.
    #[test]
    fn codes() {
        let cases: Vec<(Status, Code)> = vec![
            (
                CacheError::invalid("key", "must not be empty").into(),
                Code::InvalidArgument,
            ),
            (
                CacheError::ValueTooLarge {
                    field: "value".into(),
                    size: 2,
                    limit: 1,
                }
                .into(),
                Code::InvalidArgument,
            ),
            (
                CacheError::ReplyTooLarge { size: 2, limit: 1 }.into(),
                Code::ResourceExhausted,
            ),
            (
                CacheError::Corrupt {
                    key: "k".into(),
                    reason: "x".into(),
                }
                .into(),
                Code::DataLoss,
            ),
            (
                CacheError::WarmFile {
                    path: "p".into(),
                    reason: "x".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                StoreError::Unavailable("x".into()).into(),
                Code::Unavailable,
            ),
            (StoreError::DeadlineExceeded.into(), Code::DeadlineExceeded),
            (
                StoreError::OutOfMemory("x".into()).into(),
                Code::ResourceExhausted,
            ),
        ];
        for (status, code) in cases {
            assert_eq!(status.code(), code, "{status:?}");
        }
        let big: Status = CacheError::ValueTooLarge {
            field: "value".into(),
            size: 2,
            limit: 1,
        }
        .into();
        assert_eq!(
            big.message(),
            "value: is 2 bytes, over the limit of 1 bytes (CACHE_MAX_VALUE_SIZE)",
            "the field named once"
        );
        let auth: Vec<(AuthError, Code)> = vec![
            (AuthError::UnknownKey, Code::Unauthenticated),
            (AuthError::WrongWorkerToken, Code::Unauthenticated),
            (AuthError::Malformed, Code::Unauthenticated),
            (AuthError::Repeated, Code::Unauthenticated),
            (
                AuthError::Denied {
                    method: "m".into(),
                    needed: "admin",
                    principal: "p".into(),
                    role: "reader",
                },
                Code::PermissionDenied,
            ),
            (AuthError::Unimplemented("x".into()), Code::Unimplemented),
            (AuthError::Shed { limit: 1 }, Code::ResourceExhausted),
        ];
        for (e, code) in auth {
            assert_eq!(Status::from(e.clone()).code(), code, "{e:?}");
        }
        let s = at_index("tasks", 1, &invalid_argument("category", "is required"));
        assert_eq!(s.message(), "tasks[1].category: is required");
        let s = invalid_argument("entries[1].key", "must not be empty");
        let details = s.get_error_details();
        let violation = &details.bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, "entries[1].key");
    }
}
