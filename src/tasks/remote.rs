//! External workers: processes outside koo that run tasks over gRPC
//! (`koo.worker.v1.WorkerService`), under the guarantees of the built-in
//! workers.
//!
//! A stream worker is a [`Session`] (in `remote/session.rs`); the unary calls
//! ([`lease_once`], [`heartbeat`], [`complete`], [`fail`]) are the same
//! steps one at a time, for scripts and for grpcurl. What both share lives
//! here: routing, report validation, and the steps that end an attempt.

pub mod holds;
pub mod secret;
mod session;
mod unary;

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

pub use secret::Proof;
pub use session::{
    Claim, Inbound, MAX_GIVEN_BACK, Outbound, ReplyKind, Session, heartbeat_interval,
};
pub use unary::lease_once;

use super::engine::{Finish, TaskEngine, TaskError};
use super::worker::cache_result;
use crate::cache::Cache;
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::store::Deadline;

/// Most task names a worker may serve.
const MAX_NAMES: usize = 256;
/// Largest concurrency a stream worker may declare.
pub const MAX_CONCURRENCY: u32 = 1024;
/// Largest JSON of progress metadata or failure details.
const MAX_JSON: usize = 64 * 1024;
/// Longest error message.
const MAX_MESSAGE: usize = 4096;
/// Longest progress message.
const MAX_PROGRESS_MESSAGE: usize = 1024;
/// Longest unary lease wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// How long each store call of a session may take.
const CALL: Duration = Duration::from_secs(5);

/// What a worker serves: task names (empty: every name) in queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    queues: Vec<QueueName>,
    /// Lease filter: the names, or `*`.
    names: Vec<String>,
}

impl Routing {
    /// Validates a worker's declaration: names (each 1 to 256 bytes) and
    /// queues (among `known`); at least one of them. No queues means every
    /// known queue.
    pub fn new(
        names: &[String],
        queues: &[String],
        known: &[QueueName],
    ) -> Result<Self, TaskError> {
        if names.is_empty() && queues.is_empty() {
            return Err(TaskError::invalid(
                "task_names",
                "name the task names or the queues served (at least one)",
            ));
        }
        if names.len() > MAX_NAMES {
            return Err(TaskError::invalid(
                "task_names",
                format!("at most {MAX_NAMES} names, got {}", names.len()),
            ));
        }
        for (i, n) in names.iter().enumerate() {
            if n.is_empty() || n.len() > 256 || n == "*" {
                return Err(TaskError::invalid(
                    &format!("task_names[{i}]"),
                    "must be 1 to 256 bytes (and not `*`: leave task_names empty to serve every name)",
                ));
            }
        }
        let mut parsed = Vec::with_capacity(queues.len());
        for (i, q) in queues.iter().enumerate() {
            let q = QueueName::parse(q)
                .map_err(|e| TaskError::invalid(&format!("queues[{i}]"), e.to_string()))?;
            if !known.contains(&q) {
                return Err(TaskError::invalid(
                    &format!("queues[{i}]"),
                    format!(
                        "unknown queue \"{q}\": koo serves the category queues and those named in KOO_TASK_QUEUES"
                    ),
                ));
            }
            if !parsed.contains(&q) {
                parsed.push(q);
            }
        }
        let mut names: Vec<String> = names.to_vec();
        names.sort();
        names.dedup();
        Ok(Self {
            queues: if parsed.is_empty() {
                known.to_vec()
            } else {
                parsed
            },
            names: if names.is_empty() {
                vec!["*".to_owned()]
            } else {
                names
            },
        })
    }

    /// The queues served.
    pub fn queues(&self) -> &[QueueName] {
        &self.queues
    }

    /// The names served, as declared (empty: all).
    pub fn names(&self) -> Vec<String> {
        if self.names == ["*"] {
            Vec::new()
        } else {
            self.names.clone()
        }
    }

