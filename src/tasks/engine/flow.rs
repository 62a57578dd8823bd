//! Flow control's management: rate limits and concurrency caps set, read,
//! listed and deleted, a worker's back-off of a key, and what this process
//! knows of them for its leases.
//!
//! Limits are data in the task store, enforced by the lease transition
//! (see [`crate::store::tasks::TaskBackend`]'s "Flow control"). The only
//! thing a process keeps is one flag: whether a queue's or a task name's
//! rate limit exists, which the lease needs to look them up. Without
//! one, a lease costs what it did before flow control existed. The flag is
//! set at once by this process's own changes and follows the store's
//! limits version, polled about once a second (with the times' flush), for
//! the changes of other processes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::TaskEngine;
use crate::domain::flow::{
    ConcurrencyLimit, Limit, LimitState, MAX_COUNT, MAX_PERIOD, RateLimit, Scope, Source,
};
use crate::domain::task::check_task_name;
use crate::store::Deadline;
use crate::store::tasks::TaskLimits;
use crate::tasks::error::TaskError;

/// Longest `key_retry_after`, as for a retry's delay.
pub const MAX_BACKOFF: Duration = MAX_PERIOD;

impl TaskEngine {
    /// The store limits of a lease now: the configured ones, with whether
    /// a queue's or a task name's rate limit may exist.
    pub(super) fn lease_limits(&self) -> TaskLimits {
        TaskLimits {
            flow: self.inner.flow.per_call.load(Ordering::Relaxed),
            ..self.inner.config.limits
        }
    }

    /// Creates or replaces a rate limit (checked first: fields are named
    /// under `rate_limit.`): the limit as stored, with its state.
    pub async fn set_rate_limit(
        &self,
        limit: RateLimit,
        deadline: Deadline,
    ) -> Result<(Limit, LimitState), TaskError> {
        let limit = self.check_rate_limit(limit)?;
        self.store_limit(Limit::Rate(limit), deadline).await
    }

    /// Creates or replaces a concurrency cap (checked first: fields are
    /// named under `concurrency_limit.`).
    pub async fn set_concurrency_limit(
        &self,
        limit: ConcurrencyLimit,
        deadline: Deadline,
    ) -> Result<(Limit, LimitState), TaskError> {
        let limit = check_concurrency_limit(limit)?;
        self.store_limit(Limit::Concurrency(limit), deadline).await
    }

    async fn store_limit(
        &self,
        limit: Limit,
        deadline: Deadline,
    ) -> Result<(Limit, LimitState), TaskError> {
        self.inner.store.set_limit(&limit, deadline).await?;
        if limit.is_per_call() {
            self.inner.flow.per_call.store(true, Ordering::Relaxed);
        }
        let field = limit.field();
        tracing::info!(limit = %field, value = %limit.encode(), "limit set");
        self.refresh_flow(deadline).await?;
        self.limit(&field, deadline)
            .await?
            .ok_or_else(|| TaskError::Missing(format!("limit {field} was deleted as it was set")))
    }

    /// The limit stored under `field` ([`Limit::field`]) with its state.
    pub async fn limit(
        &self,
        field: &str,
        deadline: Deadline,
    ) -> Result<Option<(Limit, LimitState)>, TaskError> {
        Ok(self
            .list_limits(deadline)
            .await?
            .into_iter()
            .find(|(l, _)| l.field() == field))
    }

    /// Every limit with its state, by field.
    pub async fn list_limits(
        &self,
        deadline: Deadline,
    ) -> Result<Vec<(Limit, LimitState)>, TaskError> {
        let (version, mut limits) = self.inner.store.limits(deadline).await?;
        self.adopt(version, &limits);
        limits.sort_by_key(|(l, _)| l.field());
        Ok(limits)
    }

    /// Deletes the limit stored under `field`: whether there was one.
    pub async fn delete_limit(&self, field: &str, deadline: Deadline) -> Result<bool, TaskError> {
        let existed = self.inner.store.delete_limit(field, deadline).await?;
        if existed {
            tracing::info!(limit = %field, "limit deleted");
            self.refresh_flow(deadline).await?;
        }
        Ok(existed)
    }

    /// Backs off rate-limit key `key` for `wait` (a provider's 429): no task
    /// with the key starts before. Returns when the back-off ends (ms).
    pub async fn back_off(
        &self,
        key: &str,
        wait: Duration,
        deadline: Deadline,
    ) -> Result<i64, TaskError> {
        if wait > MAX_BACKOFF {
            return Err(TaskError::invalid(
                "key_retry_after",
                format!("must be at most 24 h (got {} s)", wait.as_secs()),
            ));
        }
        let until = self.inner.store.back_off(key, wait, deadline).await?;
        tracing::info!(
            key,
            wait_ms = wait.as_millis() as u64,
            "rate-limit key backed off"
        );
        Ok(until)
    }

