//! Command-line and environment configuration.
//!
//! Every flag can also be set by an environment variable; the seed's
//! variables (`REDIS_URL`, `CACHE_DEFAULT_TTL`, ...) keep their names and
//! meanings, koo's own additions are `KOO_*`. A flag given on the command line
//! overrides the variable. Durations are seconds (`30`, `0.5`) or a unit
//! (`250ms`, `10m`). Invalid values stop start-up with a message naming the
//! variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

pub use self::auth::{AuthArgs, AuthCommand, NewKeyArgs};
pub use self::cache::CacheArgs;
pub use self::limits::{Limits, LimitsArgs};
pub use self::redis_tls::RedisTlsArgs;
pub use self::transport::TransportArgs;
use crate::cache::CacheConfig;
use crate::persist::DataSettings;
use crate::server::{ScheduleSettings, Settings, StoreSettings, TaskSettings};
use crate::store::redis::url as redis_url;
use crate::store::tasks::TaskLimits;
use crate::store::{MemoryConfig, RedisConfig};
use crate::tasks::engine::TaskConfig;
use crate::tasks::model::QueueName;
use crate::tasks::remote::secret::LeaseSecrets;
use crate::tasks::retry::Backoff;

mod auth;
mod cache;
mod limits;
mod redis_tls;
mod transport;

/// koo: a gRPC control plane for caching and background work.
#[derive(Debug, Parser)]
#[command(name = "koo", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "KOO_LOG_FORMAT",
        value_name = "KOO_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info`, `koo=debug`).
    #[arg(
        long,
        env = "KOO_LOG",
        value_name = "KOO_LOG",
        default_value = "info",
        global = true
    )]
    pub log: String,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// koo's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the gRPC API (CacheService, health, reflection).
    Serve(Box<ServeArgs>),
    /// Run built-in task workers only (needs Redis), to scale out.
    Worker(Box<WorkerArgs>),
    /// Run the scheduler only (needs Redis): fires the periodic schedules.
    Scheduler(Box<SchedulerArgs>),
    /// Ask a running koo for its gRPC health; exits 0 when SERVING.
    Health(HealthArgs),
    /// API keys: `koo auth new-key`.
    #[command(subcommand)]
    Auth(AuthCommand),
}

/// `koo health`: a probe for container health checks.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Address of the koo to ask (0.0.0.0 and [::] mean this host).
    #[arg(
        long,
        env = "KOO_LISTEN",
        value_name = "KOO_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub addr: SocketAddr,
    /// Service to ask about; empty means the server as a whole.
    #[arg(long, default_value = "")]
    pub service: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// PEM CA that signed the server's certificate: set, the check uses TLS.
    #[arg(long, env = "KOO_HEALTH_TLS_CA", value_name = "KOO_HEALTH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mTLS; with --tls-key).
    #[arg(
        long,
        env = "KOO_HEALTH_TLS_CERT",
        value_name = "KOO_HEALTH_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "KOO_HEALTH_TLS_KEY",
        value_name = "KOO_HEALTH_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Name to verify the server's certificate against (default: the address' host).
    #[arg(
        long,
        env = "KOO_HEALTH_TLS_SERVER_NAME",
        value_name = "KOO_HEALTH_TLS_SERVER_NAME"
    )]
    pub tls_server_name: Option<String>,
    /// API key sent as `authorization: Bearer <key>`.
    #[arg(
        long,
        env = "KOO_API_KEY",
        value_name = "KOO_API_KEY",
        hide_env_values = true
    )]
    pub key: Option<String>,
}

