//! The HTTP listener (`KOO_HTTP_LISTEN`): an axum router (axum 0.8 is
//! already in the tree through tonic) serving `/metrics` and the seed's REST
//! paths ([`super::rest`]); grpc-web and the dashboard are meant to be
//! routes added here.
//!
//! Connections come from the same accept loop as the gRPC port's (TLS with
//! the same certificate when `KOO_TLS_*` is set, bounded handshakes, the
//! idle timeout), and the listener closes with the gRPC one. Requests pass
//! the same [`Gate`] as calls: `/metrics` needs what `GetMetrics` needs
//! (any reader key when keys are configured; a client certificate a
//! principal names under mTLS).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::IncomingStream;
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected as _;

use super::metrics::Exporter;
use crate::auth::AuthError;
use crate::auth::gate::Gate;
use crate::auth::layer::AuthLayer;
use crate::grpc::metrics::{GrpcMetrics, MetricsLayer};
use crate::grpc::shed::ShedLayer;
use crate::grpc::span::SpanLayer;
use crate::transport::calls::PeerLayer;
use crate::transport::conn::{Conn, ConnInfo};
use crate::transport::listener;
use crate::transport::tls::Tls;

/// The OpenMetrics text format, which Prometheus negotiates.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The RPC whose access `/metrics` has: reading metrics.
const METRICS_ACCESS: &str = "/koo.cache.v1.CacheService/GetMetrics";

/// What every route reads.
#[derive(Clone)]
struct HttpState {
    exporter: Arc<Exporter>,
    gate: Gate,
}

/// Every HTTP route.
fn router(state: HttpState, rest: Router) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(rest)
}

/// koo's gRPC service as REST calls reach it: the cache and task services
/// (the two with REST paths) behind the same layers as the gRPC port's
/// (metrics, span, peer, auth, load shedding: the same figures, gate and
/// in-flight permits), so that a REST call is counted, authenticated and
/// shed as any call.
///
/// The one place to swap for the gRPC port's own stack once there is one.
pub(super) fn rest_calls(
    app: &crate::app::Serve,
    settings: &super::Settings,
    (gate, metrics, shed): (Gate, GrpcMetrics, ShedLayer),
) -> Router {
    let routes = tonic::service::Routes::new(super::router::cache_service(app, settings))
        .add_service(super::router::task_service(app, settings));
    let grpc = tower::ServiceBuilder::new()
        .map_response(|r: http::Response<_>| r.map(tonic::body::Body::new))
        .layer(MetricsLayer::new(metrics))
        .layer(SpanLayer)
        // the accept loop's connection (under mTLS, its identity) where
        // PeerLayer looks for it
        .map_request(|mut r: http::Request<tonic::body::Body>| {
            if let Some(ConnectInfo(PeerOf(Some(conn)))) = r.extensions().get().cloned() {
                r.extensions_mut().insert::<ConnInfo>(conn);
            }
            r
        })
        .layer(PeerLayer)
        .layer(AuthLayer::new(gate))
        .layer(shed)
        .service(routes);
    super::rest::router(grpc, settings.limits.max_message_size)
}

async fn metrics(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<PeerOf>,
    headers: HeaderMap,
) -> Response {
    let mut extensions = axum::http::Extensions::new();
    if let Some(conn) = peer.0 {
        extensions.insert(conn.peer);
    }
    if let Err(e) = state.gate.admit(METRICS_ACCESS, &headers, &extensions) {
        return refusal(&e).into_response();
    }
    ([(CONTENT_TYPE, OPENMETRICS)], state.exporter.scrape().await).into_response()
}

/// A refused request: 401 without (good) credentials, 403 with a key
/// whose role or scope does not reach, as gRPC's Unauthenticated and
/// PermissionDenied.
fn refusal(e: &AuthError) -> (StatusCode, String) {
    let status = match e {
        AuthError::NoCredentials { .. }
        | AuthError::Malformed
        | AuthError::UnknownKey
        | AuthError::UnknownPrincipal { .. } => StatusCode::UNAUTHORIZED,
        _ => StatusCode::FORBIDDEN,
    };
    (status, format!("{e}\n"))
}

/// The connection (its peer, with its certificate's identity under mTLS),
/// for the gate.
#[derive(Clone)]
struct PeerOf(Option<ConnInfo>);

impl Connected<IncomingStream<'_, Conns>> for PeerOf {
    fn connect_info(stream: IncomingStream<'_, Conns>) -> Self {
        use tonic::transport::server::Connected as _;
        Self(Some(stream.io().connect_info()))
    }
}

/// Serves HTTP on `listener` until `stop`, then lets requests under way
/// finish.
pub(super) fn serve_http(
    listener: TcpListener,
    tls: Option<Tls>,
    limits: &crate::app::Limits,
    (exporter, gate, rest): (Arc<Exporter>, Gate, Router),
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
            tls.map(|t| t.for_http()),
            limits.idle_connection_timeout,
            listener::HANDSHAKE_TIMEOUT,
        ),
        local,
    };
    tokio::spawn(async move {
        let app = router(HttpState { exporter, gate }, rest);
        let served = axum::serve(conns, app.into_make_service_with_connect_info::<PeerOf>())
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
