//! Re-attaching a worker's tasks: a worker whose stream ended while its
//! tasks ran (koo was restarted, or stopped for a deploy) keeps running
//! them, and names them in the `held` of its next hello, to this koo
//! process or another. The session adopts each task whose lease is still
//! current and whose secret the worker proves, as if it had pushed it:
//! heartbeats extend it, its timers run, its outcome needs no secret, and
//! the stream's end hands it back by the usual rules. Every other one is
//! revoked right after the welcome, with the reason.
//!
//! Adoption needs no store change: the lease (its token, its expiry, the
//! worker it was signed for) stays as it was, and one heartbeat extends
//! it. The secret proves the claim: it was handed out with the lease and
//! is never stored, so only the lease's holder can name it.
//!
//! A worker that says it re-attaches (`reattach`) has its leases left in
//! place when koo stops rather than handed back: it re-attaches them to
//! the next koo it reaches within the lease, and a task it never
//! re-attaches lapses as any lease does.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::held::Held;
use super::{CALL, MAX_CONCURRENCY, Outbound, Session};
use crate::domain::task::{Task, TaskId};
use crate::store::Deadline;
use crate::tasks::engine::TaskError;
use crate::tasks::remote::{Proof, authorize};

/// Store reads of one hello's claims in flight at once.
const CLAIMS_IN_FLIGHT: usize = 16;

/// A task a worker says it still runs, by the lease it got with it.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The task id, as sent.
    pub id: String,
    /// Its lease token.
    pub token: u32,
    /// Its lease secret.
    pub secret: String,
}

impl Session {
    /// This worker keeps its tasks when its stream ends, and names them
    /// when it connects again: once `koo_stopping` fires (koo's own stop,
    /// not a stream's), the session's end leaves its leases in place.
    pub fn reattaching(&mut self, koo_stopping: CancellationToken) {
        self.koo_stopping = Some(koo_stopping);
    }

    /// Whether the session's end leaves its leases for the worker to
    /// re-attach: it said it would, and koo is stopping.
    pub(super) fn leaves_leases(&self) -> bool {
        self.koo_stopping
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    }

    /// Adopts the tasks the worker's hello names (`hello.held`): each one
    /// whose lease is current and whose secret matches is held from now
    /// on; the others are revoked when the session starts, each with the
    /// reason. A malformed claim refuses the whole hello (INVALID_ARGUMENT
    /// naming it), as does a store that does not answer (the worker tries
    /// again, its tasks still running, their leases untouched).
    pub async fn adopt(&mut self, claims: Vec<Claim>) -> Result<(), TaskError> {
        let claims = check(claims)?;
        let engine = &self.engine;
        let results: Vec<(TaskId, Result<Reclaimed, TaskError>)> = futures::stream::iter(claims)
            .map(|(id, c)| async move {
                let got = reclaim(engine, &id, c.token, &c.secret).await;
                (id, got)
            })
            .buffered(CLAIMS_IN_FLIGHT)
            .collect()
            .await;
        let grace = self.engine.config().cancel_grace;
        for (id, got) in results {
            let refusal = match got {
                Ok((task, cancel)) if self.taken.take_one() => {
                    let mut h = adopted(task);
                    if let Some(reason) = cancel {
                        h.cancel_at = Some(Instant::now() + grace);
                        let id = id.clone();
                        self.notices.push(Outbound::Cancel { id, reason });
                    }
                    self.adopted.insert(id, h);
                    continue;
                }
                Ok(_) => {
                    let tally = self.taken.tally();
                    TaskError::TooManyHeld {
                        held: tally.held(),
                        bound: tally.bound(),
                    }
                    .to_string()
                }
                Err(e @ (TaskError::Fenced(_) | TaskError::NotFound(_))) => e.to_string(),
                Err(TaskError::Forbidden(why)) => why,
                Err(e) => return Err(e),
            };
            tracing::info!(worker = self.id(), task = %id, reason = %refusal, "a re-attached task is refused");
            let reason = format!("not re-attached: {refusal}");
            self.notices.push(Outbound::Revoked { id, reason });
        }
        if !self.adopted.is_empty() {
            tracing::info!(
                worker = self.id(),
                tasks = self.adopted.len(),
                "an external worker re-attached tasks it ran on an earlier stream"
            );
        }
        Ok(())
    }
}

