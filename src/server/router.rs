//! The tonic routes: koo's services with their message bounds, health and
//! reflection; the layers every call passes (metrics, span, peer,
//! authentication, load shedding), shared by both listeners; the gRPC
//! listener (gRPC and grpc-web); and the plaintext health-only listener.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::{Routes, RoutesBuilder};
use tonic_health::pb::health_server::HealthServer;
use tonic_web::GrpcWebLayer;
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower::util::option_layer;

use super::{ServerError, Settings};
use crate::app::Serve;
use crate::auth::gate::Gate;
use crate::auth::layer::AuthLayer;
use crate::grpc::auth::AuthApi;
use crate::grpc::cache::CacheApi;
use crate::grpc::health::HealthApi;
use crate::grpc::metrics::{GrpcMetrics, MetricsLayer};
use crate::grpc::schedule::ScheduleApi;
use crate::grpc::shed::ShedLayer;
use crate::grpc::span::SpanLayer;
use crate::grpc::tasks::TaskApi;
use crate::grpc::worker::WorkerApi;
use crate::pb::auth::v1::auth_service_server::AuthServiceServer;
use crate::pb::cache::v1::cache_service_server::CacheServiceServer;
use crate::pb::schedule::v1::schedule_service_server::ScheduleServiceServer;
use crate::pb::tasks::v1::task_service_server::TaskServiceServer;
use crate::pb::worker::v1::worker_service_server::WorkerServiceServer;
use crate::transport::calls::PeerLayer;
use crate::transport::conn::Conn;
use crate::transport::listener;
use crate::transport::site::{SiteGuard, SiteLayer};

/// The layers every call passes, outermost first: counted (refused calls
/// included), one span (debug level), the peer, authentication (first, so
/// that refused calls take no in-flight slot), load shedding.
pub(super) type CallLayers = Stack<
    ShedLayer,
    Stack<AuthLayer, Stack<PeerLayer, Stack<SpanLayer, Stack<MetricsLayer, Identity>>>>,
>;

/// See [`CallLayers`]: one definition for the gRPC listener and for the
/// grpc-web and REST calls of the HTTP listener, so that no way in can skip
/// a layer.
pub(super) fn call_layers(
    gate: Gate,
    metrics: GrpcMetrics,
    max_inflight: usize,
) -> ServiceBuilder<CallLayers> {
    ServiceBuilder::new()
        .layer(MetricsLayer::new(metrics))
        .layer(SpanLayer)
        .layer(PeerLayer)
        .layer(AuthLayer::new(gate))
        .layer(ShedLayer::new(max_inflight))
}

