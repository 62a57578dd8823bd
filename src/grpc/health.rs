//! `grpc.health.v1.Health`, served by koo itself rather than tonic-health's
//! stock service, for one reason: its `Watch` streams must end when koo shuts
//! down. A stream that never ends holds graceful shutdown open for the whole
//! grace period, and every load balancer and orchestrator watches health.
//!
//! Statuses live in a `watch` channel written by [`crate::health`]; each
//! `Watch` stream sends the current status at once and then every change,
//! and on shutdown sends the last status (NOT_SERVING) and ends cleanly.
//!
//! `Watch` is open to every caller (probes carry no key), so it is bounded:
//! at most [`MAX_WATCHES`] at once per process (then RESOURCE_EXHAUSTED:
//! `Check` answers the same question), and a health watch does not keep
//! its connection from the idle timeout (`crate::transport::calls`), so
//! that an unauthenticated client cannot hold connections and memory with
//! them. A gRPC client's health checking reconnects and watches again.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::health::Statuses;

/// The health service.
pub struct HealthApi {
    statuses: watch::Receiver<Statuses>,
    shutdown: CancellationToken,
    /// Places for `Watch` streams (every listener's: the clones share it).
    watches: Arc<Semaphore>,
    /// Most open at once.
    max: usize,
}

/// Most `Watch` streams open at once in one process (the default of
/// `Limits::max_health_watches`).
pub const MAX_WATCHES: usize = 1024;

impl HealthApi {
    /// Serves `statuses`; watch streams end on `shutdown`; at most `max`
    /// of them at once.
    pub fn new(
        statuses: watch::Receiver<Statuses>,
        shutdown: CancellationToken,
        max: usize,
    ) -> Self {
        Self {
            statuses,
            shutdown,
            watches: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

fn status_of(statuses: &Statuses, service: &str) -> ServingStatus {
    statuses
        .get(service)
        .copied()
        .unwrap_or(ServingStatus::ServiceUnknown)
}

fn reply(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

struct WatchState {
    /// Its place, given back when the stream ends.
    _place: OwnedSemaphorePermit,
    statuses: watch::Receiver<Statuses>,
    shutdown: CancellationToken,
    service: String,
    last: Option<ServingStatus>,
    ending: bool,
}

#[tonic::async_trait]
impl Health for HealthApi {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match self.statuses.borrow().get(&service) {
            Some(status) => Ok(Response::new(reply(*status))),
            None => Err(Status::not_found(format!(
                "unknown service {}",
                crate::quote::quote(&service)
            ))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let Ok(place) = self.watches.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "{} health watches are open in this koo; call Check instead, or watch again later",
                self.max
            )));
        };
        let state = WatchState {
            _place: place,
            statuses: self.statuses.clone(),
            shutdown: self.shutdown.clone(),
            service: request.into_inner().service,
            last: None,
            ending: false,
        };
        let stream = futures::stream::unfold(state, |mut s| async move {
            loop {
                let current = status_of(&s.statuses.borrow_and_update(), &s.service);
                if s.last != Some(current) {
                    s.last = Some(current);
                    return Some((Ok(reply(current)), s));
                }
                if s.ending {
                    return None;
                }
                tokio::select! {
                    changed = s.statuses.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                    }
                    // One more pass sends the final status, then the stream ends.
                    _ = s.shutdown.cancelled() => s.ending = true,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