    /// Whether a task is one this worker serves: of a queue it serves,
    /// and a name it serves.
    pub fn serves(&self, task: &Task) -> bool {
        self.queues.contains(&task.id.queue())
            && (self.names == ["*"] || self.names.contains(&task.name))
    }

    fn filter(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }
}

/// Validates a worker's name (1 to 128 bytes, printable).
pub fn check_name(field: &str, name: &str) -> Result<(), TaskError> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(TaskError::invalid(
            field,
            "must be 1 to 128 bytes without control characters",
        ));
    }
    Ok(())
}

/// A progress report from a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// 0 to 100.
    pub percent: f64,
    /// What it is doing.
    pub message: String,
    /// Anything else (a JSON object).
    pub metadata: serde_json::Value,
}

impl Progress {
    fn to_json(&self) -> Result<String, TaskError> {
        if !self.percent.is_finite() || !(0.0..=100.0).contains(&self.percent) {
            return Err(TaskError::invalid(
                "percent",
                format!("must be 0 to 100, got {}", self.percent),
            ));
        }
        if self.message.len() > MAX_PROGRESS_MESSAGE {
            return Err(TaskError::invalid(
                "message",
                format!("at most {MAX_PROGRESS_MESSAGE} bytes"),
            ));
        }
        let metadata = self.metadata.to_string();
        if metadata.len() > MAX_JSON {
            return Err(TaskError::invalid(
                "metadata",
                format!("at most {MAX_JSON} bytes as JSON"),
            ));
        }
        Ok(serde_json::json!({
            "percent": self.percent,
            "message": self.message,
            "metadata": self.metadata,
        })
        .to_string())
    }
}

/// A failure reported by a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// What went wrong.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// Anything else (a JSON object), if given.
    pub details: Option<serde_json::Value>,
    /// How long to wait before the next attempt instead of the backoff, as
    /// the worker sent it (checked by [`Failure::into_finish`]).
    pub retry_delay: Option<RetryDelay>,
    /// How long every task of the task's rate-limit key waits (a
    /// provider's 429 `Retry-After`), as sent; checked like `retry_delay`
    /// (by [`Failure::into_ending`]).
    pub key_retry_after: Option<RetryDelay>,
}

/// How a worker's report ends an attempt: the finish, and for a failure
/// the back-off of the task's rate-limit key it asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    /// The attempt's end.
    pub finish: Finish,
    /// `key_retry_after`, checked.
    pub key_backoff: Option<Duration>,
}

impl From<Finish> for Ending {
    fn from(finish: Finish) -> Self {
        Self {
            finish,
            key_backoff: None,
        }
    }
}

/// A retry delay as sent (a protobuf `Duration`'s two parts), unchecked:
/// the stream's reply and `FailTask` refuse a bad one the same way, in
/// [`Failure::into_finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryDelay {
    /// Whole seconds.
    pub seconds: i64,
    /// Nanoseconds, of the sign of `seconds`.
    pub nanos: i32,
}

/// Longest retry delay a worker may ask for.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 3600);

impl RetryDelay {
    /// The delay, when normalised and 0 s to 24 h; else why not, quoting
    /// the value.
    fn check(self) -> Result<Duration, String> {
        let Self { seconds, nanos } = self;
        let refuse = |why: &str| {
            format!("{why}: must be 0 s to 24 h (got seconds {seconds}, nanos {nanos})")
        };
        if !(-999_999_999..=999_999_999).contains(&nanos)
            || (seconds > 0 && nanos < 0)
            || (seconds < 0 && nanos > 0)
        {
            return Err(refuse(
                "is not a normalised duration (|nanos| at most 999,999,999, of the sign of seconds)",
            ));
        }
        if seconds < 0 || nanos < 0 {
            return Err(refuse("is negative"));
        }
        // compared in seconds first, so that i64::MAX never reaches Duration
        let max = MAX_RETRY_DELAY;
        if seconds as u64 > max.as_secs() || Duration::new(seconds as u64, nanos as u32) > max {
            return Err(refuse("is out of range"));
        }
        Ok(Duration::new(seconds as u64, nanos as u32))
    }
}