/// Redis settings shared by `koo serve`, `koo worker` and `koo scheduler`.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// Redis URL (`redis[s]://[user:password@]host:port/db`; `rediss://` is
    /// TLS). Without it koo keeps the cache in process (the embedded store:
    /// not shared, not durable).
    #[arg(long, env = "REDIS_URL", value_name = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Multiplexed connections to Redis.
    #[arg(long, env = "REDIS_MAX_CONNECTIONS", value_name = "REDIS_MAX_CONNECTIONS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub redis_max_connections: u32,
    /// Whether a Redis call that timed out is retried (within its deadline).
    #[arg(long, env = "REDIS_RETRY_ON_TIMEOUT", value_name = "REDIS_RETRY_ON_TIMEOUT", default_value = "true",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub redis_retry_on_timeout: bool,
    /// Whether TCP keepalive is enabled on Redis connections.
    #[arg(long, env = "REDIS_SOCKET_KEEPALIVE", value_name = "REDIS_SOCKET_KEEPALIVE", default_value = "true",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub redis_socket_keepalive: bool,
    /// How often the backend is probed; the gRPC health status follows it.
    #[arg(long, env = "REDIS_HEALTH_CHECK_INTERVAL", value_name = "REDIS_HEALTH_CHECK_INTERVAL", default_value = "30",
          value_parser = parse_positive_duration)]
    pub redis_health_check_interval: Duration,
    /// Bound on opening one Redis connection.
    #[arg(long, env = "KOO_REDIS_CONNECT_TIMEOUT", value_name = "KOO_REDIS_CONNECT_TIMEOUT", default_value = "1s",
          value_parser = parse_positive_duration)]
    pub redis_connect_timeout: Duration,
    /// Extra attempts after a transient Redis failure (within the deadline).
    #[arg(long, env = "KOO_REDIS_RETRIES", value_name = "KOO_REDIS_RETRIES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(0..=20))]
    pub redis_retries: u32,
    /// Consecutive Redis failures that open the circuit breaker.
    #[arg(long, env = "KOO_BREAKER_FAILURES", value_name = "KOO_BREAKER_FAILURES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,
    /// How long the open breaker refuses calls before a trial.
    #[arg(long, env = "KOO_BREAKER_COOLDOWN", value_name = "KOO_BREAKER_COOLDOWN", default_value = "5s",
          value_parser = parse_duration)]
    pub breaker_cooldown: Duration,
    /// TLS for `rediss://` URLs (CA, client certificate).
    #[command(flatten)]
    pub tls: RedisTlsArgs,
}

/// Task engine settings (the seed's Celery settings under TASK_*, WORKER_*
/// and RESULT_* names; the CELERY_* names are read too when these are unset).
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// Hard time limit of a task [default: 1800; alias CELERY_TASK_TIME_LIMIT].
    #[arg(long, env = "TASK_TIME_LIMIT", value_name = "TASK_TIME_LIMIT", value_parser = parse_positive_duration)]
    pub task_time_limit: Option<Duration>,
    /// Soft time limit of a task [default: 1500; alias CELERY_TASK_SOFT_TIME_LIMIT].
    #[arg(long, env = "TASK_SOFT_TIME_LIMIT", value_name = "TASK_SOFT_TIME_LIMIT", value_parser = parse_positive_duration)]
    pub task_soft_time_limit: Option<Duration>,
    /// Late acknowledgement: a task whose worker died runs again; off, it ends FAILED
    /// ('worker lost') [default: true; alias CELERY_TASK_ACKS_LATE].
    #[arg(long, env = "TASK_ACKS_LATE", value_name = "TASK_ACKS_LATE", value_parser = BoolishValueParser::new())]
    pub task_acks_late: Option<bool>,
    /// How long results stay readable after a task ends [default: 3600; alias CELERY_RESULT_EXPIRES].
    #[arg(long, env = "RESULT_EXPIRES", value_name = "RESULT_EXPIRES", value_parser = parse_positive_duration)]
    pub result_expires: Option<Duration>,
    /// Tasks a built-in worker slot takes at a time; only 1 is supported [default: 1; alias
    /// CELERY_WORKER_PREFETCH_MULTIPLIER].
    #[arg(
        long,
        env = "WORKER_PREFETCH_MULTIPLIER",
        value_name = "WORKER_PREFETCH_MULTIPLIER"
    )]
    pub worker_prefetch_multiplier: Option<u32>,
    /// Redis holding tasks [default: REDIS_URL; alias CELERY_BROKER_URL].
    #[arg(long, env = "TASK_BROKER_URL", value_name = "TASK_BROKER_URL")]
    pub task_broker_url: Option<String>,
    /// Redis holding results; read, but results stay beside their tasks on the broker [default: the broker; alias CELERY_RESULT_BACKEND].
    #[arg(long, env = "TASK_RESULT_BACKEND", value_name = "TASK_RESULT_BACKEND")]
    pub task_result_backend: Option<String>,
    /// Lease of a running task; its worker heartbeats at a third of it.
    #[arg(long, env = "KOO_TASK_LEASE", value_name = "KOO_TASK_LEASE", default_value = "30s",
          value_parser = parse_positive_duration)]
    pub task_lease: Duration,
    /// How often lapsed leases are looked for.
    #[arg(long, env = "KOO_TASK_SWEEP_INTERVAL", value_name = "KOO_TASK_SWEEP_INTERVAL", default_value = "1s",
          value_parser = parse_positive_duration)]
    pub task_sweep_interval: Duration,
    /// Delay before the first retry; it doubles each retry (with jitter), up to 10 minutes.
    #[arg(long, env = "KOO_TASK_RETRY_BACKOFF", value_name = "KOO_TASK_RETRY_BACKOFF", default_value = "1s",
          value_parser = parse_duration)]
    pub task_retry_backoff: Duration,
    /// How long ended tasks stay in history; database maintenance removes
    /// older ones (their summaries and any result still stored).
    #[arg(long, env = "KOO_TASK_HISTORY_MAX_AGE", value_name = "KOO_TASK_HISTORY_MAX_AGE", default_value = "7d",
          value_parser = parse_positive_duration)]
    pub task_history_max_age: Duration,
    /// How long a dead letter (a task that ended FAILED or TIMED_OUT) keeps
    /// its task, arguments, error and attempt log, for RequeueDeadLetters
    /// and GetTask (within the cap per queue; one trimmed by the cap expires
    /// like a result).
    #[arg(long, env = "KOO_DEAD_LETTER_TTL", value_name = "KOO_DEAD_LETTER_TTL", default_value = "7d",
          value_parser = parse_positive_duration)]
    pub dead_letter_ttl: Duration,
    /// After SIGTERM, how long a worker lets a running task finish before it
    /// hands the task back to its queue (to run again elsewhere at once).
    #[arg(long, env = "KOO_WORKER_SHUTDOWN_GRACE", value_name = "KOO_WORKER_SHUTDOWN_GRACE", default_value = "10s",
          value_parser = parse_duration)]
    pub worker_shutdown_grace: Duration,
    /// How long a cancelled running task's handler may take to stop before
    /// it is abandoned (the task ends CANCELLED either way).
    #[arg(long, env = "KOO_TASK_CANCEL_GRACE", value_name = "KOO_TASK_CANCEL_GRACE", default_value = "10s",
          value_parser = parse_duration)]
    pub task_cancel_grace: Duration,
    /// How long an idempotency key is remembered after its submit.
    #[arg(long, env = "KOO_IDEMPOTENCY_TTL", value_name = "KOO_IDEMPOTENCY_TTL", default_value = "24h",
          value_parser = parse_positive_duration)]
    pub idempotency_ttl: Duration,
    /// How long an idle worker waits before looking for work again.
    #[arg(long, env = "KOO_WORKER_POLL_INTERVAL", value_name = "KOO_WORKER_POLL_INTERVAL", default_value = "100ms",
          value_parser = parse_positive_duration)]
    pub worker_poll_interval: Duration,
    /// Queues beyond the six category queues, comma-separated: tasks may be
    /// submitted to them and workers may serve them (e.g. `gpu,bulk`).
    #[arg(
        long,
        env = "KOO_TASK_QUEUES",
        value_name = "KOO_TASK_QUEUES",
        value_delimiter = ','
    )]
    pub task_queues: Vec<String>,
    /// Diagnostics only: a file to which the built-in
    /// `koo.diagnostics.ledger` handler appends one line per execution (the
    /// chaos suite's record of what ran). Unset, that handler does not
    /// exist; the path is the operator's, never a submitter's.
    #[arg(
        long,
        env = "KOO_DIAGNOSTICS_LEDGER",
        value_name = "KOO_DIAGNOSTICS_LEDGER"
    )]
    pub diagnostics_ledger: Option<PathBuf>,
}

