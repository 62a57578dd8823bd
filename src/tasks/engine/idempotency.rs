//! Idempotent submits: one task per idempotency key, however many
//! processes submit it at once.

use std::time::Duration;

use super::TaskEngine;
use super::submit::NewTask;
use crate::domain::task::Task;
use crate::store::{Deadline, StoreError};
use crate::tasks::error::TaskError;

/// What an idempotent submit compares: everything a submit chose, except
/// when it may start (a retried submit computes its ETA again) and the id.
fn fingerprint(task: &Task) -> u64 {
    let content = format!(
        "{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{}\0{:?}",
        task.name,
        task.category.as_str(),
        task.id.queue(),
        task.priority.band(),
        task.args,
        task.kwargs,
        task.max_retries,
        task.soft_ms,
        task.hard_ms,
        task.result_ttl_ms,
        task.cache_result,
    );
    crate::store::fnv1a(content.as_bytes())
}

impl TaskEngine {
    /// [`Self::submit`], deduplicated by the task's idempotency key: while
    /// the task first submitted with the key is known, a submit with the
    /// same key and content returns it (`true`: deduplicated), and one with
    /// other content is `AlreadyExists`. Any number of concurrent submits of
    /// one key, on any number of koo processes, store one task.
    #[tracing::instrument(level = "debug", skip_all, fields(name = %new.name))]
    pub async fn submit_keyed(
        &self,
        new: NewTask,
        deadline: Deadline,
    ) -> Result<(Task, bool), TaskError> {
        if new.debounce.is_some() {
            let (task, window) = self.prepare(new)?;
            return self.store_debounced(task, window, deadline).await;
        }
        let Some(key) = new.idempotency_key.clone() else {
            return self.submit(new, deadline).await.map(|t| (t, false));
        };
        if key.is_empty() || key.len() > 256 {
            return Err(TaskError::invalid(
                "idempotency_key",
                format!("{} must be 1 to 256 bytes", crate::quote::quote_sized(&key)),
            ));
        }
        let c = &self.inner.config;
        let store = &self.inner.store;
        let ttl = new.idempotency_ttl.unwrap_or(c.idempotency_ttl);
        let (task, delay) = self.prepare(new)?;
        let fp = format!("{:016x}", fingerprint(&task));
        let now = || crate::store::unix_millis(std::time::SystemTime::now());
        let mut ours = format!("{fp}|{}|{}", task.id, now());
        let mut claim = store.claim_idempotency(&key, &ours, ttl, deadline).await?;
        loop {
            // ours (also when a retried claim call finds its own claim)
            if claim.as_deref().is_none_or(|held| held == ours) {
                // A failure leaves the claim; a later submit finds no task
                // behind it and, once the claim is old enough, takes it over.
                // The store call gets at most half the takeover age, so that
                // a claim is never taken over while its submit may land.
                let submit_deadline = deadline.min(Deadline::after(c.idempotency_takeover / 2));
                let stored = self.store_task(task, delay, submit_deadline).await?;
                return Ok((stored, false));
            }
            let held = claim.unwrap_or_default();
            let theirs = Claim::parse(&held);
            if theirs.fingerprint != fp {
                return Err(TaskError::AlreadyExists(format!(
                    "idempotency key {} was used for a different task ({})",
                    crate::quote::quote(&key),
                    theirs.id
                )));
            }
            if let Some(existing) = self.await_claimant(theirs.id, deadline).await? {
                return Ok((existing, true));
            }
            let age = Duration::from_millis(u64::try_from(now() - theirs.claimed_ms).unwrap_or(0));
            if age < c.idempotency_takeover {
                return Err(TaskError::Store(StoreError::Unavailable(format!(
                    "an earlier submit with idempotency key {} (task {}) has not stored its task yet; retry shortly",
                    crate::quote::quote(&key),
                    theirs.id
                ))));
            }
            // Its task was never stored (or is long gone): take the claim
            // over, unless another submitter just did.
            ours = format!("{fp}|{}|{}", task.id, now());
            claim = if store
                .swap_idempotency(&key, &held, &ours, ttl, deadline)
                .await?
            {
                None
            } else {
                store.claim_idempotency(&key, &ours, ttl, deadline).await?
            };
        }
    }

    /// The task of a claim with our content: the claimant may be between
    /// its claim and its submit, so it gets a moment (a second) to store
    /// it; `None` when it has not.
    async fn await_claimant(
        &self,
        id: &str,
        deadline: Deadline,
    ) -> Result<Option<Task>, TaskError> {
        for _ in 0..20 {
            match self.get(id, deadline).await {
                Ok(existing) => return Ok(Some(existing)),
                Err(TaskError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(None)
    }
}

/// A claim of an idempotency key, as stored: `fingerprint|task id|claimed
/// at (ms)` (a part missing reads empty, or 0).
struct Claim<'a> {
    fingerprint: &'a str,
    id: &'a str,
    claimed_ms: i64,
}

impl<'a> Claim<'a> {
    fn parse(held: &'a str) -> Self {
        let mut parts = held.splitn(3, '|');
        Self {
            fingerprint: parts.next().unwrap_or(""),
            id: parts.next().unwrap_or(""),
            claimed_ms: parts
                .next()
                .and_then(|t| t.parse::<i64>().ok())
                .unwrap_or(0),
        }
    }
}
