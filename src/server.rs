//! The koo server: the listener, the router and the shutdown order, on top
//! of what the composition root ([`crate::app::Serve`]) builds.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_server::HealthServer;

use crate::app::Serve;
use crate::auth::gate::Gate;
use crate::auth::keys::Keys;
use crate::auth::{Keyring, KeysError};
use crate::grpc::health::HealthApi;
use crate::grpc::metrics::GrpcMetrics;
use crate::health::HealthPublisher;
use crate::persist::PersistError;
use crate::store::StoreError;
use crate::transport::tls::Tls;
use crate::transport::{exposure, listener};

mod dashboard;
mod http;
mod http_serve;
mod metrics;
mod processes;
mod rest;
mod router;

pub use self::processes::{run_scheduler, run_worker};

// The settings `run` takes are the composition root's.
pub use crate::app::settings::{ScheduleSettings, Settings, StoreSettings, TaskSettings};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The stores, the engine or the loops could not be built.
    #[error(transparent)]
    App(#[from] crate::app::AppError),
    /// The backend configuration is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Serving failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The data directory cannot be used, or the embedded store not saved.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The keys file cannot be used.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// Reflection could not load koo's descriptors (a build problem).
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS certificate, key or client CA cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::transport::tls::TlsError),
    /// The HTTP listener's address cannot be bound.
    #[error("KOO_HTTP_LISTEN: cannot listen on {addr}: {source}")]
    HttpListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The health listener's address cannot be bound.
    #[error("KOO_HEALTH_LISTEN: cannot listen on {addr}: {source}")]
    HealthListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Serves koo on `listener` until `shutdown` resolves, then stops accepting,
/// reports NOT_SERVING, ends streams, and waits up to `shutdown_grace` for
/// in-flight calls.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    crate::transport::tls::install_default_provider();
    // A keys file that does not load stops koo before anything starts.
    let keyring = load_keys(&settings)?;
    let mut app = Serve::build(&settings)?;
    app.refuse_bad_databases(&settings).await?;
    app.apply_configured_limits(settings.tasks.flow_limits.clone())
        .await;
    let gate = gate(&settings, keyring, &mut app);
    let health = HealthServer::new(HealthApi::new(
        app.publisher.subscribe(),
        app.stop.clone(),
        settings.limits.max_health_watches,
    ))
    .max_decoding_message_size(settings.limits.max_message_size)
    .max_encoding_message_size(settings.limits.max_message_size);
    let addr = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let tls = settings.tls.clone().map(Tls::load).transpose()?;
    if let Some(tls) = &tls {
        tls.spawn_reloads(&mut app.background, &app.stop);
    }
    let listen = listener.local_addr().unwrap_or(settings.listen);
    let side = SideListeners::bind(&settings).await?;
    side.warn_if_exposed(listen, tls.is_some(), settings.authenticates());
    let incoming = listener::incoming(
        listener,
        tls.clone(),
        settings.limits.idle_connection_timeout,
        listener::HANDSHAKE_TIMEOUT,
        settings.limits.max_connections,
    );
    let grpc_metrics = GrpcMetrics::for_koo();
    let routes = router::routes(&app, &settings, &gate, health.clone())?;
    // one set of layers for both listeners: one in-flight bound, one set
    // of counters
    let layers = router::call_layers(
        gate.clone(),
        grpc_metrics.clone(),
        settings.limits.max_inflight_calls,
    );
    let stopping = Stopping::default();
    let on_shutdown = stopping.after(shutdown, settings.shutdown_drain, &app.stop, &app.publisher);
    let side = side.serve(
        &app,
        &settings,
        Sides {
            health,
            tls: tls.clone(),
            metrics: grpc_metrics.clone(),
            gate: gate.clone(),
            calls: layers.clone().service(routes.clone()),
        },
        &stopping.health,
    );
    // last: when this line shows, the side listeners have said theirs
    tracing::info!(%addr, tls = tls.is_some(), mtls = tls.as_ref().is_some_and(Tls::mutual), "koo serving gRPC");
    let serve = router::serve(&settings, (routes, layers), incoming, on_shutdown);
    let grace = settings.shutdown_grace;
    let result = stopping.within_grace(serve, grace).await;
    app.stop.cancel();
    stopping.health.cancel();
    // one deadline for all of them: a stop takes the grace once, not once
    // per listener
    let deadline = tokio::time::Instant::now() + grace;
    for listener in side {
        let _ = tokio::time::timeout_at(deadline, listener).await;
    }
    // Worker slots finish their current task; past the grace period a task
    // still running is left to its lease, and another worker takes it over.
    app.shut_down(grace).await?;
    tracing::info!("koo stopped");
    result
}

/// The keys file's keys, if one is set.
fn load_keys(settings: &Settings) -> Result<Option<Keyring>, ServerError> {
    Ok(match &settings.auth.file {
        Some(path) => {
            let keys = Keys::load(path, settings.worker_token.as_deref())?;
            keys.warn_if_empty(path);
            Some(Keyring::new(keys))
        }
        None => None,
    })
}

