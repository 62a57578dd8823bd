//! What a debounced submit found (see [`super::TaskBackend::submit_debounced`]).

use crate::domain::task::TaskId;

/// The outcome of a debounced submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DebounceReply {
    /// No unstarted task of the queue held the key: the submitted task is
    /// stored, SCHEDULED at the end of the window, and holds it now.
    Created,
    /// The unstarted task `0` held the key and took the submit (its
    /// arguments and options, a start at the end of the window).
    Replaced(TaskId),
    /// The unstarted task holding the key has another name or category:
    /// nothing changed.
    Conflict {
        /// The task holding the key.
        id: String,
        /// Its name.
        name: String,
        /// Its category.
        category: String,
    },
}
