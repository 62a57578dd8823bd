//! Drives the standard `grpc.health.v1` status from the backend's real state.
//!
//! Each backend has its own monitor: the cache's store sets the cache's
//! services, a separate task Redis sets TaskService, and the server as a
//! whole (`""`) serves only while every backend does. A probe runs every
//! `REDIS_HEALTH_CHECK_INTERVAL` (every [`FAILING_PROBE_EVERY`] while the
//! backend is failing); between probes, the circuit breaker's transitions
//! flip the status at once, so that a Redis outage under traffic shows as
//! NOT_SERVING without waiting for the next probe, and a recovery (noticed by
//! the store's own recovery prober, even without traffic) shows at once.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::pb::cache::v1::cache_service_server::SERVICE_NAME as CACHE_SERVICE;
use crate::store::{BackendKind, CircuitState, Deadline, MemoryReport, Store};

/// How soon a failed probe is repeated, so that a backend down at start-up
/// (whose breaker has not opened yet) is seen back within a fraction of a
/// second.
pub const FAILING_PROBE_EVERY: Duration = Duration::from_millis(250);

/// Serving status per service name (`""` is the server as a whole).
pub type Statuses = std::collections::BTreeMap<String, ServingStatus>;

/// A health service name that is SERVING for as long as the process answers
/// health checks at all, whatever its backends: for liveness probes, which
/// restart a process that fails them. A Redis outage makes every koo
/// NOT_SERVING (`""`), and restarting them would not bring Redis back, so a
/// liveness probe on `""` would only add restarts to an outage; readiness
/// probes ask `""`.
pub const LIVENESS: &str = "liveness";

/// Reports health for a set of services (and the server as a whole, `""`).
#[derive(Clone)]
pub struct HealthPublisher {
    statuses: watch::Sender<Statuses>,
    services: Vec<&'static str>,
}

impl HealthPublisher {
    /// A publisher for `services`, all NOT_SERVING until told otherwise
    /// ([`LIVENESS`] SERVING, always).
    pub fn new(services: Vec<&'static str>) -> Self {
        let statuses = std::iter::once("")
            .chain(services.iter().copied())
            .map(|s| (s.to_owned(), ServingStatus::NotServing))
            .chain([(LIVENESS.to_owned(), ServingStatus::Serving)])
            .collect();
        Self {
            statuses: watch::Sender::new(statuses),
            services,
        }
    }

    /// What the health service reads.
    pub fn subscribe(&self) -> watch::Receiver<Statuses> {
        self.statuses.subscribe()
    }

    /// Sets every service (and `""`) to `serving` or not.
    pub fn set(&self, serving: bool) {
        self.set_services(&self.services, serving);
    }

    /// Sets `services` to `serving` or not; `""` serves while every service
    /// does.
    pub fn set_services(&self, services: &[&'static str], serving: bool) {
        let status = |serving| {
            if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            }
        };
        self.statuses.send_modify(|statuses| {
            for service in services {
                statuses.insert((*service).to_owned(), status(serving));
            }
            let all = self
                .services
                .iter()
                .all(|s| statuses.get(*s) == Some(&ServingStatus::Serving));
            statuses.insert(String::new(), status(all));
        });
    }
}

/// Probes `store` until `stop`, publishing the result for `services`; a
/// cache store also warns once about an eviction policy that refuses writes.
pub async fn monitor(
    store: Store,
    publisher: HealthPublisher,
    services: Vec<&'static str>,
    interval: Duration,
    stop: CancellationToken,
) {
    let is_cache = services.contains(&CACHE_SERVICE);
    let mut circuit = store.watch_circuit();
    let mut serving = None;
    let mut warned_policy = false;
    loop {
        let timeout = interval.min(Duration::from_secs(5));
        let probe = store.probe(Deadline::after(timeout)).await;
        let ok = probe.is_ok();
        match (&probe, serving) {
            (Ok(latency), Some(false) | None) => {
                tracing::info!(?latency, "backend reachable; serving");
            }
            (Err(e), Some(true) | None) => {
                tracing::warn!(error = %e, "backend unreachable; not serving")
            }
            _ => {}
        }
        if ok && is_cache && !warned_policy && store.kind() == BackendKind::Redis {
            warned_policy = true;
            match store.memory(Deadline::after(timeout)).await {
                Ok(m) if m.policy == "noeviction" => tracing::warn!(
                    "the cache's Redis has maxmemory-policy noeviction: when it is full, cache writes fail with RESOURCE_EXHAUSTED; a cache Redis usually wants allkeys-lru"
                ),
                Ok(MemoryReport {
                    unavailable: Some(why),
                    ..
                }) => tracing::info!(
                    reason = %why,
                    "cannot check the cache Redis's maxmemory-policy (a cache Redis usually wants allkeys-lru)"
                ),
                _ => {}
            }
        }
        if serving != Some(ok) && !stop.is_cancelled() {
            publisher.set_services(&services, ok);
            serving = Some(ok);
        }
        // After a failed probe, probe again soon: a recovery that no call
        // happens to notice should not wait a whole interval to show.
        let wait = tokio::time::sleep(if ok {
            interval
        } else {
            interval.min(FAILING_PROBE_EVERY)
        });
        tokio::pin!(wait);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = &mut wait => break,
                changed = circuit.changed() => {
                    if changed.is_err() {
                        // The store is gone; only the probe can tell now.
                        (&mut wait).await;
                        break;
                    }
                    let ok = *circuit.borrow_and_update() == CircuitState::Closed;
                    if serving != Some(ok) && !stop.is_cancelled() {
                        if ok {
                            tracing::info!("backend answering again; serving");
                        } else {
                            tracing::warn!(last_error = ?store.last_error().map(|e| e.message), "circuit breaker opened; not serving");
                        }
                        publisher.set_services(&services, ok);
                        serving = Some(ok);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Liveness stays SERVING while the backends come and go and while koo
    /// shuts down (`set(false)`); `""` follows every service.
    #[test]
    fn liveness_serves_whatever_the_backends() {
        let publisher = HealthPublisher::new(vec!["a", "b"]);
        let statuses = publisher.subscribe();
        let status = |name: &str| statuses.borrow()[name];
        assert_eq!(status(LIVENESS), ServingStatus::Serving);
        assert_eq!(status(""), ServingStatus::NotServing);
        publisher.set(true);
        assert_eq!(status(""), ServingStatus::Serving);
        publisher.set_services(&["a"], false);
        assert_eq!(status(""), ServingStatus::NotServing);
        assert_eq!(status(LIVENESS), ServingStatus::Serving);
        publisher.set(false);
        assert_eq!(status(LIVENESS), ServingStatus::Serving);
    }
}
