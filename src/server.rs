//! The koo server: builds the store, the cache and the tonic router, runs the
//! background loops, and shuts everything down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;

use crate::auth::gate::Gate;
use crate::auth::keys::Keys;
use crate::auth::layer::AuthLayer;
use crate::auth::{AuthSettings, Keyring, KeysError};
use crate::cache::{Cache, CacheConfig};
use crate::domain::task::QueueName;
use crate::grpc::cache::CacheApi;
use crate::grpc::health::HealthApi;
use crate::grpc::schedule::ScheduleApi;
use crate::grpc::shed::ShedLayer;
use crate::grpc::tasks::TaskApi;
use crate::grpc::worker::WorkerApi;
use crate::health::{self, HealthPublisher};
use crate::pb::cache::v1::cache_service_server::CacheServiceServer;
use crate::pb::schedule::v1::schedule_service_server::ScheduleServiceServer;
use crate::pb::tasks::v1::task_service_server::TaskServiceServer;
use crate::pb::worker::v1::worker_service_server::WorkerServiceServer;
use crate::persist::{DataSettings, Embedded, EmbeddedParts, PersistError};
use crate::schedule::Schedules;
use crate::store::redis::redact;
use crate::store::schedules::ScheduleStore;
use crate::store::tasks::TaskStore;
use crate::store::{
    MemoryConfig, MemoryReport, MemoryStore, RedisConfig, RedisStore, Store, StoreError,
};
use crate::tasks::engine::{TaskConfig, TaskEngine};
use crate::tasks::worker::{Registry, WorkerPool};
use crate::tasks::{handlers, maintenance};
use crate::transport::calls::PeerLayer;
use crate::transport::tls::Tls;
use crate::transport::{exposure, listener};
use crate::watch::{Hub, Watchers};

/// Which backend to use.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreSettings {
    /// The embedded store.
    Memory(MemoryConfig),
    /// Redis.
    Redis(RedisConfig),
}

/// The task engine's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSettings {
    /// The Redis holding tasks (`None`: no task engine).
    pub redis: Option<RedisConfig>,
    /// The engine.
    pub config: TaskConfig,
    /// Built-in worker slots in this process.
    pub workers: usize,
    /// `KOO_DIAGNOSTICS_LEDGER`: where `koo.diagnostics.ledger` records its
    /// executions (`None`: that handler is not registered).
    pub ledger: Option<std::path::PathBuf>,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            redis: None,
            config: TaskConfig::default(),
            workers: 4,
            ledger: None,
        }
    }
}

/// Everything `koo serve` needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where to listen (used by the binary; [`run`] takes a bound listener).
    pub listen: SocketAddr,
    /// The backend.
    pub store: StoreSettings,
    /// The cache.
    pub cache: CacheConfig,
    /// The task engine.
    pub tasks: TaskSettings,
    /// How often the backend is probed for gRPC health.
    pub health_check_interval: Duration,
    /// How often the embedded store purges expired entries.
    pub memory_sweep_interval: Duration,
    /// Where the embedded store is kept across restarts.
    pub data: DataSettings,
    /// Deadline of a call without one.
    pub request_timeout: Duration,
    /// Deadline of a bulk call without one.
    pub bulk_timeout: Duration,
    /// Watchers, buffers and streams per connection.
    pub limits: crate::config::Limits,
    /// Time in-flight calls get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Time between reporting NOT_SERVING and closing the listener.
    pub shutdown_drain: Duration,
    /// The shared secret external workers must present, if any.
    pub worker_token: Option<String>,
    /// Keys file and reflection.
    pub auth: AuthSettings,
    /// The scheduler.
    pub schedule: ScheduleSettings,
    /// TLS on the gRPC listener (`None`: plaintext).
    pub tls: Option<crate::transport::tls::TlsSettings>,
    /// `KOO_HEALTH_LISTEN`: a plaintext listener serving grpc.health.v1 alone.
    pub health_listen: Option<SocketAddr>,
}

impl Settings {
    /// Whether callers must prove who they are: a keys file, or client
    /// certificates (mTLS without a keys file trusts every verified one).
    pub fn authenticates(&self) -> bool {
        self.auth.file.is_some() || self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }
}

