//! Re-attaching a worker's tasks: a worker whose stream ended while its
//! tasks ran (koo was restarted, or stopped for a deploy) keeps running
//! them, and names them in the `held` of its next hello, to this koo
//! process or another. The session adopts each task whose lease is still
//! current and whose secret the worker proves, as if it had pushed it:
//! heartbeats extend it, its timers run, its outcome needs no secret, and
//! the stream's end hands it back by the usual rules. Every other one is
//! revoked right after the welcome, with the reason.
//!
//! Adopting takes the lease over (`TaskBackend::take_over`): the same
//! attempt, under the next token and this stream's worker id, so that its
//! former holder is fenced out (a stream of a live koo that has not yet
//! seen the worker's old connection drop must not end the lease when it
//! does). The welcome tells the worker each adopted task's new token and
//! secret. The old secret proves the claim: it was handed out with the
//! lease and is never stored, so only the lease's holder can name it.
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

use super::held::{Held, hand_back};
use super::{CALL, MAX_CONCURRENCY, Outbound, Session};
use crate::domain::task::{State, Task, TaskId};
use crate::store::Deadline;
use crate::tasks::engine::{TaskEngine, TaskError};
use crate::tasks::remote::{Proof, authorize};

/// Store calls of one hello's claims in flight at once.
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
    /// The worker never began it: it goes back rather than being adopted.
    pub not_started: bool,
}

/// What becomes of a proven claim.
enum Step {
    /// Held by this stream from now on (room taken).
    Adopt(Box<Task>),
    /// Back to its queue, its attempt given back, and revoked: why.
    GiveBack(Box<Task>, String),
}

/// What the store calls of a step gave.
enum Done {
    /// Adopted (the task under its new token), with its new lease secret
    /// and the reason of a cancel asked for meanwhile.
    Adopted(Box<Task>, String, Option<String>),
    /// Revoked: why.
    Refused(String),
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
    /// whose lease is current, whose secret matches, that this stream
    /// serves and that the worker began, is held from now on; the others
    /// are revoked when the session starts, each with the reason (those
    /// proven but not adopted go back to their queues first, their attempts
    /// given back). A malformed hello (an id that does not parse, an id
    /// named twice, too many) is refused INVALID_ARGUMENT naming the claim;
    /// a store that does not answer while the claims are read refuses it
    /// too (the worker tries again, its tasks still running, their leases
    /// untouched). Each phase (the reads, the take-overs) within one call's
    /// deadline.
    pub async fn adopt(&mut self, claims: Vec<Claim>) -> Result<(), TaskError> {
        let claims = check(claims)?;
        let deadline = Deadline::after(CALL);
        let mut steps = Vec::with_capacity(claims.len());
        let mut refused = Vec::new();
        {
            let engine = &self.engine;
            let mut proofs = futures::stream::iter(claims)
                .map(|(id, c)| async move {
                    let got = prove(engine, &id, &c, deadline).await;
                    (id, c, got)
                })
                .buffered(CLAIMS_IN_FLIGHT);
            while let Some((id, c, got)) = proofs.next().await {
                match got {
                    Ok(task) => steps.push((id, c, task)),
                    Err(e) => refused.push(revoked(id, refusal(e)?)),
                }
            }
        }
        self.notices.extend(refused);
        let steps: Vec<(TaskId, Step)> = steps
            .into_iter()
            .map(|(id, c, task)| (id, self.step(task, c.not_started)))
            .collect();
        // Past here leases are taken over (new tokens that only the welcome
        // tells): a failure no longer refuses the hello, it revokes its
        // claim alone, within a deadline of its own.
        let deadline = Deadline::after(CALL);
        let (engine, worker) = (&self.engine, self.record.id.as_str());
        let mut done = futures::stream::iter(steps)
            .map(|(id, step)| async move {
                let got = take(engine, worker, step, deadline).await;
                (id, got)
            })
            .buffered(CLAIMS_IN_FLIGHT);
        let grace = self.engine.config().cancel_grace;
        let mut adopted = HashMap::new();
        let mut leases = Vec::new();
        let mut notices = Vec::new();
        while let Some((id, got)) = done.next().await {
            let got = got.unwrap_or_else(|e| {
                tracing::warn!(task = %id, error = %e, "cannot take over or hand back a re-attached task; its lease lapses");
                Done::Refused(format!("koo could not act on it ({e}); its lease lapses"))
            });
            match got {
                Done::Adopted(task, secret, cancel) => {
                    leases.push(Claim {
                        id: id.to_string(),
                        token: task.token,
                        secret,
                        not_started: false,
                    });
                    let mut h = adopted_held(*task);
                    if let Some(reason) = cancel {
                        h.cancel_at = Some(Instant::now() + grace);
                        notices.push(Outbound::Cancel {
                            id: id.clone(),
                            reason,
                        });
                    }
                    adopted.insert(id, h);
                }
                Done::Refused(reason) => notices.push(revoked(id, reason)),
            }
        }
        drop(done);
        self.adopted.extend(adopted);
        self.adopted_leases.extend(leases);
        self.notices.extend(notices);
        if !self.adopted.is_empty() {
            tracing::info!(
                worker = self.id(),
                tasks = self.adopted.len(),
                "an external worker re-attached tasks it ran on an earlier stream"
            );
        }
        Ok(())
    }