/// Periodic schedules: the seed's defaults and the scheduler's pace.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Cache cleanup schedule (cron, five or six fields; `off` to switch it off).
    #[arg(
        long,
        env = "KOO_SCHEDULE_CACHE_CLEANUP",
        value_name = "KOO_SCHEDULE_CACHE_CLEANUP",
        default_value = "*/10 * * * *"
    )]
    pub schedule_cache_cleanup: String,
    /// Cache warming schedule (`off` to switch it off).
    #[arg(
        long,
        env = "KOO_SCHEDULE_CACHE_WARM",
        value_name = "KOO_SCHEDULE_CACHE_WARM",
        default_value = "*/30 * * * *"
    )]
    pub schedule_cache_warm: String,
    /// Database maintenance schedule (`off` to switch it off).
    #[arg(
        long,
        env = "KOO_SCHEDULE_DATABASE_MAINTENANCE",
        value_name = "KOO_SCHEDULE_DATABASE_MAINTENANCE",
        default_value = "0 * * * *"
    )]
    pub schedule_database_maintenance: String,
    /// Health check schedule (`off` to switch it off).
    #[arg(
        long,
        env = "KOO_SCHEDULE_HEALTH_CHECK",
        value_name = "KOO_SCHEDULE_HEALTH_CHECK",
        default_value = "*/5 * * * *"
    )]
    pub schedule_health_check: String,
    /// IANA time zone of the default schedules.
    #[arg(
        long,
        env = "KOO_SCHEDULE_TIME_ZONE",
        value_name = "KOO_SCHEDULE_TIME_ZONE",
        default_value = "UTC"
    )]
    pub schedule_time_zone: String,
    /// How often the scheduler looks for changes made through other koo instances.
    #[arg(long, env = "KOO_SCHEDULE_RELOAD_INTERVAL", value_name = "KOO_SCHEDULE_RELOAD_INTERVAL",
          default_value = "1s", value_parser = parse_positive_duration)]
    pub schedule_reload_interval: Duration,
}