/// The scheduler's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleSettings {
    /// Whether this process runs the scheduler.
    pub enabled: bool,
    /// The configuration's default schedules.
    pub defaults: Vec<crate::schedule::defaults::Default>,
    /// How often changes made elsewhere are looked for.
    pub reload_interval: Duration,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            defaults: crate::schedule::defaults::from_config(
                ["*/10 * * * *", "*/30 * * * *", "0 * * * *", "*/5 * * * *"],
                "UTC",
            )
            .expect("valid defaults"),
            reload_interval: Duration::from_secs(1),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            store: StoreSettings::Memory(MemoryConfig::default()),
            cache: CacheConfig::default(),
            tasks: TaskSettings::default(),
            health_check_interval: Duration::from_secs(30),
            memory_sweep_interval: Duration::from_secs(1),
            data: DataSettings::default(),
            request_timeout: Duration::from_secs(5),
            bulk_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            shutdown_drain: Duration::from_millis(500),
            worker_token: None,
            auth: AuthSettings::default(),
            schedule: ScheduleSettings::default(),
            limits: crate::config::Limits::default(),
            tls: None,
            health_listen: None,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
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
    #[error("KOO_TLS_*: {0}")]
    Tls(#[from] crate::transport::tls::TlsError),
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
    let keyring = match &settings.auth.file {
        Some(path) => Some(Keyring::new(Keys::load(
            path,
            settings.worker_token.as_deref(),
        )?)),
        None => None,
    };
    // Loaded (and its data directory locked) before anything serves.
    let embedded = Embedded::open(
        EmbeddedParts {
            cache: match &settings.store {
                StoreSettings::Memory(c) => Some(c.clone()),
                StoreSettings::Redis(_) => None,
            },
            cache_prefix: settings.cache.prefix.clone(),
            tasks: settings
                .tasks
                .redis
                .is_none()
                .then_some(settings.tasks.config.limits),
        },
        &settings.data,
    )?;
    let store = match &settings.store {
        StoreSettings::Memory(config) => {
            tracing::info!(
                capacity_bytes = config.max_bytes,
                kept = embedded.is_kept(),
                "using the embedded in-process store (set REDIS_URL to use Redis): not shared between koo instances, kept across restarts only with KOO_DATA_DIR"
            );
            Store::from(
                embedded
                    .cache
                    .clone()
                    .unwrap_or_else(|| MemoryStore::new(config.clone())),
            )
        }
        StoreSettings::Redis(config) => {
            tracing::info!(url = %redact(&config.url), connections = config.max_connections, "using Redis");
            Store::from(RedisStore::connect(config)?)
        }
    };
    let cache = Cache::new(store.clone(), settings.cache.clone());
    let stop = CancellationToken::new();

    let cache_name = <CacheServiceServer<CacheApi> as NamedService>::NAME;
    let task_name = <TaskServiceServer<TaskApi> as NamedService>::NAME;
    // NOT_SERVING until the first probe says otherwise. TaskService follows
    // the cache's store when its tasks live there (the usual case: one Redis,
    // or both embedded), else a monitor of its own (see `start_tasks`).
    let tasks_share_store = matches!(
        (&settings.store, &settings.tasks.redis),
        (StoreSettings::Redis(c), Some(t)) if c.url == t.url
    ) || matches!(
        (&settings.store, &settings.tasks.redis),
        (StoreSettings::Memory(_), None)
    );
    let publisher = HealthPublisher::new(vec![cache_name, task_name]);
    let health_service = HealthServer::new(HealthApi::new(publisher.subscribe(), stop.clone()))
        .max_decoding_message_size(settings.limits.max_message_size)
        .max_encoding_message_size(settings.limits.max_message_size);

    let mut background = tokio::task::JoinSet::new();
    let cache_services = if tasks_share_store {
        vec![cache_name, task_name]
    } else {
        vec![cache_name]
    };
    background.spawn(health::monitor(
        store.clone(),
        publisher.clone(),
        cache_services,
        settings.health_check_interval,
        stop.clone(),
    ));
    background.spawn(cache.clone().run_metrics_publisher(stop.clone()));
    if let Some(memory) = store.as_memory() {
        background.spawn(sweep_expired(
            memory.clone(),
            settings.memory_sweep_interval,
            stop.clone(),
        ));
    }

    if embedded.is_kept() {
        background.spawn(
            embedded
                .clone()
                .run_snapshots(settings.data.snapshot_interval, stop.clone()),
        );
    }

    if let (Some(ring), Some(path)) = (&keyring, &settings.auth.file) {
        background.spawn(ring.clone().watch(
            path.clone(),
            settings.worker_token.clone(),
            settings.auth.reload_interval,
            stop.clone(),
        ));
    }
    let gate = Gate::new(
        keyring,
        settings.worker_token.as_deref(),
        settings.auth.reflection,
    );
    let tasks = start_tasks(&settings, &store, &embedded, &cache, &mut background, &stop)?;
    if !tasks_share_store {
        watch_task_store(&settings, &tasks.0, &publisher, &mut background, &stop);
    }
    let worker_engine = tasks.0.clone();
    // External workers' sessions: on shutdown, each hands its tasks back
    // before koo exits.
    let sessions = tokio_util::task::TaskTracker::new();
    let schedules = start_scheduler(&settings, &tasks.0, &embedded, &mut background, &stop);

    let limit = settings.cache.message_limit();
    let task_cache = cache.clone();
    let api = CacheApi::new(
        cache,
        tasks.clone(),
        settings.cache.max_value_size,
        settings.request_timeout,
        settings.bulk_timeout,
        stop.clone(),
    );
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

    let addr = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let tls = settings.tls.clone().map(Tls::load).transpose()?;
    if let Some(tls) = &tls {
        tls.spawn_reloads(&mut background, &stop);
    }
    let listen = listener.local_addr().unwrap_or(settings.listen);
    exposure::warn_if_exposed(listen, tls.is_some(), settings.authenticates());
    let incoming = listener::incoming(
        listener,
        tls.clone(),
        settings.limits.idle_connection_timeout,
        listener::HANDSHAKE_TIMEOUT,
    );
    let health_listener = match settings.health_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::HealthListen { addr, source })?,
        ),
        None => None,
    };
    let signalled = Arc::new(Notify::new());
    let drain = settings.shutdown_drain;
    // The health listener closes with the main one, after the drain, so that
    // probes read NOT_SERVING first.
    let health_stop = CancellationToken::new();
    let on_shutdown = {
        let signalled = signalled.clone();
        let health_stop = health_stop.clone();
        let stop = stop.clone();
        let publisher = publisher.clone();
        async move {
            shutdown.await;
            // NOT_SERVING and the end of every stream come first; the listener
            // closes `drain` later, so that load balancers stop routing here
            // and stream clients read their final frames before connections
            // close.
            tracing::info!(
                ?drain,
                "shutting down: not serving, ending streams, then draining"
            );
            publisher.set(false);
            stop.cancel();
            tokio::time::sleep(drain).await;
            health_stop.cancel();
            signalled.notify_one();
        }
    };
    tracing::info!(%addr, tls = tls.is_some(), mtls = tls.as_ref().is_some_and(Tls::mutual), "koo serving gRPC");
    let health_serve = health_listener.map(|l| {
        serve_health_only(
            l,
            health_service.clone(),
            &settings.limits,
            health_stop.clone(),
        )
    });
    // What a client sends is bounded by KOO_MAX_MESSAGE_SIZE; TaskService's
    // and WorkerService's replies carry task results accepted under that
    // bound (a GetTask adds the task around one, a list page holds many),
    // so they are not cut at it.
    let size = settings.limits.max_message_size;
    let replies = usize::MAX;
    let serve = transport_builder(&settings.limits)
        .layer(PeerLayer)
        // authentication first, so that refused calls take no in-flight slot
        .layer(AuthLayer::new(gate))
        .layer(ShedLayer::new(settings.limits.max_inflight_calls))
        .add_service(
            CacheServiceServer::new(api)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(
            TaskServiceServer::new(TaskApi::new(
                tasks,
                task_cache.clone(),
                settings.request_timeout,
                settings.limits.watch_buffer,
                stop.clone(),
            ))
            .max_decoding_message_size(size)
            .max_encoding_message_size(replies),
        )
        .add_service(
            ScheduleServiceServer::new(ScheduleApi::new(schedules, settings.request_timeout))
                .max_decoding_message_size(size)
                .max_encoding_message_size(size),
        )
        .add_service(
            WorkerServiceServer::new(
                WorkerApi::new(
                    worker_engine,
                    task_cache,
                    settings.request_timeout,
                    stop.clone(),
                    sessions.clone(),
                )
                .max_held_per_worker(settings.limits.max_held_per_worker),
            )
            .max_decoding_message_size(size)
            .max_encoding_message_size(replies),
        )
        .add_service(health_service)
        .add_optional_service(reflection_v1.map(|r| {
            r.max_decoding_message_size(size)
                .max_encoding_message_size(size)
        }))
        .add_optional_service(reflection_v1alpha.map(|r| {
            r.max_decoding_message_size(size)
                .max_encoding_message_size(size)
        }))
        .serve_with_incoming_shutdown(incoming, on_shutdown);
    tokio::pin!(serve);
    let grace = settings.shutdown_grace;
    let result = tokio::select! {
        result = &mut serve => result.map_err(ServerError::from),
        () = async { signalled.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight calls did not finish within the shutdown grace; stopping anyway");
            Ok(())
        }
    };
    stop.cancel();
    health_stop.cancel();
    if let Some(health) = health_serve {
        let _ = tokio::time::timeout(grace, health).await;
    }
    // Worker slots finish their current task; past the grace period a task
    // still running is left to its lease, and another worker takes it over.
    sessions.close();
    let drained = tokio::time::timeout(grace, async {
        while background.join_next().await.is_some() {}
        sessions.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            "background work did not stop within the shutdown grace; running tasks go back to their queues when their leases lapse"
        );
    }
    // Workers have stopped (or are abandoned now) and the server has
    // drained: what the embedded store holds is final.
    drop(background);
    match tokio::task::spawn_blocking(move || embedded.shutdown()).await {
        Ok(saved) => saved?,
        Err(e) => tracing::error!(error = %e, "saving the embedded store failed"),
    }
    tracing::info!("koo stopped");
    result
}

