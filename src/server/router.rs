//! The tonic router: koo's services with their message bounds, health and
//! reflection, behind the span, peer, authentication and load-shedding
//! layers;
//! and the plaintext health-only listener.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_server::HealthServer;

use super::{ServerError, Settings};
use crate::app::Serve;
use crate::auth::gate::Gate;
use crate::auth::layer::AuthLayer;
use crate::grpc::cache::CacheApi;
use crate::grpc::health::HealthApi;
use crate::grpc::metrics::{GrpcMetrics, MetricsLayer};
use crate::grpc::schedule::ScheduleApi;
use crate::grpc::shed::ShedLayer;
use crate::grpc::span::SpanLayer;
use crate::grpc::tasks::TaskApi;
use crate::grpc::worker::WorkerApi;
use crate::pb::cache::v1::cache_service_server::CacheServiceServer;
use crate::pb::schedule::v1::schedule_service_server::ScheduleServiceServer;
use crate::pb::tasks::v1::task_service_server::TaskServiceServer;
use crate::pb::worker::v1::worker_service_server::WorkerServiceServer;
use crate::transport::calls::PeerLayer;
use crate::transport::conn::Conn;
use crate::transport::listener;

/// Serves every service on `incoming` until `signal` resolves (tonic then
/// stops accepting and waits for in-flight calls).
pub(super) fn serve(
    app: &Serve,
    settings: &Settings,
    (gate, metrics, shed): (Gate, GrpcMetrics, ShedLayer),
    health: HealthServer<HealthApi>,
    incoming: ReceiverStream<Result<Conn, std::io::Error>>,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = Result<(), tonic::transport::Error>>, ServerError> {
    let size = settings.limits.max_message_size;
    // google.rpc types are registered so that grpcurl can print error details.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = if gate.serves_reflection() {
        (
            Some(reflection().build_v1()?),
            Some(reflection().build_v1alpha()?),
        )
    } else {
        (None, None)
    };
    Ok(transport_builder(&settings.limits)
        // outermost: counted and one span per call (debug level), refused
        // calls included
        .layer(MetricsLayer::new(metrics))
        .layer(SpanLayer)
        .layer(PeerLayer)
        // authentication first, so that refused calls take no in-flight slot
        .layer(AuthLayer::new(gate))
        .layer(shed)
        .add_service(cache_service(app, settings))
        .add_service(task_service(app, settings))
        .add_service(
            ScheduleServiceServer::new(ScheduleApi::new(
                app.schedules.clone(),
                settings.request_timeout,
            ))
            .max_decoding_message_size(size)
            .max_encoding_message_size(size),
        )
        .add_service(worker_service(app, settings))
        .add_service(health)
        .add_optional_service(reflection_v1.map(|r| {
            r.max_decoding_message_size(size)
                .max_encoding_message_size(size)
        }))
        .add_optional_service(reflection_v1alpha.map(|r| {
            r.max_decoding_message_size(size)
                .max_encoding_message_size(size)
        }))
        .serve_with_incoming_shutdown(incoming, signal))
}

/// What a client sends is bounded by the cache's message limit.
pub(super) fn cache_service(app: &Serve, settings: &Settings) -> CacheServiceServer<CacheApi> {
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

pub(super) fn task_service(app: &Serve, settings: &Settings) -> TaskServiceServer<TaskApi> {
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
            ),
            async move { stop.cancelled().await },
        );
    tokio::spawn(async move {
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "the health listener failed");
        }
    })
}