impl ScheduleArgs {
    /// The scheduler's settings (`enabled` says whether this process runs it).
    pub fn settings(&self, enabled: bool) -> Result<ScheduleSettings, ConfigError> {
        let defaults = crate::schedule::defaults::from_config(
            [
                &self.schedule_cache_cleanup,
                &self.schedule_cache_warm,
                &self.schedule_database_maintenance,
                &self.schedule_health_check,
            ],
            &self.schedule_time_zone,
        )
        .map_err(|(variable, reason)| ConfigError { variable, reason })?;
        Ok(ScheduleSettings {
            enabled,
            defaults,
            reload_interval: self.schedule_reload_interval,
        })
    }
}

/// `koo scheduler`: the scheduler only (needs Redis).
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Redis connection settings.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Task engine settings.
    #[command(flatten)]
    pub tasks: TaskArgs,
    /// Schedules.
    #[command(flatten)]
    pub schedules: ScheduleArgs,
    /// Prefix of every Redis key koo writes.
    #[arg(
        long,
        env = "KOO_PREFIX",
        value_name = "KOO_PREFIX",
        default_value = "koo"
    )]
    pub prefix: String,
}

/// `koo worker`: built-in worker slots only (needs Redis).
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Redis connection settings.
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Task engine settings.
    #[command(flatten)]
    pub tasks: TaskArgs,
    /// Cache settings, applied when a task's result is cached.
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Worker slots.
    #[arg(long, env = "KOO_WORKER_CONCURRENCY", value_name = "KOO_WORKER_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Prefix of every Redis key koo writes.
    #[arg(
        long,
        env = "KOO_PREFIX",
        value_name = "KOO_PREFIX",
        default_value = "koo"
    )]
    pub prefix: String,
}

/// `koo serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(
        long,
        env = "KOO_LISTEN",
        value_name = "KOO_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Redis connection settings.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Task engine settings.
    #[command(flatten)]
    pub tasks: TaskArgs,
    /// Schedules.
    #[command(flatten)]
    pub schedules: ScheduleArgs,
    /// Do not run the scheduler in this process (schedules are still served
    /// over gRPC; `koo scheduler` or another `koo serve` fires them).
    #[arg(long, env = "KOO_NO_SCHEDULER", value_name = "KOO_NO_SCHEDULER",
          value_parser = BoolishValueParser::new(), default_value = "false", num_args = 0..=1,
          default_missing_value = "true")]
    pub no_scheduler: bool,
    /// Built-in worker slots in this process (0: none; `koo worker` adds more).
    #[arg(long, env = "KOO_WORKER_CONCURRENCY", value_name = "KOO_WORKER_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub worker_concurrency: u32,

    /// Cache settings (also read by `koo worker`, which caches task results).
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Limits on what clients may hold open.
    #[command(flatten)]
    pub limits: LimitsArgs,
    /// Authentication: keys file, reflection.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// TLS and the plaintext health listener.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Prefix of every Redis key koo writes (letters, digits, `_`, `-`, `.`).
    #[arg(
        long,
        env = "KOO_PREFIX",
        value_name = "KOO_PREFIX",
        default_value = "koo"
    )]
    pub prefix: String,
    /// JSON Lines file of entries that `Warm` preloads (re-read on every warm-up).
    #[arg(long, env = "KOO_CACHE_WARM_FILE", value_name = "KOO_CACHE_WARM_FILE")]
    pub cache_warm_file: Option<PathBuf>,
    /// How often this instance publishes its metrics so that any instance can sum them.
    #[arg(long, env = "KOO_METRICS_FLUSH_INTERVAL", value_name = "KOO_METRICS_FLUSH_INTERVAL", default_value = "1s",
          value_parser = parse_positive_duration)]
    pub metrics_flush_interval: Duration,
    /// How long per-level key counts are reused (counting walks the keyspace); 0 counts on every call.
    #[arg(long, env = "KOO_KEY_COUNT_INTERVAL", value_name = "KOO_KEY_COUNT_INTERVAL", default_value = "10s",
          value_parser = parse_duration)]
    pub key_count_interval: Duration,
    /// Capacity of the embedded store in bytes; when full, entries nearest to expiry are evicted.
    #[arg(
        long,
        env = "KOO_MEMORY_MAX_BYTES",
        value_name = "KOO_MEMORY_MAX_BYTES",
        default_value_t = 268_435_456
    )]
    pub memory_max_bytes: u64,
    /// Directory where the embedded store (cache entries, tasks, schedules) is saved at shutdown
    /// and loaded at start-up; locked while koo runs. Unset, it is dropped at shutdown.
    #[arg(long, env = "KOO_DATA_DIR", value_name = "KOO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// With KOO_DATA_DIR, also save this often while serving (0: only at shutdown), so that a
    /// crash loses at most this much.
    #[arg(long, env = "KOO_DATA_SNAPSHOT_INTERVAL", value_name = "KOO_DATA_SNAPSHOT_INTERVAL",
          default_value = "60s", value_parser = parse_duration)]
    pub data_snapshot_interval: Duration,
    /// How often the embedded store purges expired entries.
    #[arg(long, env = "KOO_MEMORY_SWEEP_INTERVAL", value_name = "KOO_MEMORY_SWEEP_INTERVAL", default_value = "1s",
          value_parser = parse_positive_duration)]
    pub memory_sweep_interval: Duration,

    /// Deadline of a call whose client sets none.
    #[arg(long, env = "KOO_REQUEST_TIMEOUT", value_name = "KOO_REQUEST_TIMEOUT", default_value = "5s",
          value_parser = parse_positive_duration)]
    pub request_timeout: Duration,
    /// Deadline of a bulk call (ClearLevel, Cleanup, StartMaintenance, Warm) whose client sets none.
    #[arg(long, env = "KOO_BULK_TIMEOUT", value_name = "KOO_BULK_TIMEOUT", default_value = "300s",
          value_parser = parse_positive_duration)]
    pub bulk_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    #[arg(long, env = "KOO_SHUTDOWN_GRACE", value_name = "KOO_SHUTDOWN_GRACE", default_value = "30s",
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// On SIGTERM/SIGINT, how long koo reports NOT_SERVING (and has ended its
    /// streams) before it stops accepting connections.
    #[arg(long, env = "KOO_SHUTDOWN_DRAIN", value_name = "KOO_SHUTDOWN_DRAIN", default_value = "500ms",
          value_parser = parse_duration)]
    pub shutdown_drain: Duration,
    /// Shared secret that external workers (WorkerService) must present as
    /// `authorization: Bearer <token>`; unset, WorkerService is open. With
    /// KOO_AUTH_FILE it is one more worker key, named KOO_WORKER_TOKEN.
    #[arg(
        long,
        env = "KOO_WORKER_TOKEN",
        value_name = "KOO_WORKER_TOKEN",
        hide_env_values = true
    )]
    pub worker_token: Option<String>,
    /// Whether reports on a lease (HeartbeatTask, ReportProgress, CompleteTask, FailTask, and a
    /// Work stream's reports on tasks it does not hold) must carry the lease's secret:
    /// `required`, `optional` (a report without one is accepted unless a Work stream holds the
    /// task) or `auto` (`required` when authentication is configured, else `optional`).
    #[arg(long, env = "KOO_LEASE_SECRETS", value_name = "KOO_LEASE_SECRETS", value_enum,
          default_value_t = LeaseSecrets::Auto)]
    pub lease_secrets: LeaseSecrets,
}

