//! Noticing that Redis is back: the probe, and the recovery prober that
//! runs it while the circuit breaker is not closed.
//!
//! Every `RedisStore` (the cache's, a separate task Redis, the one of a
//! `koo worker` or `koo scheduler` process) has its own breaker, so each
//! watches its own: as soon as the breaker leaves closed, a prober pings that
//! Redis every [`PROBE_EVERY`], each ping bounded by koo's own bound
//! (`KOO_REDIS_CONNECT_TIMEOUT`), and the first answer closes the breaker.
//! Recovery therefore follows Redis within a fraction of a second, whatever
//! the cool-down, whether or not any client calls, in every process kind.

use std::sync::Weak;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::watch;

use super::{Inner, RedisStore};
use crate::store::{CircuitState, Deadline, Result, StoreError};

/// How often a Redis whose breaker is not closed is pinged.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(200);

impl RedisStore {
    /// Pings every pooled connection at once, within `deadline` and koo's
    /// own bound. Redis is reachable as soon as one answers (that closes the
    /// breaker); the other pings finish in the background, so that a probe
    /// also repairs the whole pool after a restart before traffic meets it.
    /// As for calls, only evidence counts against the breaker: a refused or
    /// broken connection, or silence for koo's own bound; a probe cut short by
    /// its caller's deadline is `DEADLINE_EXCEEDED` and proves nothing.
    pub(in crate::store) async fn probe(&self, deadline: Deadline) -> Result<Duration> {
        let started = Instant::now();
        let evidence = self.inner.timeout_evidence;
        let bound = deadline.min(Deadline::after(evidence));
        let mut pings: FuturesUnordered<_> = self
            .inner
            .conns
            .iter()
            .map(|conn| {
                let mut conn = conn.clone();
                async move {
                    let ping = conn.ping_any();
                    tokio::time::timeout_at(bound.instant(), ping).await
                }
            })
            .collect();
        let mut refused = None;
        while let Some(result) = pings.next().await {
            match result {
                Ok(Ok(_)) => {
                    let latency = started.elapsed();
                    self.inner.breaker.on_success();
                    tokio::spawn(async move { while pings.next().await.is_some() {} });
                    return Ok(latency);
                }
                Ok(Err(err)) => {
                    refused.get_or_insert_with(|| format!("Redis ping failed: {err}"));
                }
                Err(_) => {}
            }
        }
        let waited = started.elapsed();
        let message = match refused {
            Some(message) => message,
            None if waited >= evidence => {
                format!("Redis ping got no answer within {} ms", waited.as_millis())
            }
            None => return Err(StoreError::DeadlineExceeded),
        };
        self.inner.breaker.on_failure(&message);
        Err(StoreError::Unavailable(message))
    }
}

impl RedisStore {
    /// Pings Redis once, within `deadline`: what it said if it answered but
    /// refused the URL's database (`SELECT` past its `databases`), a
    /// configuration error that no wait would mend; `None` otherwise (it
    /// answered, or did not: an outage is waited out as ever).
    pub async fn database_refused(&self, deadline: Deadline) -> Option<String> {
        match self.probe(deadline).await {
            Err(StoreError::Unavailable(m)) if m.contains("DB index is out of range") => Some(m),
            _ => None,
        }
    }

    /// Resolves the next time the circuit breaker closes after being open
    /// (at once if it is open now and closes). Loops that back off after a
    /// failure (worker slots, the scheduler) also wait on this, so that they
    /// resume as soon as Redis answers rather than at the end of their pause.
    pub async fn recovered(&self) {
        let mut circuit = self.inner.breaker.watch();
        // Errors only if the breaker is gone, which `self` prevents.
        let _ = circuit.wait_for(|s| *s != CircuitState::Closed).await;
        let _ = circuit.wait_for(|s| *s == CircuitState::Closed).await;
    }
}

/// Starts the prober of the store behind `inner`, if there is a runtime to
/// run it on (there always is in koo; a store built outside one recovers
/// through its calls' trials alone).
/// `redis` names the store in its messages (its setting and redacted URL:
/// a koo may use two Redis servers, and the operator must know which one
/// went away).
pub(super) fn start(inner: Weak<Inner>, circuit: watch::Receiver<CircuitState>, redis: String) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(prober(inner, circuit, redis));
    }
}

/// Waits for the breaker to leave closed, then probes until it closes
/// again; ends with the store.
async fn prober(inner: Weak<Inner>, mut circuit: watch::Receiver<CircuitState>, redis: String) {
    loop {
        if circuit
            .wait_for(|s| *s != CircuitState::Closed)
            .await
            .is_err()
        {
            return; // the store is gone
        }
        tracing::warn!(
            %redis,
            every = ?PROBE_EVERY,
            "Redis unreachable: circuit breaker open; probing until it answers"
        );
        let mut refused_told = false;
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let store = RedisStore { inner };
            if store.inner.breaker.state() == CircuitState::Closed {
                tracing::info!(%redis, "Redis answering again: circuit breaker closed");
                break;
            }
            // A primary that went silent raises no error: with Sentinels,
            // have the probe ask them whether another one took over.
            store.inner.connector.suspect();
            let deadline = Deadline::after(store.inner.timeout_evidence);
            match store.probe(deadline).await {
                Ok(latency) => {
                    tracing::info!(%redis, ?latency, "Redis answering again: circuit breaker closed");
                    break;
                }
                Err(e) if !refused_told && refuses_credentials(&e.to_string()) => {
                    // not an outage that passes: someone must fix a setting
                    refused_told = true;
                    tracing::error!(%redis, error = %e, "Redis refuses koo's credentials: check the user and password of this URL (or the ACL); koo keeps probing");
                }
                Err(_) => {}
            }
        }
        circuit.mark_unchanged();
    }
}

/// Whether a probe's error says Redis refused the credentials (a wrong
/// password, an unknown user, a user the ACL forbids a command).
fn refuses_credentials(error: &str) -> bool {
    ["AuthenticationFailed", "WRONGPASS", "NOAUTH", "NOPERM"]
        .iter()
        .any(|kind| error.contains(kind))
}

#[cfg(test)]
mod tests {
    use super::refuses_credentials;

    /// Redis's and redis-rs's words for refused credentials, not an outage's.
    #[test]
    fn credentials_refused_are_told_from_outages() {
        for refused in [
            "Redis ping failed: Password authentication failed - AuthenticationFailed",
            "WRONGPASS invalid username-password pair or user is disabled.",
            "NOAUTH Authentication required.",
            "NOPERM this user has no permissions to run the 'ping' command",
        ] {
            assert!(refuses_credentials(refused), "{refused}");
        }
        for outage in [
            "Connection refused (os error 111)",
            "Redis ping got no answer within 1000 ms",
        ] {
            assert!(!refuses_credentials(outage), "{outage}");
        }
    }
}
