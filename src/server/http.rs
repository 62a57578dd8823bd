//! The HTTP listener (`KOO_HTTP_LISTEN`): an axum router (axum 0.8 is
//! already in the tree through tonic) serving `/metrics`, and every
//! service over grpc-web (and gRPC) through the same call layers as the
//! gRPC listener's (metrics, span, peer, authentication, load shedding),
//! and the seed's REST paths ([`super::rest`]), whose calls pass the same
//! layers; and the web dashboard ([`super::dashboard`]) at `/`.
//!
//! Connections come from the same accept loop as the gRPC port's (TLS with
//! the same certificate when `KOO_TLS_*` is set, bounded handshakes, the
//! idle timeout), and the listener closes with the gRPC one. Requests pass
//! the same [`Gate`] as calls: `/metrics` needs what `GetMetrics` needs
//! (any reader key when keys are configured; a client certificate a
//! principal names under mTLS).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected as _;

use tonic_web::GrpcWebLayer;
use tower::{Layer as _, ServiceExt as _};

use super::metrics::Exporter;
use super::router::Calls;
use crate::auth::AuthError;
use crate::auth::gate::Gate;
use crate::transport::conn::ConnInfo;
use crate::transport::cors::CorsOrigins;
use crate::transport::listener;
use crate::transport::site::{AllowedHosts, SiteGuard, SiteLayer};
use crate::transport::tls::Tls;

/// The OpenMetrics text format, which Prometheus negotiates.
pub(super) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The RPC whose access `/metrics` has: reading metrics.
const METRICS_ACCESS: &str = "/koo.cache.v1.CacheService/GetMetrics";

/// What the routes serve.
#[derive(Clone)]
pub(super) struct Routes {
    /// `/metrics`.
    pub exporter: Arc<Exporter>,
    /// Who may read `/metrics`.
    pub gate: Gate,
    /// Every service behind the call layers.
    pub calls: Calls,
    /// Whether the dashboard is served (`KOO_DASHBOARD`).
    pub dashboard: bool,
}

/// Every HTTP route; CORS (when `KOO_CORS_ORIGINS` allows other origins)
/// around all of them.
fn router(routes: Routes, cors: &CorsOrigins, site: SiteGuard, max_body: usize) -> Router {
    let rest = super::rest::router(
        rest_calls(routes.calls.clone()),
        max_body,
        routes.gate.clone(),
    );
    let pages = if routes.dashboard {
        super::dashboard::routes()
    } else {
        Router::new()
    };
    let router = Router::new()
        .route("/metrics", get(metrics))
        .merge(pages)
        .fallback(grpc)
        .with_state(routes)
        .merge(rest)
        // every route finds the connection where the gate and the peer
        // layer look for it, as on the gRPC port
        .layer(tower::util::MapRequestLayer::new(with_conn))
        // what a browser sends for another site is refused (after CORS
        // answered its preflight)
        .layer(SiteLayer(site));
    match cors.layer() {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// A gRPC or grpc-web call (tonic-web turns grpc-web into gRPC, then the
/// call layers and the services see a call like any other); anything else
/// that matched no route is not found.
async fn grpc(State(routes): State<Routes>, request: axum::extract::Request) -> Response {
    let grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    match GrpcWebLayer::new()
        .layer(routes.calls)
        .oneshot(request.map(tonic::body::Body::new))
        .await
    {
        Ok(response) => response.into_response(),
        Err(never) => match never {},
    }
}

/// The call layers as REST calls reach them, the reply's body as tonic's.
fn rest_calls(
    calls: Calls,
) -> impl tower::Service<
    http::Request<tonic::body::Body>,
    Response = http::Response<tonic::body::Body>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::ServiceBuilder::new()
        .map_response(|r: http::Response<_>| r.map(tonic::body::Body::new))
        .service(calls)
}

/// `request` with its connection's [`ConnInfo`] (its peer, with the
/// certificate's identity under mTLS; its open calls) in its extensions.
fn with_conn(mut request: axum::extract::Request) -> axum::extract::Request {
    if let Some(ConnectInfo(ConnOf(Some(conn)))) = request.extensions().get().cloned() {
        request.extensions_mut().insert::<ConnInfo>(conn);
    }
    request
}

async fn metrics(State(state): State<Routes>, request: axum::extract::Request) -> Response {
    let mut extensions = axum::http::Extensions::new();
    if let Some(info) = request.extensions().get::<ConnInfo>() {
        extensions.insert(info.peer.clone());
    }
    if let Err(e) = state
        .gate
        .admit(METRICS_ACCESS, request.headers(), &extensions)
    {
        return refusal(&e).into_response();
    }
    ([(CONTENT_TYPE, OPENMETRICS)], state.exporter.scrape().await).into_response()
}

/// A refused request: the HTTP status of the gRPC code the same refusal
/// gets on a call (401 without good credentials, 403 when the role or
/// scope does not reach), with the reason.
fn refusal(e: &AuthError) -> (StatusCode, String) {
    let code = tonic::Status::from(e.clone()).code();
    (super::rest::http_status(code), format!("{e}\n"))
}

/// The connection (its peer, with its certificate's identity under mTLS;
/// its open calls), for the gate and the call layers.
#[derive(Clone)]
struct ConnOf(Option<ConnInfo>);

/// Serves HTTP on `listener` until `stop`, then lets requests under way
/// finish.
pub(super) fn serve_http(
    listener: TcpListener,
    (tls, limits, cors, hosts): (
        Option<Tls>,
        &crate::app::Limits,
        &CorsOrigins,
        &AllowedHosts,
    ),
    routes: Routes,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let local = listener.local_addr();
    let addr = local
        .as_ref()
        .map_or_else(|_| "unknown".to_owned(), ToString::to_string);
    // (an address it cannot tell is taken for loopback: the stricter)
    let bound = local.unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let site = SiteGuard::new(bound, hosts.clone(), cors.clone());
    tracing::info!(%addr, tls = tls.is_some(), "koo serving HTTP");
    let incoming = listener::incoming(
        listener,
        tls.map(|t| t.for_http()),
        limits.idle_connection_timeout,
        listener::HANDSHAKE_TIMEOUT,
        limits.max_connections,
    );
    let app = router(routes, cors, site, limits.max_message_size);
    tokio::spawn(super::http_serve::serve(
        incoming,
        app,
        |conn| ConnOf(Some(conn.connect_info())),
        stop,
    ))
}