impl Failure {
    /// The failure as an ending: [`Failure::into_finish`] and its key
    /// back-off, both checked, named under `path`.
    pub(crate) fn into_ending(self, path: &str) -> Result<Ending, TaskError> {
        let key_backoff = match self.key_retry_after {
            Some(d) => Some(
                d.check()
                    .map_err(|why| TaskError::invalid(&format!("{path}key_retry_after"), why))?,
            ),
            None => None,
        };
        Ok(Ending {
            finish: self.into_finish(path)?,
            key_backoff,
        })
    }

    /// The failure as a finish, once checked; an argument error names its
    /// field under `path` (`fail.` on a stream, nothing for `FailTask`).
    fn into_finish(self, path: &str) -> Result<Finish, TaskError> {
        if self.message.is_empty() || self.message.len() > MAX_MESSAGE {
            return Err(TaskError::invalid(
                &format!("{path}message"),
                format!("must be 1 to {MAX_MESSAGE} bytes"),
            ));
        }
        if let Some(d) = &self.details
            && d.to_string().len() > MAX_JSON
        {
            return Err(TaskError::invalid(
                &format!("{path}details"),
                format!("at most {MAX_JSON} bytes as JSON"),
            ));
        }
        // checked even for a failure that is not retryable: a bad value is
        // the worker's bug either way
        let delay = match self.retry_delay {
            Some(d) => Some(
                d.check()
                    .map_err(|why| TaskError::invalid(&format!("{path}retry_delay"), why))?,
            ),
            None => None,
        };
        Ok(Finish::Failed {
            message: self.message,
            retryable: self.retryable,
            details: self.details,
            delay,
        })
    }
}
/// Re-checks the key of lease secrets every lease until `stop` (see
/// [`TaskEngine::refresh_signer`]).
pub async fn keep_lease_key(engine: TaskEngine, stop: CancellationToken) {
    let mut tick = tokio::time::interval(engine.config().lease);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = engine.refresh_signer(Deadline::after(CALL)).await {
                    tracing::debug!(error = %e, "cannot re-check the key of lease secrets; next lease");
                }
            }
        }
    }
}

/// How a unary heartbeat went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeatReply {
    /// A cancel was asked for.
    pub cancel_requested: bool,
    /// Its reason (empty when none was asked for).
    pub cancel_reason: String,
    /// The soft time limit has passed.
    pub soft_limit_exceeded: bool,
    /// When the lease now lapses.
    pub lease_until: SystemTime,
}

/// Whether a report with `token` and `proof` may act on `task` (as just
/// read): see [`secret::authorize`]. The signer is read only to check a
/// secret the report carries.
async fn authorize(
    engine: &TaskEngine,
    task: &Task,
    token: u32,
    proof: Proof<'_>,
    deadline: Deadline,
) -> Result<(), TaskError> {
    let signer = match proof {
        Proof::Secret(Some(_)) => Some(engine.signer(deadline).await?),
        _ => None,
    };
    let policy = engine.config().lease_secrets;
    secret::authorize(signer.as_deref(), policy, task, token, proof)
}

/// Extends a lease for a unary caller that proves it holds it.
pub async fn heartbeat(
    engine: &TaskEngine,
    id: &str,
    token: u32,
    proof: Proof<'_>,
    deadline: Deadline,
) -> Result<BeatReply, TaskError> {
    let task_id = TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
    let task = engine.get(id, deadline).await?;
    authorize(engine, &task, token, proof, deadline).await?;
    let cancel = engine.heartbeat(&task_id, token, deadline).await?;
    let lease_until = SystemTime::now() + engine.config().lease;
    let now = crate::store::unix_millis(SystemTime::now());
    let soft_limit_exceeded = task.soft_ms > 0
        && task
            .started_ms
            .is_some_and(|s| now >= s.saturating_add(task.soft_ms as i64));
    Ok(BeatReply {
        cancel_requested: cancel.is_some(),
        cancel_reason: cancel.unwrap_or_default(),
        soft_limit_exceeded,
        lease_until,
    })
}

