//! How one call runs: under the breaker, within its deadline, retried with
//! exponential backoff and jitter while the failure is transient (or, for a
//! call that must not run twice, only when the request surely never left).

use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;
use redis::{Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RetryMethod};

use super::RedisStore;
use super::breaker::Evidence;
use super::conn::Conn;
use crate::store::{Deadline, Result, StoreError};

/// The least time one attempt gets when `REDIS_RETRY_ON_TIMEOUT` splits a
/// call's deadline between attempts.
const ATTEMPT_FLOOR: Duration = Duration::from_millis(250);

/// How a failed call should be handled.
enum Failure {
    /// Redis could not be reached or did not answer; retry if time allows.
    Transient(String),
    /// Redis answered with an error that retrying will not fix.
    Permanent(StoreError),
}

/// Whether Redis answered with error `code`, alone or inside a pipeline or
/// transaction.
pub(super) fn has_code(err: &RedisError, code: &str) -> bool {
    err.code() == Some(code)
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == code))
}

/// One failed reply of a pipeline (a script that failed among others), as
/// the store's error: out of memory and a wrong type as they are for a
/// whole call (so a full Redis is `RESOURCE_EXHAUSTED` whichever path the
/// command took), anything else a backend error saying `what` failed.
pub(super) fn reply_error(what: &str, err: &RedisError) -> StoreError {
    match classify(err) {
        Failure::Permanent(e @ (StoreError::OutOfMemory(_) | StoreError::WrongType(_))) => e,
        _ => StoreError::Backend(format!("{what} failed: {err}")),
    }
}

fn classify(err: &RedisError) -> Failure {
    if has_code(err, "OOM") {
        return Failure::Permanent(StoreError::OutOfMemory(err.to_string()));
    }
    if has_code(err, "WRONGTYPE") {
        return Failure::Permanent(StoreError::WrongType(err.to_string()));
    }
    match err.kind() {
        // Redis answered, but not in the shape expected (e.g. a key that is
        // not UTF-8): retrying cannot help, and Redis is not at fault.
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            Failure::Permanent(StoreError::Backend(err.to_string()))
        }
        _ => match err.retry_method() {
            RetryMethod::NoRetry => Failure::Permanent(StoreError::Backend(err.to_string())),
            _ => Failure::Transient(err.to_string()),
        },
    }
}

/// Whether the failed request surely changed nothing: it never left (a
/// refused connection, no connection to the slot's node, or no primary
/// named by the Sentinels), or a replica refused it (`READONLY`: the next
/// attempt reaches the new primary), or, for a `single` command, Redis
/// refused it whole: a redirect (`MOVED`: the slot is another node's now,
/// after a failover; `ASK`), or a Cluster or primary not ready
/// (`CLUSTERDOWN`, `MASTERDOWN`, `TRYAGAIN`, `LOADING`): the replies
/// redis-rs itself retries. In a pipeline the commands before the refused
/// one may have run.
fn never_applied(err: &RedisError, single: bool) -> bool {
    let refused_whole = err.code().is_some()
        && matches!(
            err.retry_method(),
            RetryMethod::MovedRedirect | RetryMethod::AskRedirect | RetryMethod::WaitAndRetry
        );
    err.is_connection_refusal()
        || err.kind() == ErrorKind::ClusterConnectionNotFound
        || has_code(err, "READONLY")
        || (single && refused_whole)
}

/// Exponential backoff with full jitter: 10 ms, 20 ms, 40 ms... capped at 1 s.
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(10u64 << attempt.min(7)).min(Duration::from_secs(1));
    rand::rng().random_range(cap / 2..=cap)
}

impl RedisStore {
    /// Runs `call` on a pooled connection under the breaker, the deadline and
    /// the retry policy.
    ///
    /// A call keeps its connection across retries after an error: a
    /// `ConnectionManager` reconnects itself after an I/O error, so the retry
    /// repairs it, whereas hopping to the next pooled connection after a Redis
    /// restart would only meet the next broken one. After an attempt that got
    /// no answer (a half-dead connection), the retry takes another connection.
    /// A failed call counts once against the breaker, however many attempts it
    /// made, and only when one of them showed that Redis is down (see
    /// [`Evidence`]); a call that merely ran out of its caller's time is
    /// `DEADLINE_EXCEEDED` and counts for nothing.
    pub(super) async fn run<T, F, Fut>(&self, deadline: Deadline, mut call: F) -> Result<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        let admission = inner.breaker.admit()?;
        let mut evidence = Evidence::default();
        let mut conn = self.conn();
        let mut attempt = 0;
        loop {
            let remaining = deadline.remaining();
            // With REDIS_RETRY_ON_TIMEOUT an attempt gets half the time left
            // (at least ATTEMPT_FLOOR), leaving room to retry elsewhere.
            let budget = if inner.retry_on_timeout && attempt < inner.retries {
                (remaining / 2).max(ATTEMPT_FLOOR).min(remaining)
            } else {
                remaining
            };
            let started = Instant::now();
            let failure = match tokio::time::timeout(budget, call(conn.clone())).await {
                Ok(Ok(value)) => {
                    admission.succeeded();
                    return Ok(value);
                }
                Ok(Err(err)) => match classify(&err) {
                    Failure::Permanent(e) => {
                        admission.succeeded();
                        return Err(e);
                    }
                    Failure::Transient(message) => evidence.down(message),
                },
                Err(_) => {
                    let message = evidence.silent(started.elapsed(), inner.timeout_evidence);
                    if deadline.remaining().is_zero() {
                        return Err(evidence.settle(admission, StoreError::DeadlineExceeded));
                    }
                    conn = self.conn();
                    message
                }
            };
            let pause = backoff(attempt);
            if attempt >= inner.retries || pause >= deadline.remaining() || !admission.may_retry() {
                let unreachable = StoreError::Unavailable(format!(
                    "Redis unreachable after {} attempt(s): {failure}",
                    attempt + 1
                ));
                // a Cluster partly down: not "Redis is down" (see `partial`)
                if self.cluster_answers(inner.timeout_evidence).await {
                    return Err(unreachable);
                }
                return Err(evidence.settle(admission, unreachable));
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// Runs a call that must not run twice (a script that moves a task):
    /// like [`Self::run`], but only a refused connection, where the request
    /// surely never left, or a `READONLY` reply (a replica refuses every
    /// write: the old primary after a Sentinel failover), is retried. After a timeout or a dropped
    /// connection the request may have run, so the caller is told the
    /// outcome is unknown rather than risk running it again. As in
    /// [`Self::run`], only evidence that Redis is down counts against the
    /// breaker.
    pub(super) async fn run_once<T, F, Fut>(&self, deadline: Deadline, call: F) -> Result<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_once_as(deadline, false, call).await
    }

    /// [`Self::run_once`] for one command (a script): a refusal of the
    /// whole command (`MOVED` after a failover, `CLUSTERDOWN`, ...; see
    /// [`REFUSED`]) is retried too, since nothing of it ran.
    pub(super) async fn run_once_command<T, F, Fut>(&self, deadline: Deadline, call: F) -> Result<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_once_as(deadline, true, call).await
    }

