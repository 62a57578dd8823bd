//! `koo worker` and `koo scheduler` with their own `/metrics`
//! (`KOO_HTTP_LISTEN`, off by default for them): the tasks a worker's
//! slots ran and the schedules a scheduler fired are counted in that
//! process, so a Prometheus that scraped only `koo serve` would miss them.
//!
//! The listener is plaintext and has no gate: these processes have no keys
//! file and no certificate (they serve no gRPC). It is off unless set;
//! bind it where only Prometheus reaches (a pod address under a
//! NetworkPolicy, as `deploy/kubernetes` does).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ServerError;
use super::metrics::Exporter;
use crate::app::{SchedulerSettings, WorkerSettings};
use crate::transport::listener;

/// `koo worker` until `shutdown`, with `/metrics` when `KOO_HTTP_LISTEN`
/// is set (bound first: a bad address stops it naming the setting).
pub async fn run_worker(
    settings: WorkerSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let listener = bind(settings.http_listen).await?;
    let stop = CancellationToken::new();
    let served = crate::app::run_worker(settings, shutdown, |engine| {
        if let Some(l) = listener {
            serve(l, Exporter::of_tasks(engine.clone(), None), stop.clone());
        }
    })
    .await;
    stop.cancel();
    Ok(served?)
}

/// `koo scheduler` until `shutdown`, with `/metrics` as [`run_worker`].
pub async fn run_scheduler(
    settings: SchedulerSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let listener = bind(settings.http_listen).await?;
    let stop = CancellationToken::new();
    let served = crate::app::run_scheduler(settings, shutdown, |engine, schedules| {
        if let Some(l) = listener {
            serve(
                l,
                Exporter::of_tasks(engine.clone(), Some(schedules.clone())),
                stop.clone(),
            );
        }
    })
    .await;
    stop.cancel();
    Ok(served?)
}

/// `KOO_HTTP_LISTEN`'s listener, if set; a bad address is an error
/// naming the setting.
pub(super) async fn bind(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, ServerError> {
    match addr {
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|source| ServerError::HttpListen { addr, source }),
        None => Ok(None),
    }
}

/// Connections its `/metrics` listener keeps open at once (Prometheus and
/// a few people with curl; the others wait in the kernel's backlog).
const MAX_SCRAPERS: usize = 64;

/// Serves `/metrics` on `listener` until `stop`, through the same accept
/// loop, connection count bound and request-head bound as `koo serve`'s
/// HTTP listener.
fn serve(listener: TcpListener, exporter: Exporter, stop: CancellationToken) {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    tracing::info!(%addr, "koo serving HTTP (/metrics)");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(exporter));
    let incoming = listener::incoming(
        listener,
        None,
        // no idle timeout: its requests are not counted as calls (no call
        // layers here), so one would cut a scraper's connection at a fixed age
        None,
        listener::HANDSHAKE_TIMEOUT,
        MAX_SCRAPERS,
    );
    tokio::spawn(super::http_serve::serve(incoming, app, |_| (), stop));
}

async fn metrics(State(exporter): State<Arc<Exporter>>) -> impl axum::response::IntoResponse {
    (
        [(CONTENT_TYPE, super::http::OPENMETRICS)],
        exporter.scrape().await,
    )
}