/// The auth gate of every listener; the keys file is watched for changes.
fn gate(settings: &Settings, keyring: Option<Keyring>, app: &mut Serve) -> Gate {
    if let (Some(ring), Some(path)) = (&keyring, &settings.auth.file) {
        app.background.spawn(ring.clone().watch(
            path.clone(),
            settings.worker_token.clone(),
            settings.auth.reload_interval,
            app.stop.clone(),
        ));
    }
    Gate::new(
        keyring,
        settings.worker_token.as_deref(),
        settings.auth.reflection,
    )
}

/// The listeners beside the gRPC one: `KOO_HEALTH_LISTEN`'s and
/// `KOO_HTTP_LISTEN`'s, bound before anything serves so that a bad address
/// stops koo with the setting's name.
struct SideListeners {
    health: Option<TcpListener>,
    http: Option<TcpListener>,
}

impl SideListeners {
    async fn bind(settings: &Settings) -> Result<Self, ServerError> {
        let health = match settings.health_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::HealthListen { addr, source })?,
            ),
            None => None,
        };
        let http = processes::bind(settings.http_listen).await?;
        Ok(Self { health, http })
    }

    /// The SECURITY warning for the gRPC listener at `listen` and for the
    /// HTTP one, whose REST and grpc-web routes reach every service too.
    fn warn_if_exposed(&self, listen: SocketAddr, tls: bool, auth: bool) {
        exposure::warn_if_exposed("KOO_LISTEN", listen, tls, auth);
        if let Some(http) = self.http.as_ref().and_then(|l| l.local_addr().ok()) {
            exposure::warn_if_exposed("KOO_HTTP_LISTEN", http, tls, auth);
        }
    }

    /// Serves both until `stop`; their tasks, to wait for.
    fn serve(
        self,
        app: &Serve,
        settings: &Settings,
        sides: Sides,
        stop: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut served = Vec::new();
        if let Some(l) = self.health {
            served.push(router::serve_health_only(
                l,
                sides.health,
                &settings.limits,
                stop.clone(),
            ));
        }
        if let Some(l) = self.http {
            let exporter = metrics::Exporter::new(
                sides.metrics,
                app.cache.clone(),
                app.engine.clone(),
                app.schedules.clone(),
            )
            .with_data_dir(app.embedded().clone());
            served.push(http::serve_http(
                l,
                (
                    sides.tls,
                    &settings.limits,
                    &settings.cors_origins,
                    &settings.allowed_hosts,
                ),
                http::Routes {
                    exporter: Arc::new(exporter),
                    gate: sides.gate,
                    calls: sides.calls,
                    dashboard: settings.dashboard,
                },
                stop.clone(),
            ));
        }
        served
    }
}

/// What the side listeners serve.
struct Sides {
    health: HealthServer<HealthApi>,
    tls: Option<Tls>,
    metrics: GrpcMetrics,
    gate: Gate,
    /// Every service behind the call layers: grpc-web (and REST) on the
    /// HTTP listener.
    calls: router::Calls,
}

/// The order of a stop: NOT_SERVING and the end of every stream first,
/// then, `drain` later, the listeners close, then in-flight calls get the
/// grace.
#[derive(Default)]
struct Stopping {
    /// Told once the listeners close, when the grace starts.
    signalled: Arc<Notify>,
    /// Closes the health and HTTP listeners with the main one, after the
    /// drain, so that probes read NOT_SERVING first.
    health: CancellationToken,
}

impl Stopping {
    /// The main listener's shutdown signal: `shutdown`, then NOT_SERVING
    /// and `stop` (streams end), then `drain`.
    fn after(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        drain: Duration,
        stop: &CancellationToken,
        publisher: &HealthPublisher,
    ) -> impl Future<Output = ()> + Send + 'static {
        let signalled = self.signalled.clone();
        let health = self.health.clone();
        let stop = stop.clone();
        let publisher = publisher.clone();
        async move {
            shutdown.await;
            // The listener closes `drain` after NOT_SERVING and the end of
            // every stream, so that load balancers stop routing here and
            // stream clients read their final frames before connections
            // close.
            tracing::info!(
                ?drain,
                "shutting down: not serving, ending streams, then draining"
            );
            publisher.set(false);
            stop.cancel();
            tokio::time::sleep(drain).await;
            health.cancel();
            signalled.notify_one();
        }
    }

    /// Runs `serve` to its end, or until `grace` after the listeners closed.
    async fn within_grace(
        &self,
        serve: impl Future<Output = Result<(), tonic::transport::Error>>,
        grace: Duration,
    ) -> Result<(), ServerError> {
        tokio::pin!(serve);
        tokio::select! {
            result = &mut serve => result.map_err(ServerError::from),
            () = async { self.signalled.notified().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "in-flight calls did not finish within the shutdown grace; stopping anyway");
                Ok(())
            }
        }
    }
}
