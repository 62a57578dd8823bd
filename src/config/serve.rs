//! `koo serve`: its flags, their cross-field rules, and the server's
//! settings built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap::builder::BoolishValueParser;

use super::{
    AuthArgs, CacheArgs, ConfigError, FlowArgs, LimitsArgs, RedisArgs, ScheduleArgs, TaskArgs,
    TransportArgs, parse_duration, parse_positive_duration,
};
use crate::app::settings::{Settings, StoreSettings, TaskSettings};
use crate::cache::CacheConfig;
use crate::persist::DataSettings;
use crate::store::MemoryConfig;
use crate::tasks::engine::TaskConfig;
use crate::tasks::remote::secret::LeaseSecrets;

/// Smallest accepted embedded-store capacity (1 MiB).
const MIN_MEMORY_BYTES: u64 = 1 << 20;

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
    /// Flow control: rate limits and concurrency caps set at start-up.
    #[command(flatten)]
    pub flow: FlowArgs,
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
    /// With KOO_DATA_DIR, also save this often while serving (0: only at shutdown and when the
    /// journal passes 64 MiB); between saves the journal keeps every acknowledged change.
    #[arg(long, env = "KOO_DATA_SNAPSHOT_INTERVAL", value_name = "KOO_DATA_SNAPSHOT_INTERVAL",
          default_value = "60s", value_parser = parse_duration)]
    pub data_snapshot_interval: Duration,
    /// With KOO_DATA_DIR, when the journal of acknowledged changes reaches the disk: always (a
    /// call is answered once its change is on disk), everysec (answered once written, so a
    /// kill -9 of koo loses nothing; synced every second), or no (the OS syncs).
    #[arg(long, env = "KOO_DATA_FSYNC", value_name = "KOO_DATA_FSYNC", default_value = "everysec",
          value_parser = |s: &str| s.parse::<crate::persist::Fsync>())]
    pub data_fsync: crate::persist::Fsync,
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

impl ServeArgs {
    /// Checks cross-field rules and builds the server's settings.
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        check_memory(self.memory_max_bytes)?;
        check_prefix(&self.prefix)?;
        let store = match self
            .redis
            .redis_config("REDIS_URL", self.redis.redis_url.clone())?
        {
            Some(redis) => StoreSettings::Redis(redis),
            None => StoreSettings::Memory(MemoryConfig {
                max_bytes: self.memory_max_bytes,
            }),
        };
        let cache = self.cache.cache_config(&self.prefix)?;
        let tasks = self.task_settings()?;
        if matches!(store, StoreSettings::Memory(_)) {
            if let Some(variable) = self.redis.tls.first_set()
                && tasks.redis.is_none()
            {
                return Err(ConfigError {
                    variable,
                    reason: "set, but no Redis URL is (REDIS_URL, TASK_BROKER_URL): koo runs on \
                             its embedded store and nothing would use it"
                        .to_owned(),
                });
            }
            if self.redis.redis_url.is_some() {
                tracing::warn!(
                    "REDIS_URL is set but empty: koo keeps its cache in its embedded store, not \
                     shared with other koo processes (unset it to mean that, or give the URL)"
                );
            }
        }
        Ok(Settings {
            listen: self.listen,
            tls: self.transport.tls()?,
            health_listen: self.transport.health_listen,
            http_listen: self.transport.http_listen.0,
            cors_origins: self.transport.cors_origins,
            allowed_hosts: self.transport.allowed_hosts,
            dashboard: self.transport.dashboard,
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
                fsync: self.data_fsync,
            },
            request_timeout: self.request_timeout,
            bulk_timeout: self.bulk_timeout,
            limits: self.limits.limits(),
            auth: self.auth.settings(),
            shutdown_grace: self.shutdown_grace,
            shutdown_drain: self.shutdown_drain,
            schedule: self.schedules.settings(!self.no_scheduler)?,
            worker_token: check_worker_token(self.worker_token)?,
        })
    }

    /// The task engine's settings; lease secrets resolved: `auto` is
    /// `required` once callers are authenticated (a keys file, or client
    /// certificates).
    fn task_settings(&self) -> Result<TaskSettings, ConfigError> {
        let authenticated = self.auth.settings().file.is_some()
            || self
                .transport
                .tls_client_ca
                .as_deref()
                .is_some_and(|p| !p.as_os_str().is_empty());
        let config = TaskConfig {
            lease_secrets: self.lease_secrets.resolve(authenticated),
            ..self.tasks.task_config(&self.prefix)?
        };
        let redis = self.tasks.redis_config(&self.redis)?;
        let flow_limits = self.flow.limits(&config.extra_queues)?;
        Ok(TaskSettings {
            redis,
            flow_limits,
            config,
            workers: self.worker_concurrency as usize,
            ledger: self.tasks.diagnostics_ledger.clone(),
        })
    }
}

fn check_memory(max_bytes: u64) -> Result<(), ConfigError> {
    if max_bytes < MIN_MEMORY_BYTES {
        return Err(ConfigError {
            variable: "KOO_MEMORY_MAX_BYTES",
            reason: format!("must be at least {MIN_MEMORY_BYTES} bytes, got {max_bytes}"),
        });
    }
    Ok(())
}

/// The prefix goes into every Redis key: 1 to 64 letters, digits, `_`,
/// `-` or `.`.
fn check_prefix(prefix: &str) -> Result<(), ConfigError> {
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ConfigError {
            variable: "KOO_PREFIX",
            reason: format!("must be 1 to 64 letters, digits, '_', '-' or '.', got {prefix:?}"),
        });
    }
    Ok(())
}

/// A worker token is sent as a bearer header: printable ASCII, no spaces.
fn check_worker_token(token: Option<String>) -> Result<Option<String>, ConfigError> {
    match token {
        Some(t)
            if t.is_empty()
                || t.len() > 4096
                || !t.is_ascii()
                || t.contains(char::is_whitespace) =>
        {
            Err(ConfigError {
                variable: "KOO_WORKER_TOKEN",
                reason: "must be 1 to 4096 printable ASCII characters without spaces".to_owned(),
            })
        }
        t => Ok(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
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

    /// A Redis Cluster's URL (its seed nodes) is accepted, plaintext or TLS.
    #[test]
    fn redis_cluster_urls() {
        for url in [
            "redis+cluster://koo:pw@h1:7000,h2:7001/",
            "rediss+cluster://h1:7000",
        ] {
            let s = parse(&["--redis-url", url])
                .unwrap()
                .into_settings()
                .unwrap();
            assert!(matches!(s.store, StoreSettings::Redis(ref r) if r.url == url));
        }
        let e = parse(&["--redis-url", "rediss+cluster://koo:pw@h/#insecure"])
            .unwrap()
            .into_settings()
            .unwrap_err();
        assert!(!e.to_string().contains("pw"), "{e}");
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
}
