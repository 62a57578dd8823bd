//! Compute locks (GetOrLock, GetOrCompute): what a backend answers when a
//! caller asks for the lock of a missing or stale cache entry.
//!
//! A lock is one key (`keys::KeySpace::lock_key`) holding its holder's
//! token, optionally followed by `|` and the id of the task computing the
//! value, and always with a TTL (the lease): a holder that dies loses the
//! lock when the TTL passes, and a waiter takes over.

use std::time::Duration;

/// The outcome of asking for a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockState {
    /// The caller now holds the lock under its token.
    Acquired,
    /// Someone else holds it.
    Held {
        /// The lock's value (`token` or `token|task id`).
        value: String,
        /// Time left before it lapses.
        left: Duration,
    },
}

/// Separates a lock's token from the id of the task computing its value.
pub const LOCK_TASK_SEPARATOR: char = '|';

/// Whether a lock's `value` is held under `token`.
pub fn held_by(value: &str, token: &str) -> bool {
    match value.strip_prefix(token) {
        Some(rest) => rest.is_empty() || rest.starts_with(LOCK_TASK_SEPARATOR),
        None => false,
    }
}

/// The id of the task computing the value, from a lock's value.
pub fn lock_task(value: &str) -> Option<&str> {
    value
        .split_once(LOCK_TASK_SEPARATOR)
        .map(|(_, task)| task)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token holds a lock whose value is the token or the token and a
    /// task id; a prefix of the token does not.
    #[test]
    fn tokens_hold_their_locks_only() {
        assert!(held_by("abc", "abc"));
        assert!(held_by("abc|t~1", "abc"));
        assert!(!held_by("abcd", "abc"));
        assert!(!held_by("abc", "ab"));
        assert!(!held_by("abc", ""));
        assert_eq!(lock_task("abc|t~1"), Some("t~1"));
        assert_eq!(lock_task("abc"), None);
    }
}