/// A configuration value that parses but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    /// The variable (and flag) at fault.
    pub variable: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Largest accepted `CACHE_MAX_VALUE_SIZE`: the stored header records sizes
/// in 32 bits, and gRPC messages beyond this are impractical anyway.
const MAX_VALUE_SIZE_CEILING: usize = 1 << 30;

/// Smallest accepted embedded-store capacity (1 MiB).
const MIN_MEMORY_BYTES: u64 = 1 << 20;

/// Longest accepted duration of any setting: ten years, far beyond any use,
/// and safe to add to the clock.
const MAX_SETTING_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl ServeArgs {
    /// Checks cross-field rules and builds the server's settings.
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        let err = |variable, reason: String| ConfigError { variable, reason };
        if self.memory_max_bytes < MIN_MEMORY_BYTES {
            return Err(err(
                "KOO_MEMORY_MAX_BYTES",
                format!(
                    "must be at least {MIN_MEMORY_BYTES} bytes, got {}",
                    self.memory_max_bytes
                ),
            ));
        }
        if self.prefix.is_empty()
            || self.prefix.len() > 64
            || !self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(err(
                "KOO_PREFIX",
                format!(
                    "must be 1 to 64 letters, digits, '_', '-' or '.', got {:?}",
                    self.prefix
                ),
            ));
        }
        let store = match self.redis.redis_config(self.redis.redis_url.clone())? {
            Some(redis) => StoreSettings::Redis(redis),
            None => StoreSettings::Memory(MemoryConfig {
                max_bytes: self.memory_max_bytes,
            }),
        };
        let cache = self.cache.cache_config(&self.prefix)?;
        let tasks = TaskSettings {
            redis: self.tasks.redis_config(&self.redis)?,
            config: TaskConfig {
                // `auto` is `required` once callers are authenticated (a
                // keys file, or client certificates).
                lease_secrets: self.lease_secrets.resolve(
                    self.auth.settings().file.is_some()
                        || self
                            .transport
                            .tls_client_ca
                            .as_deref()
                            .is_some_and(|p| !p.as_os_str().is_empty()),
                ),
                ..self.tasks.task_config(&self.prefix)?
            },
            workers: self.worker_concurrency as usize,
            ledger: self.tasks.diagnostics_ledger.clone(),
        };
        Ok(Settings {
            listen: self.listen,
            tls: self.transport.tls()?,
            health_listen: self.transport.health_listen,
            store,
            cache: CacheConfig {
                warm_file: self.cache_warm_file,
                metrics_flush_interval: self.metrics_flush_interval,
                key_count_interval: self.key_count_interval,
                ..cache
            },
            health_check_interval: self.redis.redis_health_check_interval,
            tasks,
            memory_sweep_interval: self.memory_sweep_interval,
            data: DataSettings {
                dir: self.data_dir.filter(|d| !d.as_os_str().is_empty()),
                snapshot_interval: self.data_snapshot_interval,
            },
            request_timeout: self.request_timeout,
            bulk_timeout: self.bulk_timeout,
            limits: self.limits.limits(),
            auth: self.auth.settings(),
            shutdown_grace: self.shutdown_grace,
            shutdown_drain: self.shutdown_drain,
            schedule: self.schedules.settings(!self.no_scheduler)?,
            worker_token: match self.worker_token {
                Some(t)
                    if t.is_empty()
                        || t.len() > 4096
                        || !t.is_ascii()
                        || t.contains(char::is_whitespace) =>
                {
                    return Err(err(
                        "KOO_WORKER_TOKEN",
                        "must be 1 to 4096 printable ASCII characters without spaces".to_owned(),
                    ));
                }
                t => t,
            },
        })
    }
}

