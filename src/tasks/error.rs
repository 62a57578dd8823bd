//! Why a task operation failed: one enum for the engine, the workers and
//! the adapters, mapped to gRPC statuses in one place (`grpc/status.rs`).

use crate::domain::task::TaskId;
use crate::store::StoreError;

/// Why a task operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskError {
    /// A request field is wrong.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// No such task (never existed, or its result expired).
    #[error("task {0} not found (unknown, or its result expired)")]
    NotFound(TaskId),
    /// The caller's lease is no longer valid: another holder has the task,
    /// or it ended.
    #[error(
        "the lease on task {0} is no longer yours (it lapsed, the task ended, or a re-attaching stream took it over)"
    )]
    Fenced(TaskId),
    /// No such thing other than a task (a limit); the message names it.
    #[error("{0}")]
    Missing(String),
    /// The task is not in a state the call applies to.
    #[error("{0}")]
    FailedPrecondition(String),
    /// An idempotency key already names a different task.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller may not act on this lease: a report without the lease's
    /// secret, or with another (the message says which).
    #[error("{0}")]
    Forbidden(String),
    /// A worker holds as many tasks as it may in this process.
    #[error(
        "this worker holds {held} tasks in this koo process, its bound (KOO_MAX_HELD_PER_WORKER or its key's max_held is {bound}): complete or fail some first"
    )]
    TooManyHeld {
        /// Tasks it holds.
        held: u32,
        /// What it may hold.
        bound: u32,
    },
    /// The backend failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TaskError {
    /// `field` is wrong, for `reason`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::QueueName;

    /// The messages users read are built from the typed parts, as they
    /// were written out before.
    #[test]
    fn messages() {
        let id = TaskId::generate(&QueueName::parse("research").unwrap());
        assert_eq!(
            TaskError::NotFound(id.clone()).to_string(),
            format!("task {id} not found (unknown, or its result expired)")
        );
        assert_eq!(
            TaskError::Fenced(id.clone()).to_string(),
            format!(
                "the lease on task {id} is no longer yours (it lapsed, the task ended, or a re-attaching stream took it over)"
            )
        );
    }
}