/// The HTTP/2 settings both listeners share: keepalive, streams per
/// connection, connection age.
fn transport_builder(limits: &crate::config::Limits) -> tonic::transport::Server {
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
fn serve_health_only(
    listener: TcpListener,
    health: HealthServer<HealthApi>,
    limits: &crate::config::Limits,
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

/// Starts the task engine (on the task Redis, or embedded when there is
/// none): recovery of lapsed leases on every queue, and the built-in worker
/// pool.
fn start_tasks(
    settings: &Settings,
    store: &Store,
    embedded: &Embedded,
    cache: &Cache,
    background: &mut tokio::task::JoinSet<()>,
    stop: &CancellationToken,
) -> Result<(TaskEngine, Hub), ServerError> {
    let prefix = &settings.tasks.config.prefix;
    // Watchers read through connections of their own (see `crate::watch`).
    let (tasks, watch_store) = match &settings.tasks.redis {
        None => {
            tracing::info!(
                kept = embedded.is_kept(),
                "tasks live in this process (set REDIS_URL to use Redis): not shared with other koo processes, kept across restarts only with KOO_DATA_DIR"
            );
            let tasks = TaskStore::from_memory(embedded.tasks.clone().unwrap_or_default());
            (tasks.clone(), tasks)
        }
        Some(config) => {
            // Share the cache's pool when tasks live on the same Redis.
            let redis = match (store.as_redis(), &settings.store) {
                (Some(r), StoreSettings::Redis(c)) if c.url == config.url => r.clone(),
                _ => RedisStore::connect(config)?,
            };
            background.spawn(warn_if_tasks_can_be_evicted(redis.clone()));
            let watch = RedisStore::connect(&RedisConfig {
                max_connections: 1,
                ..config.clone()
            })?;
            (
                TaskStore::redis(redis, prefix),
                TaskStore::redis(watch, prefix),
            )
        }
    };
    let engine = TaskEngine::new(tasks.clone(), settings.tasks.config.clone());
    let queues: Vec<QueueName> = settings.tasks.config.queues();
    background.spawn(engine.clone().run_recovery(queues.clone(), stop.clone()));
    if settings.tasks.workers > 0 {
        let mut registry = Registry::default();
        handlers::register_diagnostics(&mut registry);
        if let Some(path) = &settings.tasks.ledger {
            handlers::register_ledger(&mut registry, path.clone());
        }
        handlers::register_health_check(&mut registry, engine.clone());
        maintenance::register_cache(&mut registry, cache.clone(), engine.clone());
        registry.set_cache(cache.clone());
        maintenance::register_database(&mut registry, engine.clone());
        let pool = WorkerPool::new(engine.clone(), registry, queues, settings.tasks.workers);
        tracing::info!(
            worker = pool.id(),
            slots = settings.tasks.workers,
            "built-in workers running"
        );
        background.spawn(pool.run(stop.clone()));
    }
    let hub = Hub::new(
        TaskEngine::new(watch_store, settings.tasks.config.clone()),
        Watchers::new(settings.limits.max_watchers),
        settings.limits.watch_buffer,
        stop.clone(),
    );
    Ok((engine, hub))
}

/// TaskService's health when its tasks do not live in the cache's store:
/// a monitor of the task Redis, or serving for embedded tasks.
fn watch_task_store(
    settings: &Settings,
    engine: &TaskEngine,
    publisher: &HealthPublisher,
    background: &mut tokio::task::JoinSet<()>,
    stop: &CancellationToken,
) {
    let task_name = <TaskServiceServer<TaskApi> as NamedService>::NAME;
    match engine.store().redis_parts() {
        Some((store, _)) => {
            background.spawn(health::monitor(
                Store::from(store.clone()),
                publisher.clone(),
                vec![task_name],
                settings.health_check_interval,
                stop.clone(),
            ));
        }
        None => publisher.set_services(&[task_name], true),
    }
}

/// The schedules, kept with the tasks; the scheduler runs here unless
/// switched off.
fn start_scheduler(
    settings: &Settings,
    engine: &TaskEngine,
    embedded: &Embedded,
    background: &mut tokio::task::JoinSet<()>,
    stop: &CancellationToken,
) -> Schedules {
    let store = match engine.store().redis_parts() {
        Some((store, prefix)) => ScheduleStore::redis(store.clone(), prefix),
        None => embedded
            .schedules
            .clone()
            .unwrap_or_else(ScheduleStore::memory),
    };
    let schedules = Schedules::new(store, engine.clone());
    if settings.schedule.enabled {
        background.spawn(crate::schedule::run(
            schedules.clone(),
            settings.schedule.defaults.clone(),
            settings.schedule.reload_interval,
            stop.clone(),
        ));
    } else {
        tracing::info!("scheduler off in this process (--no-scheduler)");
    }
    schedules
}

/// A task Redis must never evict: warn when its policy could.
pub async fn warn_if_tasks_can_be_evicted(redis: RedisStore) {
    let store = Store::from(redis);
    for _ in 0..30 {
        match store
            .memory(crate::store::Deadline::after(Duration::from_secs(2)))
            .await
        {
            Ok(MemoryReport {
                unavailable: Some(why),
                ..
            }) => {
                tracing::info!(reason = %why, "cannot check that the Redis holding tasks has maxmemory-policy noeviction (any other policy may evict task keys and lose tasks)");
                return;
            }
            Ok(m) if m.policy != "noeviction" => {
                tracing::warn!(policy = %m.policy, "the Redis holding tasks has a maxmemory-policy other than noeviction: it may evict task keys when full and lose tasks");
                return;
            }
            Ok(_) => return,
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

async fn sweep_expired(store: MemoryStore, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let purged = store.purge_expired();
                if purged > 0 {
                    tracing::debug!(purged, "purged expired entries");
                }
            }
        }
    }
}