impl RedisArgs {
    /// The Redis settings for `url`, or `None` without one.
    pub fn redis_config(&self, url: Option<String>) -> Result<Option<RedisConfig>, ConfigError> {
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let bad = |reason: String| ConfigError {
            variable: "REDIS_URL",
            reason,
        };
        let tls = self.tls.load()?;
        if redis_url::is_tls(&url) {
            if url.ends_with("#insecure") {
                return Err(bad(format!(
                    "{}: koo always verifies Redis's certificate; drop #insecure and give a private CA in KOO_REDIS_TLS_CA",
                    redis_url::redact(&url)
                )));
            }
        } else if !(url.starts_with("redis://")
            || url.starts_with("redis+unix://")
            || url.starts_with("unix://"))
        {
            return Err(bad(
                "must start with redis://, rediss:// (TLS) or redis+unix:// (a socket)".to_owned(),
            ));
        } else if tls.is_some() {
            return Err(bad(format!(
                "{} is plaintext but KOO_REDIS_TLS_* files are set; use rediss:// (or unset them)",
                redis_url::redact(&url)
            )));
        }
        Ok(Some(RedisConfig {
            url,
            tls,
            max_connections: self.redis_max_connections as usize,
            retry_on_timeout: self.redis_retry_on_timeout,
            keepalive: self.redis_socket_keepalive,
            connect_timeout: self.redis_connect_timeout,
            retries: self.redis_retries,
            breaker_failures: self.breaker_failures,
            breaker_cooldown: self.breaker_cooldown,
        }))
    }
}

/// A value from its flag or variable, else its CELERY_* alias, else a default.
fn aliased<T: std::str::FromStr>(
    value: Option<T>,
    alias: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    if let Some(v) = value {
        return Ok(v);
    }
    match std::env::var(alias) {
        Ok(raw) => raw.trim().parse().map_err(|_| ConfigError {
            variable: alias,
            reason: format!("{raw:?} is not a valid value"),
        }),
        Err(_) => Ok(default),
    }
}

fn aliased_duration(
    value: Option<Duration>,
    alias: &'static str,
    default_secs: u64,
) -> Result<Duration, ConfigError> {
    let secs = aliased(value.map(|d| d.as_secs_f64()), alias, default_secs as f64)?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_SETTING_DURATION)
        .ok_or(ConfigError {
            variable: alias,
            reason: format!("{secs} is not a positive number of seconds"),
        })
}

impl TaskArgs {
    /// The Redis that holds tasks: the broker URL, else the result backend,
    /// else `REDIS_URL`. A result backend other than the broker is read but
    /// not used (logged once, here, at start-up): a task's result is a field
    /// of the task itself, written by the same script that ends it, so that
    /// no reader ever sees a final state without its result; the seed's
    /// `.env` (broker on db 1, results on db 2) must still start.
    pub fn redis_config(&self, redis: &RedisArgs) -> Result<Option<RedisConfig>, ConfigError> {
        let broker = self
            .task_broker_url
            .clone()
            .or_else(|| std::env::var("CELERY_BROKER_URL").ok());
        let results = self
            .task_result_backend
            .clone()
            .or_else(|| std::env::var("CELERY_RESULT_BACKEND").ok());
        if let (Some(b), Some(r)) = (&broker, &results)
            && b != r
        {
            tracing::warn!(
                broker = %redis_url::redact(b),
                result_backend = %redis_url::redact(r),
                "TASK_RESULT_BACKEND (CELERY_RESULT_BACKEND) is read but results are kept beside \
                 their tasks on the broker's Redis: a result is written by the same script that \
                 ends its task, so a final state is never seen without its result"
            );
        }
        redis.redis_config(broker.or(results).or_else(|| redis.redis_url.clone()))
    }