    async fn run_once_as<T, F, Fut>(
        &self,
        deadline: Deadline,
        single: bool,
        mut call: F,
    ) -> Result<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        let admission = inner.breaker.admit()?;
        let mut evidence = Evidence::default();
        let conn = self.conn();
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let err = match tokio::time::timeout_at(deadline.instant(), call(conn.clone())).await {
                Ok(Ok(value)) => {
                    admission.succeeded();
                    return Ok(value);
                }
                Ok(Err(err)) => err,
                Err(_) => {
                    evidence.silent(started.elapsed(), inner.timeout_evidence);
                    return Err(evidence.settle(admission, StoreError::DeadlineExceeded));
                }
            };
            let message = match classify(&err) {
                Failure::Permanent(e) => {
                    admission.succeeded();
                    return Err(e);
                }
                Failure::Transient(message) => evidence.down(message),
            };
            let pause = backoff(attempt);
            let applied = !never_applied(&err, single);
            if applied
                || attempt >= inner.retries
                || pause >= deadline.remaining()
                || !admission.may_retry()
            {
                // a request Redis surely refused is not "maybe applied":
                // the caller may send it again
                let unknown = StoreError::Unavailable(if applied {
                    format!(
                        "Redis failed after {} attempt(s) (the request may or may not have been applied): {message}",
                        attempt + 1
                    )
                } else {
                    format!(
                        "Redis refused the request {} time(s), so it was not applied (safe to send again): {message}",
                        attempt + 1
                    )
                });
                if self.cluster_answers(inner.timeout_evidence).await {
                    return Err(unknown);
                }
                return Err(evidence.settle(admission, unknown));
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    pub(super) async fn query<T: FromRedisValue>(
        &self,
        cmd: &Cmd,
        deadline: Deadline,
    ) -> Result<T> {
        self.run(
            deadline,
            |mut c| async move { cmd.query_async(&mut c).await },
        )
        .await
    }

    pub(super) async fn query_pipe<T: FromRedisValue>(
        &self,
        pipe: &Pipeline,
        deadline: Deadline,
    ) -> Result<T> {
        self.run(
            deadline,
            |mut c| async move { pipe.query_async(&mut c).await },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(text: &str) -> RedisError {
        redis::parse_redis_value(format!("-{text}\r\n").as_bytes())
            .and_then(redis::Value::extract_error)
            .unwrap_err()
    }

    /// What surely changed nothing may be sent again: a refused
    /// connection, a replica's `READONLY`, and for one command a refusal of
    /// the whole of it (a failover's `MOVED`, `CLUSTERDOWN`, ...), which in
    /// a pipeline may follow commands that ran; a broken connection or an
    /// ordinary error reply may have applied it.
    #[test]
    fn which_failures_surely_changed_nothing() {
        let io = |kind| RedisError::from(std::io::Error::new(kind, "x"));
        assert!(never_applied(
            &io(std::io::ErrorKind::ConnectionRefused),
            false
        ));
        let no_node = RedisError::from((ErrorKind::ClusterConnectionNotFound, "no connection"));
        assert!(never_applied(&no_node, false));
        assert!(!never_applied(
            &io(std::io::ErrorKind::ConnectionReset),
            true
        ));
        let readonly = server_error("READONLY You can't write against a read only replica.");
        assert!(never_applied(&readonly, false));
        for refused in [
            "MOVED 2298 127.0.0.1:7721",
            "ASK 2298 127.0.0.1:7722",
            "CLUSTERDOWN The cluster is down",
            "MASTERDOWN Link with MASTER is down",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "LOADING Redis is loading the dataset in memory",
        ] {
            assert!(never_applied(&server_error(refused), true), "{refused}");
            assert!(!never_applied(&server_error(refused), false), "{refused}");
        }
        assert!(!never_applied(&server_error("ERR something else"), true));
        assert!(!never_applied(
            &server_error("OOM command not allowed"),
            true
        ));
    }

    /// Backoff grows and stays capped.
    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            let b = backoff(attempt);
            assert!(b <= Duration::from_secs(1), "{b:?}");
            assert!(b >= Duration::from_millis(5), "{b:?}");
        }
    }
}