    /// What becomes of a proven claim: adopted when this stream serves it
    /// and the worker began it (its room taken now, even past the worker's
    /// bound: it is running already, no new work; the stream is pushed
    /// nothing new until below it), else given back.
    fn step(&mut self, task: Task, not_started: bool) -> Step {
        if !self.routing.serves(&task) {
            let why =
                "this stream does not serve it (its queue or its name); it went back to its queue";
            Step::GiveBack(Box::new(task), why.to_owned())
        } else if not_started {
            let why = "the worker never started it; it went back to its queue";
            Step::GiveBack(Box::new(task), why.to_owned())
        } else {
            self.taken.force_one();
            Step::Adopt(Box::new(task))
        }
    }
}

/// The revoke of a claim not re-attached.
fn revoked(id: TaskId, why: String) -> Outbound {
    tracing::info!(task = %id, reason = %why, "a re-attached task is refused");
    let reason = format!("not re-attached: {why}");
    Outbound::Revoked { id, reason }
}

/// Why a claim is refused, for a failure that refuses that claim alone;
/// any other failure (the store did not answer) refuses the hello.
fn refusal(e: TaskError) -> Result<String, TaskError> {
    match e {
        TaskError::Fenced(_) | TaskError::NotFound(_) => Ok(e.to_string()),
        TaskError::Forbidden(why) => Ok(why),
        e => Err(e),
    }
}

/// Reads the claimed task and checks that the lease is current and the
/// secret its own (a claim without one is refused, whatever
/// `KOO_LEASE_SECRETS` says: adopting is taking over a lease).
async fn prove(
    engine: &TaskEngine,
    id: &TaskId,
    claim: &Claim,
    deadline: Deadline,
) -> Result<Task, TaskError> {
    let task = engine.get(id.as_str(), deadline).await?;
    if claim.secret.is_empty() && task.state == State::Running && task.token == claim.token {
        return Err(TaskError::Forbidden(
            "lease_secret: required to re-attach a task (the lease_secret that came with it)"
                .to_owned(),
        ));
    }
    authorize(
        engine,
        &task,
        claim.token,
        Proof::given(&claim.secret),
        deadline,
    )
    .await?;
    Ok(task)
}

/// The store calls of a step: an adopted lease is taken over for
/// `worker` (a new token, and its secret); a task given back is released
/// (its attempt counted instead once it was given back `MAX_GIVEN_BACK`
/// times, so that a task cannot bounce for ever; take-overs do not count,
/// see [`Task::given_back`]). A lease that lapsed meanwhile refuses the
/// claim.
async fn take(
    engine: &TaskEngine,
    worker: &str,
    step: Step,
    deadline: Deadline,
) -> Result<Done, TaskError> {
    let got = match step {
        Step::Adopt(task) => {
            match engine.take_over(&task, worker, deadline).await {
                Ok((task, cancel)) => {
                    // without it the stream still works (its own reports
                    // need none), as for a push
                    let secret = engine.lease_secret(&task, deadline).await.unwrap_or_else(|e| {
                        tracing::warn!(task = %task.id, error = %e, "cannot compute a lease secret; the adopted task is told without one");
                        String::new()
                    });
                    Ok(Done::Adopted(Box::new(task), secret, cancel))
                }
                Err(e) => Err(e),
            }
        }
        Step::GiveBack(task, why) => {
            let worker = task.worker.as_deref().unwrap_or_default();
            hand_back(engine, &task, worker, deadline)
                .await
                .map(|_| Done::Refused(why))
        }
    };
    match got {
        Err(e @ TaskError::Fenced(_)) => Ok(Done::Refused(e.to_string())),
        other => other,
    }
}

/// The claims, each id parsed: INVALID_ARGUMENT naming the first wrong
/// one (an id that does not parse, an id named twice), or when there are
/// more than a worker may hold.
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

/// A re-attached task as the session holds it: its time limits run from
/// its attempt's start (one past while the worker was away fires at
/// once), and the worker has spoken about it (it runs it).
fn adopted_held(task: Task) -> Held {
    let now = Instant::now();
    let wall = crate::store::unix_millis(SystemTime::now());
    let started = task.started_ms.unwrap_or(wall);
    let at = |limit_ms: u64| {
        (limit_ms > 0).then(|| {
            let end = started.saturating_add(i64::try_from(limit_ms).unwrap_or(i64::MAX));
            now + Duration::from_millis(u64::try_from(end.saturating_sub(wall)).unwrap_or(0))
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

impl Session {
    /// The leases adopted from the hello, under their new tokens and
    /// secrets: for the welcome.
    pub fn adopted_leases(&self) -> &[Claim] {
        &self.adopted_leases
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
            not_started: false,
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
        let mut task = Task::sample(1, 1);
        task.started_ms = Some(wall - 10_000);
        task.soft_ms = 5_000;
        task.hard_ms = 60_000;
        let h = adopted_held(task);
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