    /// The engine settings.
    pub fn task_config(&self, prefix: &str) -> Result<TaskConfig, ConfigError> {
        let time_limit = aliased_duration(self.task_time_limit, "CELERY_TASK_TIME_LIMIT", 1800)?;
        let soft_time_limit = aliased_duration(
            self.task_soft_time_limit,
            "CELERY_TASK_SOFT_TIME_LIMIT",
            1500,
        )?;
        if soft_time_limit > time_limit {
            return Err(ConfigError {
                variable: "TASK_SOFT_TIME_LIMIT",
                reason: format!(
                    "{soft_time_limit:?} is longer than TASK_TIME_LIMIT ({time_limit:?})"
                ),
            });
        }
        let prefetch = aliased(
            self.worker_prefetch_multiplier,
            "CELERY_WORKER_PREFETCH_MULTIPLIER",
            1,
        )?;
        if prefetch != 1 {
            return Err(ConfigError {
                variable: "WORKER_PREFETCH_MULTIPLIER",
                reason: format!(
                    "built-in workers lease one task per slot; {prefetch} is not supported (use 1)"
                ),
            });
        }
        Ok(TaskConfig {
            prefix: prefix.to_owned(),
            lease: self.task_lease,
            sweep_interval: self.task_sweep_interval,
            acks_late: aliased(self.task_acks_late, "CELERY_TASK_ACKS_LATE", true)?,
            soft_time_limit,
            time_limit,
            result_ttl: aliased_duration(self.result_expires, "CELERY_RESULT_EXPIRES", 3600)?,
            backoff: Backoff {
                base: self.task_retry_backoff,
                max: Duration::from_secs(600),
            },
            poll_interval: self.worker_poll_interval,
            history_max_age: self.task_history_max_age,
            shutdown_grace: self.worker_shutdown_grace,
            cancel_grace: self.task_cancel_grace,
            idempotency_ttl: self.idempotency_ttl,
            limits: TaskLimits {
                dead_ttl: self.dead_letter_ttl,
                ..TaskLimits::default()
            },
            extra_queues: self
                .task_queues
                .iter()
                .map(|q| q.trim())
                .filter(|q| !q.is_empty())
                .map(|q| {
                    QueueName::parse(q).map_err(|e| ConfigError {
                        variable: "KOO_TASK_QUEUES",
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<_, _>>()?,
            ..TaskConfig::default()
        })
    }
}

/// Seconds (`30`, `0.25`) or a duration with a unit (`250ms`, `10m`, `1h 30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?} is not a non-negative number of seconds"))?,
        Err(_) => humantime::parse_duration(s).map_err(|e| {
            format!("{s:?} is not a duration ({e}); use seconds or e.g. 250ms, 10m")
        })?,
    };
    if d > MAX_SETTING_DURATION {
        return Err(format!("{s:?} is longer than ten years"));
    }
    Ok(d)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".to_owned()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    /// Parses `koo serve ARGS` ignoring the process environment, so that the
    /// test holds whatever variables the machine has set.
    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cmd = Cli::command().mut_subcommand("serve", |c| c.mut_args(|a| a.env(None)));
        let matches = cmd.try_get_matches_from(["koo", "serve"].iter().chain(args))?;
        let (_, sub) = matches.subcommand().expect("serve");
        ServeArgs::from_arg_matches(sub)
    }

    /// The documented defaults are what koo runs with when nothing is set.
    #[test]
    fn defaults_parse_to_documented_settings() {
        let s = parse(&[]).unwrap().into_settings().unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.listen.to_string(), "127.0.0.1:50051");
        assert!(matches!(s.store, StoreSettings::Memory(_)));
        assert_eq!(s.cache.default_ttl, Duration::from_secs(3600));
        assert_eq!(s.cache.compression_threshold, 1024);
        assert_eq!(s.cache.max_value_size, 10_485_760);
        assert_eq!(s.health_check_interval, Duration::from_secs(30));
    }

