//! Debounced submits: while a task submitted with a debounce key has not
//! started, each new submit with the key replaces it (the last one wins)
//! and moves its start to the end of the window, so that a burst of
//! submits runs once, with the last one's arguments. The store does the
//! look-up and the replace in one transition
//! ([`crate::store::tasks::TaskBackend::submit_debounced`]).

use std::time::Duration;

use super::TaskEngine;
use super::submit::NewTask;
use crate::domain::task::Task;
use crate::quote::quote;
use crate::store::Deadline;
use crate::store::tasks::DebounceReply;
use crate::tasks::error::TaskError;

/// Longest debounce window: a debounced task starts at most this long
/// after the last submit of its burst.
pub const MAX_DEBOUNCE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Longest debounce key, in bytes (as an idempotency key).
pub const MAX_DEBOUNCE_KEY: usize = 256;

/// A debounced submit's key (per queue) and window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debounce {
    /// The key: submits with it to one queue make one task until it starts.
    pub key: String,
    /// How long the task waits for a newer submit before it starts.
    pub window: Duration,
}

/// The debounce of `new`, checked: a key of 1 to [`MAX_DEBOUNCE_KEY`]
/// bytes, a window of 1 ms to [`MAX_DEBOUNCE_WINDOW`], and none of the
/// options that would fight the window or the last-one-wins rule (a
/// countdown or ETA, dependencies, an idempotency key).
pub(super) fn check(new: &NewTask) -> Result<Option<&Debounce>, TaskError> {
    let Some(d) = &new.debounce else {
        return Ok(None);
    };
    if d.key.is_empty() || d.key.len() > MAX_DEBOUNCE_KEY {
        return Err(TaskError::invalid(
            "debounce_key",
            format!(
                "must be 1 to {MAX_DEBOUNCE_KEY} bytes, not {}",
                crate::quote::quote_sized(&d.key)
            ),
        ));
    }
    if d.window < Duration::from_millis(1) || d.window > MAX_DEBOUNCE_WINDOW {
        return Err(TaskError::invalid(
            "debounce_window",
            "must be 1 ms to 24 h, and is required with debounce_key",
        ));
    }
    let refuse = |field: &str, what: &str| {
        Err(TaskError::invalid(
            field,
            format!("a debounced submit (debounce_key) takes no {what}"),
        ))
    };
    if !new.delay.is_zero() {
        return refuse(
            "countdown",
            "countdown or ETA: it starts at the end of its window",
        );
    }
    if !new.depends_on.is_empty() {
        return refuse("depends_on", "dependencies");
    }
    if let Some(expiry) = new.expires {
        // a replace moves the start: the expiry would have to move with it
        // (and with the queue's expiring set); not supported yet
        let field = match expiry {
            super::Expiry::At(_) => "expire_time",
            super::Expiry::After(_) => "expire_after",
        };
        return refuse(field, "expiry (yet): its start moves with every submit");
    }
    if new.idempotency_key.is_some() {
        return refuse(
            "idempotency_key",
            "idempotency key: the last debounced submit wins, an idempotent one keeps the first",
        );
    }
    Ok(Some(d))
}

impl TaskEngine {
    /// Stores a debounced submit: a new task SCHEDULED at the end of its
    /// window, or the unstarted task holding its key, replaced (`true`:
    /// deduplicated). The same key for another task name or category is
    /// INVALID_ARGUMENT: a key stands for one piece of work.
    #[tracing::instrument(name = "submit", level = "debug", skip_all, fields(task = %task.id, name = %task.name))]
    pub(super) async fn store_debounced(
        &self,
        task: Task,
        window: Duration,
        deadline: Deadline,
    ) -> Result<(Task, bool), TaskError> {
        let c = &self.inner.config;
        let store = &self.inner.store;
        match store
            .submit_debounced(&task, window, c.limits, deadline)
            .await?
        {
            DebounceReply::Created => {
                self.made_ready(task.id.queue(), Some(&task.name));
                self.inner.counters.submitted(&task.id.queue());
                Ok((task, false))
            }
            DebounceReply::Replaced(id) => {
                self.made_ready(id.queue(), None);
                let held = self.get(id.as_str(), deadline).await?;
                Ok((held, true))
            }
            DebounceReply::Conflict { id, name, category } => Err(TaskError::invalid(
                "debounce_key",
                format!(
                    "{} is held by task {id} ({} of category {category}), not started yet: a debounce key stands for one task name and category",
                    quote(task.debounce_key.as_deref().unwrap_or_default()),
                    quote(&name),
                ),
            )),
        }
    }
}