    /// Sets the configured limits (`KOO_RATE_LIMITS`,
    /// `KOO_CONCURRENCY_LIMITS`) at start-up: each replaces the stored
    /// limit of its scope; limits set through the API for other scopes
    /// stay.
    pub async fn apply_configured_limits(
        &self,
        limits: &[Limit],
        deadline: Deadline,
    ) -> Result<(), TaskError> {
        for limit in limits {
            let (field, checked) = match limit.clone() {
                Limit::Rate(r) => ("KOO_RATE_LIMITS", self.check_rate_limit(r).map(Limit::Rate)),
                Limit::Concurrency(c) => (
                    "KOO_CONCURRENCY_LIMITS",
                    check_concurrency_limit(c).map(Limit::Concurrency),
                ),
            };
            let mut limit = checked.map_err(|e| TaskError::invalid(field, e.to_string()))?;
            match &mut limit {
                Limit::Rate(r) => r.source = Source::Config,
                Limit::Concurrency(c) => c.source = Source::Config,
            }
            self.inner.store.set_limit(&limit, deadline).await?;
        }
        self.refresh_flow(deadline).await
    }

    /// Reads the limits again when their version changed since this
    /// process last looked (one `GET` otherwise).
    pub async fn refresh_flow(&self, deadline: Deadline) -> Result<(), TaskError> {
        let version = self.inner.store.limits_version(deadline).await?;
        if version != self.inner.flow.version.load(Ordering::Relaxed) {
            let (version, limits) = self.inner.store.limits(deadline).await?;
            self.adopt(version, &limits);
        }
        Ok(())
    }

    /// Takes in the limits read at `version`.
    fn adopt(&self, version: u64, limits: &[(Limit, LimitState)]) {
        let per_call = limits.iter().any(|(l, _)| l.is_per_call());
        self.inner.flow.per_call.store(per_call, Ordering::Relaxed);
        self.inner.flow.version.store(version, Ordering::Relaxed);
    }

    /// A rate limit as stored: a known queue, a valid task name, counts
    /// and period in range, burst 0 read as 1.
    fn check_rate_limit(&self, mut limit: RateLimit) -> Result<RateLimit, TaskError> {
        match &limit.scope {
            Scope::Queue(q) => {
                self.known_queue(q).map_err(|e| match e {
                    TaskError::InvalidArgument { reason, .. } => {
                        TaskError::invalid("rate_limit.name", reason)
                    }
                    other => other,
                })?;
            }
            Scope::Task(name) => {
                check_task_name(name).map_err(|e| TaskError::invalid("rate_limit.name", e))?;
            }
            Scope::Key(_) => {}
        }
        if limit.limit == 0 || limit.limit > MAX_COUNT {
            return Err(TaskError::invalid(
                "rate_limit.limit",
                format!("must be 1 to {MAX_COUNT} (got {})", limit.limit),
            ));
        }
        if limit.period < Duration::from_millis(1) || limit.period > MAX_PERIOD {
            return Err(TaskError::invalid(
                "rate_limit.period",
                format!("must be 1 ms to 24 h (got {:?})", limit.period),
            ));
        }
        if limit.period.as_micros() < u128::from(limit.limit) {
            return Err(TaskError::invalid(
                "rate_limit.limit",
                format!(
                    "{} per {:?} is more than one a microsecond",
                    limit.limit, limit.period
                ),
            ));
        }
        limit.burst = limit.burst.max(1);
        if limit.burst > MAX_COUNT {
            return Err(TaskError::invalid(
                "rate_limit.burst",
                format!("must be at most {MAX_COUNT} (got {})", limit.burst),
            ));
        }
        // whole milliseconds, as stored
        limit.period = Duration::from_millis(limit.period.as_millis() as u64);
        Ok(limit)
    }
}

/// A cap as stored: a key scope, a count in range.
fn check_concurrency_limit(limit: ConcurrencyLimit) -> Result<ConcurrencyLimit, TaskError> {
    if limit.max_running == 0 || limit.max_running > MAX_COUNT {
        return Err(TaskError::invalid(
            "concurrency_limit.max_running",
            format!("must be 1 to {MAX_COUNT} (got {})", limit.max_running),
        ));
    }
    Ok(limit)
}

/// What a process knows of the limits for its leases.
#[derive(Debug, Default)]
pub(super) struct FlowState {
    /// Whether a queue's or a task name's rate limit exists.
    per_call: std::sync::atomic::AtomicBool,
    /// The store's limits version when last read.
    version: std::sync::atomic::AtomicU64,
}