    /// Lease secrets default to `auto` (`optional` while no authentication
    /// is configured); the hold bound defaults to 1024; both are checked.
    #[test]
    fn lease_flags() {
        use crate::tasks::remote::secret::LeasePolicy;
        let s = parse(&[]).unwrap().into_settings().unwrap();
        assert_eq!(s.tasks.config.lease_secrets, LeasePolicy::Optional);
        assert_eq!(s.limits.max_held_per_worker, 1024);
        let s = parse(&["--lease-secrets", "required", "--max-held-per-worker", "50"])
            .unwrap()
            .into_settings()
            .unwrap();
        assert_eq!(s.tasks.config.lease_secrets, LeasePolicy::Required);
        assert_eq!(s.limits.max_held_per_worker, 50);
        assert!(parse(&["--lease-secrets", "sometimes"]).is_err());
        assert!(parse(&["--max-held-per-worker", "0"]).is_err());
    }

    /// The scheduler runs by default; `--no-scheduler` turns it off; the
    /// default schedules can be changed, switched off, and are validated
    /// naming their variable.
    #[test]
    fn scheduler_flags() {
        let on = parse(&[]).unwrap().into_settings().unwrap();
        assert!(on.schedule.enabled);
        assert_eq!(on.schedule.defaults.len(), 4);
        assert_eq!(on.schedule.defaults[3].cron.as_deref(), Some("*/5 * * * *"));
        let off = parse(&["--no-scheduler"]).unwrap().into_settings().unwrap();
        assert!(!off.schedule.enabled);
        let off = parse(&["--no-scheduler", "true"])
            .unwrap()
            .into_settings()
            .unwrap();
        assert!(!off.schedule.enabled);
        let s = parse(&[
            "--schedule-cache-warm",
            "off",
            "--schedule-health-check",
            "*/2 * * * * *",
        ])
        .unwrap()
        .into_settings()
        .unwrap();
        assert_eq!(s.schedule.defaults[1].cron, None);
        assert_eq!(
            s.schedule.defaults[3].cron.as_deref(),
            Some("*/2 * * * * *")
        );
        let err = parse(&["--schedule-cache-cleanup", "every tuesday"])
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert_eq!(err.variable, "KOO_SCHEDULE_CACHE_CLEANUP");
        assert!(err.reason.contains("every tuesday"), "{}", err.reason);
        let err = parse(&["--schedule-time-zone", "Nowhere/Land"])
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert_eq!(err.variable, "KOO_SCHEDULE_TIME_ZONE");
    }

    /// Flags override defaults, and Redis settings are carried over.
    #[test]
    fn redis_flags() {
        let s = parse(&[
            "--redis-url",
            "redis://127.0.0.1:6379/0",
            "--redis-max-connections",
            "4",
            "--redis-retry-on-timeout",
            "false",
            "--redis-health-check-interval",
            "250ms",
        ])
        .unwrap()
        .into_settings()
        .unwrap();
        let StoreSettings::Redis(r) = s.store else {
            panic!("not redis")
        };
        assert_eq!(r.max_connections, 4);
        assert!(!r.retry_on_timeout);
        assert_eq!(s.health_check_interval, Duration::from_millis(250));
    }

    /// Bad values are refused with the variable's name in the message.
    #[test]
    fn bad_values_name_the_variable() {
        let e = parse(&["--redis-max-connections", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("REDIS_MAX_CONNECTIONS"), "{e}");
        let e = parse(&["--cache-default-ttl", "soon"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CACHE_DEFAULT_TTL"), "{e}");
        let e = parse(&["--redis-socket-keepalive", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("REDIS_SOCKET_KEEPALIVE"), "{e}");
        let e = parse(&["--cache-max-value-size", "0"])
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert_eq!(e.variable, "CACHE_MAX_VALUE_SIZE");
        let e = parse(&["--prefix", "a b"])
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert_eq!(e.variable, "KOO_PREFIX");
        let e = parse(&["--redis-url", "http://x"])
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert_eq!(e.variable, "REDIS_URL");
    }

    /// `rediss://` is accepted; TLS files with a plaintext URL, and
    /// `#insecure`, are refused naming REDIS_URL without its password.
    #[test]
    fn redis_tls_urls() {
        let s = parse(&["--redis-url", "rediss://koo:pw@h:6380/0"])
            .unwrap()
            .into_settings()
            .unwrap();
        assert!(matches!(s.store, StoreSettings::Redis(ref r) if r.tls.is_none()));
        let e = parse(&["--redis-url", "rediss://koo:pw@h/0#insecure"])
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert_eq!(e.variable, "REDIS_URL");
        assert!(!e.to_string().contains("pw"), "{e}");
        let e = parse(&[
            "--redis-url",
            "redis://koo:pw@h/0",
            "--redis-tls-ca",
            "/nonexistent/ca.pem",
        ])
        .unwrap()
        .into_settings()
        .unwrap_err();
        assert_eq!(e.variable, "KOO_REDIS_TLS_CA");
    }

    /// Durations accept seconds and units, and refuse garbage.
    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_positive_duration("0").is_err());
    }
}
