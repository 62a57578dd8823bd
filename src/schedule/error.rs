//! Why a schedule call failed: the schedule service's own errors, and the
//! store's and the task engine's that a schedule call can meet.

use crate::quote::quote;
use crate::store::StoreError;
use crate::tasks::engine::TaskError;

/// Why a schedule call failed.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// A field of the schedule (or of its task template) is wrong.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as a path from the schedule (`cron`, `task.queue`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// No schedule has this name.
    #[error("schedule {} not found", quote(.0))]
    NotFound(String),
    /// A schedule of this name exists already.
    #[error("schedule {} already exists", quote(.0))]
    AlreadyExists(String),
    /// A default of the configuration cannot be deleted over the API: it
    /// would come back at the next start.
    #[error(
        "schedule {} is a default of the configuration: switch it off there ({variable}=off) or pause it",
        quote(name)
    )]
    ConfigDefault {
        /// The schedule.
        name: String,
        /// The variable that switches it off.
        variable: &'static str,
    },
    /// The schedule store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task engine refused or failed a schedule's task (a trigger's
    /// submit, reading a run's task).
    #[error(transparent)]
    Task(#[from] TaskError),
}

impl ScheduleError {
    /// `field` is wrong, for `reason`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// The error with its field named from `prefix` (a request's schedule
    /// message: `schedule.cron`), unless it already is.
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::InvalidArgument { field, reason } if !field.starts_with(prefix) => {
                Self::InvalidArgument {
                    field: format!("{prefix}.{field}"),
                    reason,
                }
            }
            e => e,
        }
    }

    /// A task-side refusal of a schedule's template, as a refusal of the
    /// schedule's field.
    pub(super) fn of_template(e: TaskError) -> Self {
        match e {
            TaskError::InvalidArgument { field, reason } => Self::InvalidArgument { field, reason },
            e => Self::Task(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields get the request's prefix once; other errors pass through.
    #[test]
    fn within_prefixes_fields_once() {
        let e = ScheduleError::invalid("cron", "bad").within("schedule");
        assert_eq!(e.to_string(), "schedule.cron: bad");
        let e = ScheduleError::invalid("schedule.task.time_limit", "bad").within("schedule");
        assert_eq!(e.to_string(), "schedule.task.time_limit: bad");
        let e = ScheduleError::NotFound("x".into()).within("schedule");
        assert_eq!(e.to_string(), "schedule \"x\" not found");
    }
}