/// The claims, each id parsed: INVALID_ARGUMENT naming the first wrong
/// one (an id that does not parse, a missing secret, an id named twice),
/// or when there are more than a worker may hold.
fn check(claims: Vec<Claim>) -> Result<Vec<(TaskId, Claim)>, TaskError> {
    if claims.len() > MAX_CONCURRENCY as usize {
        return Err(TaskError::invalid(
            "hello.held",
            format!("at most {MAX_CONCURRENCY} tasks, got {}", claims.len()),
        ));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(claims.len());
    for (i, c) in claims.into_iter().enumerate() {
        let id = TaskId::parse(&c.id)
            .map_err(|e| TaskError::invalid(&format!("hello.held[{i}].task_id"), e.to_string()))?;
        if c.secret.is_empty() {
            return Err(TaskError::invalid(
                &format!("hello.held[{i}].lease_secret"),
                "required: the lease_secret that came with the task",
            ));
        }
        if !seen.insert(id.clone()) {
            return Err(TaskError::invalid(
                &format!("hello.held[{i}].task_id"),
                format!("task {id} is named twice"),
            ));
        }
        out.push((id, c));
    }
    Ok(out)
}

/// A reclaimed task, and the reason of a cancel asked for meanwhile.
type Reclaimed = (Task, Option<String>);

/// Reads the task, checks that the lease is current and the secret its
/// own, and extends it.
async fn reclaim(
    engine: &crate::tasks::engine::TaskEngine,
    id: &TaskId,
    token: u32,
    secret: &str,
) -> Result<Reclaimed, TaskError> {
    let deadline = Deadline::after(CALL);
    let task = engine.get(id.as_str(), deadline).await?;
    authorize(engine, &task, token, Proof::given(secret), deadline).await?;
    let cancel = engine.heartbeat(id, token, deadline).await?;
    Ok((task, cancel))
}

/// A re-attached task as the session holds it: its time limits run from
/// its attempt's start (one past while the worker was away fires at
/// once), and the worker has spoken about it (it runs it).
fn adopted(task: Task) -> Held {
    let now = Instant::now();
    let wall = crate::store::unix_millis(SystemTime::now());
    let started = task.started_ms.unwrap_or(wall);
    let at = |limit_ms: u64| {
        (limit_ms > 0).then(|| {
            let end = started.saturating_add(i64::try_from(limit_ms).unwrap_or(i64::MAX));
            now + Duration::from_millis(u64::try_from(end - wall).unwrap_or(0))
        })
    };
    Held {
        soft_at: at(task.soft_ms),
        hard_at: at(task.hard_ms),
        cancel_at: None,
        pushed_at: now,
        spoken: true,
        task,
    }
}

/// The tasks adopted, for the session's loop (taken once).
pub(super) fn take_adopted(session: &mut Session) -> (HashMap<TaskId, Held>, Vec<Outbound>) {
    (
        std::mem::take(&mut session.adopted),
        std::mem::take(&mut session.notices),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: &str, secret: &str) -> Claim {
        Claim {
            id: id.into(),
            token: 1,
            secret: secret.into(),
        }
    }

    /// Malformed claims refuse the hello, naming the field.
    #[test]
    fn malformed_claims_name_their_field() {
        let id = TaskId::generate(&crate::domain::task::QueueName::parse("research").unwrap());
        let good = claim(id.as_str(), "s");
        assert_eq!(check(vec![good.clone()]).unwrap().len(), 1);
        let e = check(vec![good.clone(), claim("nope", "s")]).unwrap_err();
        assert!(e.to_string().starts_with("hello.held[1].task_id:"), "{e}");
        let e = check(vec![claim(id.as_str(), "")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hello.held[0].lease_secret: required"),
            "{e}"
        );
        let e = check(vec![good.clone(), good.clone()]).unwrap_err();
        assert!(e.to_string().contains("named twice"), "{e}");
        let many = vec![good; MAX_CONCURRENCY as usize + 1];
        let e = check(many).unwrap_err();
        assert!(e.to_string().starts_with("hello.held: at most 1024"), "{e}");
    }

    /// Time limits run from the attempt's start: a limit already past
    /// while the worker was away is due at once.
    #[test]
    fn limits_run_from_the_attempts_start() {
        let wall = crate::store::unix_millis(SystemTime::now());
        let mut task = super::super::held::sample_task(1, 1);
        task.started_ms = Some(wall - 10_000);
        task.soft_ms = 5_000;
        task.hard_ms = 60_000;
        let h = adopted(task);
        let now = Instant::now();
        assert!(h.soft_at.unwrap() <= now, "the soft limit passed");
        let hard = h.hard_at.unwrap() - now;
        assert!(
            hard > Duration::from_secs(45) && hard <= Duration::from_secs(50),
            "{hard:?}"
        );
        assert!(h.spoken && h.cancel_at.is_none());
    }
}