/// koo's services with their message bounds, health and (unless the gate
/// forbids it) reflection, as tonic routes: what both listeners serve.
pub(super) fn routes(
    app: &Serve,
    settings: &Settings,
    gate: &Gate,
    health: HealthServer<HealthApi>,
) -> Result<Routes, ServerError> {
    let size = settings.limits.max_message_size;
    // google.rpc types are registered so that grpcurl can print error details.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let mut routes = RoutesBuilder::default();
    routes
        .add_service(cache_service(app, settings))
        .add_service(task_service(app, settings))
        .add_service(
            ScheduleServiceServer::new(ScheduleApi::new(
                app.schedules.clone(),
                settings.request_timeout,
            ))
            .max_decoding_message_size(size)
            // a page of schedules, each accepted under the bound
            .max_encoding_message_size(usize::MAX),
        )
        .add_service(worker_service(app, settings))
        .add_service(AuthServiceServer::new(AuthApi::new(
            settings.authenticates(),
        )))
        .add_service(health);
    if gate.serves_reflection() {
        routes
            .add_service(
                reflection()
                    .build_v1()?
                    .max_decoding_message_size(size)
                    // koo's own descriptors (about 60 KB for a service),
                    // whatever a small KOO_MAX_MESSAGE_SIZE says
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(
                reflection()
                    .build_v1alpha()?
                    .max_decoding_message_size(size)
                    .max_encoding_message_size(usize::MAX),
            );
    }
    Ok(routes.routes())
}

/// Serves `routes` on `incoming` until `signal` resolves (tonic then stops
/// accepting and waits for in-flight calls): gRPC, and grpc-web from
/// browsers (HTTP/1.1 is accepted for it; tonic-web answers a plain
/// HTTP/1.1 request that is not grpc-web with 400), with CORS as
/// `KOO_CORS_ORIGINS` says, and browsers' requests for other sites refused
/// ([`crate::transport::site`]).
pub(super) fn serve(
    settings: &Settings,
    (routes, layers): (Routes, ServiceBuilder<CallLayers>),
    incoming: ReceiverStream<Result<Conn, std::io::Error>>,
    signal: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = Result<(), tonic::transport::Error>> {
    let site = SiteGuard::new(
        settings.listen,
        settings.allowed_hosts.clone(),
        settings.cors_origins.clone(),
    );
    transport_builder(&settings.limits)
        .accept_http1(true)
        // a preflight is answered before anything else: it has no credentials
        .layer(option_layer(settings.cors_origins.layer()))
        // then what a browser sends for another site is refused
        .layer(SiteLayer(site))
        // grpc-web becomes gRPC before the call's layers see it
        .layer(GrpcWebLayer::new())
        .layer(layers.into_inner())
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal)
}

/// What a client sends is bounded by the cache's message limit.
fn cache_service(app: &Serve, settings: &Settings) -> CacheServiceServer<CacheApi> {
    let limit = settings.cache.message_limit();
    let api = CacheApi::new(
        app.cache.clone(),
        (app.engine.clone(), app.hub.clone()),
        settings.cache.max_value_size,
        settings.request_timeout,
        settings.bulk_timeout,
        app.stop.clone(),
    );
    CacheServiceServer::new(api)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
}

// What a client sends is bounded by KOO_MAX_MESSAGE_SIZE; TaskService's and
// WorkerService's replies carry task results accepted under that bound (a
// GetTask adds the task around one, a list page holds many), so they are
// not cut at it.

fn task_service(app: &Serve, settings: &Settings) -> TaskServiceServer<TaskApi> {
    TaskServiceServer::new(TaskApi::new(
        (app.engine.clone(), app.hub.clone()),
        app.cache.clone(),
        settings.request_timeout,
        settings.limits.watch_buffer,
        app.stop.clone(),
    ))
    .max_decoding_message_size(settings.limits.max_message_size)
    .max_encoding_message_size(usize::MAX)
}

fn worker_service(app: &Serve, settings: &Settings) -> WorkerServiceServer<WorkerApi> {
    let api = WorkerApi::new(
        app.engine.clone(),
        app.cache.clone(),
        settings.request_timeout,
        app.stop.clone(),
        app.sessions.clone(),
    )
    .max_held_per_worker(settings.limits.max_held_per_worker)
    .max_message_size(settings.limits.max_message_size);
    WorkerServiceServer::new(api)
        .max_decoding_message_size(settings.limits.max_message_size)
        .max_encoding_message_size(usize::MAX)
}

/// The HTTP/2 settings both listeners share: keepalive, streams per
/// connection, connection age.
pub(super) fn transport_builder(limits: &crate::app::Limits) -> tonic::transport::Server {
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(limits.http2_keepalive_interval)
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .max_concurrent_streams(Some(limits.max_concurrent_streams));
    if let Some(age) = limits.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    if let Some(grace) = limits.max_connection_age_grace {
        builder = builder.max_connection_age_grace(grace);
    }
    builder
}

/// `KOO_HEALTH_LISTEN`: grpc.health.v1 alone, in plaintext, from the same
/// publisher as the main listener, until `stop` (the main listener's close,
/// after the drain, so that probes read NOT_SERVING first).
pub(super) fn serve_health_only(
    listener: TcpListener,
    health: HealthServer<HealthApi>,
    limits: &crate::app::Limits,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    tracing::info!(
        %addr,
        "serving grpc.health.v1 in plaintext (KOO_HEALTH_LISTEN)"
    );
    let serve = transport_builder(limits)
        .add_service(health)
        .serve_with_incoming_shutdown(
            listener::incoming(
                listener,
                None,
                limits.idle_connection_timeout,
                listener::HANDSHAKE_TIMEOUT,
                limits.max_connections,
            ),
            async move { stop.cancelled().await },
        );
    tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the health listener failed");
        }
    })
}

/// Every service behind [`CallLayers`], as one tower service.
pub(super) type Calls = <CallLayers as tower::Layer<Routes>>::Service;