/// Records progress reported under a lease (read first, to check `proof`,
/// unless it comes from the stream holding it).
pub async fn progress_task(
    engine: &TaskEngine,
    id: &str,
    token: u32,
    progress: &Progress,
    proof: Proof<'_>,
    deadline: Deadline,
) -> Result<(), TaskError> {
    let task_id = TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
    let json = progress.to_json()?;
    if proof != Proof::Stream {
        let task = engine.get(id, deadline).await?;
        authorize(engine, &task, token, proof, deadline).await?;
    }
    engine.progress(&task_id, token, &json, deadline).await
}

/// Ends an attempt reported under a lease by a caller that does not hold
/// the task on a stream: reads the task (for its attempt log entry and to
/// check `proof`), caches a result that asks for it, then ends the attempt.
pub async fn finish_leased(
    engine: &TaskEngine,
    cache: Option<&Cache>,
    id: &str,
    token: u32,
    ending: Ending,
    proof: Proof<'_>,
    deadline: Deadline,
) -> Result<State, TaskError> {
    TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
    let task = engine.get(id, deadline).await?;
    authorize(engine, &task, token, proof, deadline).await?;
    check_key_backoff(&task, ending.key_backoff, "")?;
    back_off_key(engine, &task, ending.key_backoff, deadline).await?;
    let worker = task.worker.clone().unwrap_or_default();
    let finish = cache_result(cache, &task, ending.finish).await;
    engine.finish(&task, token, &worker, finish, deadline).await
}

/// A key back-off needs a task with a rate-limit key: refused before
/// anything is recorded (FAILED_PRECONDITION naming the field under
/// `path`).
pub(crate) fn check_key_backoff(
    task: &Task,
    backoff: Option<Duration>,
    path: &str,
) -> Result<(), TaskError> {
    if backoff.is_some() && task.rate_limit_key.is_none() {
        return Err(TaskError::FailedPrecondition(format!(
            "{path}key_retry_after: task {} has no rate_limit_key to back off",
            task.id
        )));
    }
    Ok(())
}

/// Backs off the task's rate-limit key as its failure asks, before the
/// failure is recorded: a retry of it then waits with the rest of the key.
pub(crate) async fn back_off_key(
    engine: &TaskEngine,
    task: &Task,
    backoff: Option<Duration>,
    deadline: Deadline,
) -> Result<(), TaskError> {
    if let (Some(wait), Some(key)) = (backoff, task.rate_limit_key.as_deref()) {
        engine.back_off(key, wait, deadline).await?;
    }
    Ok(())
}

/// Completes a task for a unary caller.
pub async fn complete(
    engine: &TaskEngine,
    cache: Option<&Cache>,
    id: &str,
    token: u32,
    result: serde_json::Value,
    proof: Proof<'_>,
    deadline: Deadline,
) -> Result<State, TaskError> {
    let finish = Finish::Succeeded(result.to_string());
    finish_leased(engine, cache, id, token, finish.into(), proof, deadline).await
}

