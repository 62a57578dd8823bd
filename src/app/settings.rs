//! What `koo serve` runs with: the backend, the cache, the task engine,
//! the scheduler, limits, authentication and the listeners (built from the
//! command line by [`crate::config`]; `crate::server` takes them).

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::AuthSettings;
use crate::cache::CacheConfig;
use crate::persist::DataSettings;
use crate::store::{MemoryConfig, RedisConfig};
use crate::tasks::engine::TaskConfig;

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
    /// `KOO_RATE_LIMITS` and `KOO_CONCURRENCY_LIMITS`, set at every start.
    pub flow_limits: Vec<crate::domain::flow::Limit>,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            redis: None,
            config: TaskConfig::default(),
            workers: 4,
            ledger: None,
            flow_limits: Vec::new(),
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
    pub limits: Limits,
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
    /// `KOO_HTTP_LISTEN`: the HTTP listener (`/metrics`); `None`: off.
    pub http_listen: Option<SocketAddr>,
    /// `KOO_CORS_ORIGINS`: pages on other origins that may call koo from a browser.
    pub cors_origins: crate::transport::cors::CorsOrigins,
    /// `KOO_ALLOWED_HOSTS`: names a loopback listener answers besides IP
    /// addresses and `localhost` (see [`crate::transport::site`]).
    pub allowed_hosts: crate::transport::site::AllowedHosts,
    /// `KOO_DASHBOARD`: the web dashboard at `/` of the HTTP listener.
    pub dashboard: bool,
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
            limits: Limits::default(),
            tls: None,
            health_listen: None,
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 50052))),
            cors_origins: crate::transport::cors::CorsOrigins::None,
            allowed_hosts: crate::transport::site::AllowedHosts::Local,
            dashboard: true,
        }
    }
}

/// The limits, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `KOO_MAX_WATCHERS`.
    pub max_watchers: usize,
    /// `KOO_WATCH_BUFFER`.
    pub watch_buffer: usize,
    /// `KOO_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
    /// `KOO_MAX_HELD_PER_WORKER`.
    pub max_held_per_worker: u32,
    /// `KOO_MAX_INFLIGHT_CALLS`.
    pub max_inflight_calls: usize,
    /// `KOO_MAX_CONNECTIONS`, per listener.
    pub max_connections: usize,
    /// `KOO_IDLE_CONNECTION_TIMEOUT` (`None`: never).
    pub idle_connection_timeout: Option<Duration>,
    /// `KOO_MAX_CONNECTION_AGE` (`None`: never).
    pub max_connection_age: Option<Duration>,
    /// `KOO_MAX_CONNECTION_AGE_GRACE` (`None`: unbounded).
    pub max_connection_age_grace: Option<Duration>,
    /// `KOO_HTTP2_KEEPALIVE_INTERVAL` (`None`: no pings).
    pub http2_keepalive_interval: Option<Duration>,
    /// `KOO_HTTP2_KEEPALIVE_TIMEOUT`.
    pub http2_keepalive_timeout: Duration,
    /// `KOO_MAX_MESSAGE_SIZE`, bytes.
    pub max_message_size: usize,
    /// Health `Watch` streams open at once (no setting: the fixed
    /// [`crate::grpc::health::MAX_WATCHES`], which tests lower).
    pub max_health_watches: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_watchers: 20_000,
            max_health_watches: crate::grpc::health::MAX_WATCHES,
            watch_buffer: 4096,
            max_concurrent_streams: 4096,
            max_held_per_worker: crate::tasks::remote::holds::DEFAULT_MAX_HELD,
            max_inflight_calls: 10_000,
            max_connections: 10_000,
            idle_connection_timeout: Some(Duration::from_secs(600)),
            max_connection_age: None,
            max_connection_age_grace: None,
            http2_keepalive_interval: Some(Duration::from_secs(30)),
            http2_keepalive_timeout: Duration::from_secs(10),
            max_message_size: 4 * 1024 * 1024,
        }
    }
}
