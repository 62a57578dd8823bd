//! The HTTP listener (`KOO_HTTP_LISTEN`): an axum router (axum 0.8 is
//! already in the tree through tonic) serving `/metrics` now; grpc-web, the
//! REST paths and the dashboard are meant to be routes added here.
//!
//! Connections come from the same accept loop as the gRPC port's (TLS with
//! the same certificate when `KOO_TLS_*` is set, bounded handshakes, the
//! idle timeout), and the listener closes with the gRPC one.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected as _;

use super::metrics::Exporter;
use crate::transport::conn::Conn;
use crate::transport::listener;
use crate::transport::tls::Tls;

/// The OpenMetrics text format, which Prometheus negotiates.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every HTTP route.
fn router(exporter: Arc<Exporter>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(exporter)
}

async fn metrics(State(exporter): State<Arc<Exporter>>) -> impl IntoResponse {
    ([(CONTENT_TYPE, OPENMETRICS)], exporter.scrape().await)
}

/// Serves HTTP on `listener` until `stop`, then lets requests under way
/// finish.
pub(super) fn serve_http(
    listener: TcpListener,
    tls: Option<Tls>,
    limits: &crate::app::Limits,
    exporter: Arc<Exporter>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    tracing::info!(%addr, tls = tls.is_some(), "koo serving HTTP");
    let local = listener.local_addr().ok();
    let conns = Conns {
        incoming: listener::incoming(
            listener,
            tls,
            limits.idle_connection_timeout,
            listener::HANDSHAKE_TIMEOUT,
        ),
        local,
    };
    tokio::spawn(async move {
        let served = axum::serve(conns, router(exporter))
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the HTTP listener failed");
        }
    })
}

/// The accept loop's connections, as axum takes them.
struct Conns {
    incoming: ReceiverStream<Result<Conn, std::io::Error>>,
    local: Option<SocketAddr>,
}

impl axum::serve::Listener for Conns {
    type Io = Conn;
    type Addr = Option<SocketAddr>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.connect_info().tcp.remote_addr();
                    return (conn, peer);
                }
                // a failed handshake: the accept loop already said why
                Some(Err(_)) => continue,
                // the accept loop ended: nothing more comes
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
