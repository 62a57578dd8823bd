//! The messages of a Work stream, in the domain's terms (the gRPC adapter
//! converts them from and to protobuf).

use super::super::{Failure, Progress};
use crate::domain::task::{State, Task, TaskId};
use crate::tasks::engine::TaskError;

/// What a stream worker sends (after its hello).
#[derive(Debug, Clone)]
pub enum Inbound {
    /// Extends every lease the stream holds.
    Heartbeat,
    /// Progress of a held task.
    Progress {
        /// The task.
        id: String,
        /// Its lease token.
        token: u32,
        /// Its lease secret (empty: none; needed only for a task the
        /// stream does not hold).
        secret: String,
        /// The report.
        progress: Progress,
    },
    /// A held task succeeded with this result (JSON).
    Complete {
        /// The task.
        id: String,
        /// Its lease token.
        token: u32,
        /// Its lease secret (as for progress).
        secret: String,
        /// The result.
        result: serde_json::Value,
    },
    /// A held task failed.
    Fail {
        /// The task.
        id: String,
        /// Its lease token.
        token: u32,
        /// Its lease secret (as for progress).
        secret: String,
        /// The failure.
        failure: Failure,
    },
    /// A held task handed back unfinished (the worker is stopping).
    Release {
        /// The task.
        id: String,
        /// Its lease token.
        token: u32,
        /// Why, for the log.
        reason: String,
    },
    /// The worker began these held tasks: their attempts count if the
    /// stream ends before they are reported.
    Started(Vec<String>),
    /// The worker is stopping: nothing more is pushed, and koo's own stop
    /// hands its tasks back rather than keep their leases.
    Draining,
    /// Several of the messages above, in order (never a hello, a batch or
    /// an invalid one: the adapter refuses those before).
    Batch(Vec<Inbound>),
    /// The worker sent something that is not a valid message (a second
    /// hello, an empty message): the stream ends with this error.
    Invalid(TaskError),
}

/// Which message a [`Outbound::Reply`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A progress report (replied to only when refused).
    Progress,
    /// A completion.
    Complete,
    /// A failure.
    Fail,
    /// A hand-back.
    Release,
}

/// What koo sends a stream worker.
#[derive(Debug)]
pub enum Outbound {
    /// A task to run, with its lease token in `task.token`.
    Task {
        /// The task.
        task: Box<Task>,
        /// Its lease secret (empty when the key could not be read: the
        /// stream's own reports need none).
        secret: String,
    },
    /// Stop this task (it was cancelled) and report a failure.
    Cancel {
        /// The task.
        id: TaskId,
        /// Why.
        reason: String,
    },
    /// This task passed its soft time limit.
    SoftLimit(TaskId),
    /// This task is no longer the worker's: stop it, report nothing.
    Revoked {
        /// The task.
        id: TaskId,
        /// Why.
        reason: String,
    },
    /// Several of these, in order, ready together (never nested): the
    /// adapter sends them as one message to a worker that accepts batches.
    Batch(Vec<Outbound>),
    /// The outcome of a report: the state the task moved to (for completes
    /// and fails), or why it was refused.
    Reply {
        /// The task.
        id: String,
        /// The message answered.
        kind: ReplyKind,
        /// The outcome.
        outcome: Result<Option<State>, TaskError>,
    },
}