/// Fails a task for a unary caller.
pub async fn fail(
    engine: &TaskEngine,
    id: &str,
    token: u32,
    failure: Failure,
    proof: Proof<'_>,
    deadline: Deadline,
) -> Result<State, TaskError> {
    let ending = failure.into_ending("")?;
    finish_leased(engine, None, id, token, ending, proof, deadline).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::Category;

    /// A worker must serve something; names and queues are checked.
    #[test]
    fn routing_validates() {
        let k = Category::queues();
        assert!(Routing::new(&[], &["gpu".into()], &k).is_err());
        assert!(Routing::new(&[], &[], &k).is_err());
        assert!(Routing::new(&["*".into()], &[], &k).is_err());
        assert!(Routing::new(&[String::new()], &[], &k).is_err());
        assert!(Routing::new(&[], &["Bad Queue".into()], &k).is_err());
        let r = Routing::new(&["a".into(), "a".into()], &[], &k).unwrap();
        assert_eq!(r.queues(), Category::queues().as_slice());
        assert_eq!(r.names(), vec!["a".to_owned()]);
        let r = Routing::new(&[], &["pdf_processing".into()], &k).unwrap();
        assert_eq!(r.filter(), vec!["*"]);
        assert!(r.names().is_empty());
    }

    /// Progress and failures are bounded.
    #[test]
    fn reports_validate() {
        let p = |percent: f64| Progress {
            percent,
            message: String::new(),
            metadata: serde_json::json!({}),
        };
        assert!(p(50.0).to_json().is_ok());
        assert!(p(100.5).to_json().is_err());
        assert!(p(f64::NAN).to_json().is_err());
        let f = |message: &str| Failure {
            message: message.to_owned(),
            retryable: false,
            details: None,
            retry_delay: None,
            key_retry_after: None,
        };
        assert!(f("boom").into_finish("").is_ok());
        assert!(f("").into_finish("").is_err());
        assert!(f(&"x".repeat(MAX_MESSAGE + 1)).into_finish("").is_err());
    }

    /// A retry delay is 0 s to 24 h, normalised; a bad one is refused
    /// naming the field under the caller's path and quoting the value.
    #[test]
    fn retry_delays_validate() {
        let f = |seconds, nanos| Failure {
            message: "busy".to_owned(),
            retryable: true,
            details: None,
            retry_delay: Some(RetryDelay { seconds, nanos }),
            key_retry_after: None,
        };
        let delay = |seconds, nanos| match f(seconds, nanos).into_finish("fail.") {
            Ok(Finish::Failed { delay, .. }) => delay,
            other => panic!("{other:?}"),
        };
        assert_eq!(delay(0, 0), Some(Duration::ZERO));
        assert_eq!(delay(86_400, 0), Some(MAX_RETRY_DELAY));
        assert_eq!(delay(1, 500_000_000), Some(Duration::from_millis(1500)));
        for (seconds, nanos) in [
            (-1, 0),
            (0, -1),
            (86_400, 1),
            (86_401, 0),
            (i64::MAX, 0),
            (i64::MIN, 0),
            (1, 1_000_000_000),
            (1, -1),
        ] {
            match f(seconds, nanos).into_finish("fail.") {
                Err(TaskError::InvalidArgument { field, reason }) => {
                    assert_eq!(field, "fail.retry_delay");
                    assert!(
                        reason.contains(&format!("got seconds {seconds}, nanos {nanos}")),
                        "{reason}"
                    );
                }
                other => panic!("{seconds} {nanos}: {other:?}"),
            }
        }
    }

    /// A key back-off is checked like a retry delay and named under the
    /// caller's path (its precondition, a task with a rate-limit key, is
    /// tested over gRPC in tests/it/limits_api.rs).
    #[test]
    fn key_backoffs_validate() {
        let f = |seconds, nanos| Failure {
            message: "429".to_owned(),
            retryable: true,
            details: None,
            retry_delay: None,
            key_retry_after: Some(RetryDelay { seconds, nanos }),
        };
        let ending = f(30, 0).into_ending("fail.").unwrap();
        assert_eq!(ending.key_backoff, Some(Duration::from_secs(30)));
        for (seconds, nanos) in [(-1, 0), (86_401, 0), (i64::MAX, 0), (1, -1)] {
            match f(seconds, nanos).into_ending("fail.") {
                Err(TaskError::InvalidArgument { field, .. }) => {
                    assert_eq!(field, "fail.key_retry_after");
                }
                other => panic!("{seconds} {nanos}: {other:?}"),
            }
        }
    }
}
