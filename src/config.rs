//! Command-line and environment configuration.
//!
//! Every flag can also be set by an environment variable; the seed's
//! variables (`REDIS_URL`, `CACHE_DEFAULT_TTL`, ...) keep their names and
//! meanings, koo's own additions are `KOO_*`. A flag given on the command line
//! overrides the variable. Durations are seconds (`30`, `0.5`) or a unit
//! (`250ms`, `10m`). Invalid values stop start-up with a message naming the
//! variable.

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

pub use self::auth::{AuthArgs, AuthCommand, NewKeyArgs};
pub use self::cache::CacheArgs;
pub use self::flow::FlowArgs;
pub use self::health::HealthArgs;
pub use self::limits::LimitsArgs;
pub use self::otel::OtelArgs;
pub use self::redis::RedisArgs;
pub use self::redis_tls::RedisTlsArgs;
pub use self::schedule::ScheduleArgs;
pub use self::serve::ServeArgs;
pub use self::tasks::TaskArgs;
pub use self::transport::TransportArgs;
pub use self::worker::{SchedulerArgs, WorkerArgs};

mod auth;
mod cache;
mod flow;
mod health;
mod limits;
mod otel;
mod redis;
mod redis_tls;
mod schedule;
mod serve;
mod tasks;
mod transport;
mod worker;

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
    /// Trace export (the standard `OTEL_*` variables).
    #[command(flatten)]
    pub otel: OtelArgs,
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
    /// Serve koo: the gRPC API (cache, tasks, workers, schedules, health), the HTTP listener
    /// (REST, grpc-web, /metrics, the dashboard) and the built-in workers and scheduler.
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
    /// Client: cache entries of a running koo (get, set, del, keys, clear, stats, invalidate-tags, get-or-compute, watch).
    Cache(Box<crate::cli::cache::CacheCli>),
    /// Client: tasks (submit, get, watch, ls, history, cancel, retry, dead, requeue).
    Task(Box<crate::cli::task::TaskCli>),
    /// Client: periodic schedules (ls, get, create, pause, resume, trigger, rm).
    Cron(Box<crate::cli::cron::CronCli>),
    /// Client: task queues (ls, pause, resume).
    Queue(Box<crate::cli::queue::QueueCli>),
    /// Client: rate limits and concurrency caps (ls, get, set-rate, set-concurrency, rm).
    Limit(Box<crate::cli::limit::LimitCli>),
    /// Client: the workers koo knows.
    Ps(Box<crate::cli::ps::PsCli>),
    /// Client: a live view of queues and workers (q quits).
    Top(Box<crate::cli::top::TopCli>),
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

/// Longest accepted duration of any setting: ten years, far beyond any use,
/// and safe to add to the clock.
const MAX_SETTING_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
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

pub(crate) fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".to_owned()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole command line (daemons and client commands) is consistent:
    /// no clashing flags, every `requires` names a real argument.
    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["koo", "task", "ls", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Task(_)));
        // a setting's flag takes its value (`--dashboard off`), as its
        // variable does
        for line in [
            ["koo", "serve", "--dashboard", "off"],
            ["koo", "serve", "--dashboard=OFF", ""],
        ] {
            let line: Vec<&str> = line.into_iter().filter(|w| !w.is_empty()).collect();
            let Command::Serve(s) = Cli::try_parse_from(line).unwrap().command else {
                panic!("not serve");
            };
            assert!(!s.transport.dashboard);
        }
    }

    /// `KOO_TASK_SUBMIT_WAIT_REPLICAS` is a count of 0 to 64 and
    /// `KOO_TASK_SUBMIT_WAIT_TIMEOUT` a positive duration; anything else is
    /// refused naming the setting.
    #[test]
    fn submit_wait_replicas_is_a_bounded_count() {
        let flag = "--task-submit-wait-replicas";
        for bad in ["x", "-1", "65"] {
            let arg = format!("{flag}={bad}");
            let err = Cli::try_parse_from(["koo", "serve", &arg]).unwrap_err();
            assert!(
                err.to_string().contains("KOO_TASK_SUBMIT_WAIT_REPLICAS"),
                "{err}"
            );
        }
        assert!(Cli::try_parse_from(["koo", "serve", flag, "1"]).is_ok());
        for bad in ["0", "x"] {
            let arg = format!("--task-submit-wait-timeout={bad}");
            let err = Cli::try_parse_from(["koo", "serve", &arg]).unwrap_err();
            assert!(
                err.to_string().contains("KOO_TASK_SUBMIT_WAIT_TIMEOUT"),
                "{err}"
            );
        }
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
