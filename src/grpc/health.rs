//! `grpc.health.v1.Health`, served by koo itself rather than tonic-health's
//! stock service, for one reason: its `Watch` streams must end when koo shuts
//! down. A stream that never ends holds graceful shutdown open for the whole
//! grace period, and every load balancer and orchestrator watches health.
//!
//! Statuses live in a `watch` channel written by [`crate::health`]; each
//! `Watch` stream sends the current status at once and then every change,
//! and on shutdown sends the last status (NOT_SERVING) and ends cleanly.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::watch;
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
}

impl HealthApi {
    /// Serves `statuses`; watch streams end on `shutdown`.
    pub fn new(statuses: watch::Receiver<Statuses>, shutdown: CancellationToken) -> Self {
        Self { statuses, shutdown }
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
        let state = WatchState {
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
