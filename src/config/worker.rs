//! `koo worker` and `koo scheduler`: their flags, and the settings the
//! composition root runs them with.

use clap::Args;

use super::transport::{HttpListen, parse_http_listen};
use super::{CacheArgs, ConfigError, RedisArgs, ScheduleArgs, TaskArgs};
use crate::app::{SCHEDULER_STOP_GRACE, SchedulerSettings, WORKER_STOP_GRACE, WorkerSettings};

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
    /// Serve this process's Prometheus metrics at /metrics on this address (plaintext, no
    /// keys: bind it where only Prometheus reaches); `off` (the default) turns it off.
    #[arg(long, env = "KOO_HTTP_LISTEN", value_name = "KOO_HTTP_LISTEN", default_value = "off",
          value_parser = parse_http_listen)]
    pub http_listen: HttpListen,
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
    /// Serve this process's Prometheus metrics at /metrics on this address (plaintext, no
    /// keys: bind it where only Prometheus reaches); `off` (the default) turns it off.
    #[arg(long, env = "KOO_HTTP_LISTEN", value_name = "KOO_HTTP_LISTEN", default_value = "off",
          value_parser = parse_http_listen)]
    pub http_listen: HttpListen,
    /// Prefix of every Redis key koo writes.
    #[arg(
        long,
        env = "KOO_PREFIX",
        value_name = "KOO_PREFIX",
        default_value = "koo"
    )]
    pub prefix: String,
}

impl WorkerArgs {
    /// The worker's settings; `None` when no Redis is named (`koo worker`
    /// needs one).
    pub fn into_settings(self) -> Result<Option<WorkerSettings>, ConfigError> {
        let Some(redis) = self.tasks.redis_config(&self.redis)? else {
            return Ok(None);
        };
        let tasks = self.tasks.task_config(&self.prefix)?;
        Ok(Some(WorkerSettings {
            redis,
            cache: self.cache.cache_config(&self.prefix)?,
            stop_grace: worker_stop_grace(tasks.shutdown_grace),
            tasks,
            cache_redis: self
                .redis
                .redis_config("REDIS_URL", self.redis.redis_url.clone())?,
            ledger: self.tasks.diagnostics_ledger.clone(),
            concurrency: self.concurrency as usize,
            http_listen: self.http_listen.0,
        }))
    }
}

/// How long `koo worker` waits for its slots once signalled: the task
/// grace (`KOO_WORKER_SHUTDOWN_GRACE`) and room for the hand-backs after
/// it, at least [`WORKER_STOP_GRACE`], so that a longer task grace is
/// honoured rather than cut at 30 s.
fn worker_stop_grace(task_grace: std::time::Duration) -> std::time::Duration {
    const HAND_BACKS: std::time::Duration = std::time::Duration::from_secs(20);
    WORKER_STOP_GRACE.max(task_grace.saturating_add(HAND_BACKS))
}

impl SchedulerArgs {
    /// The scheduler's settings; `None` when no Redis is named (`koo
    /// scheduler` needs one).
    pub fn into_settings(self) -> Result<Option<SchedulerSettings>, ConfigError> {
        let Some(redis) = self.tasks.redis_config(&self.redis)? else {
            return Ok(None);
        };
        Ok(Some(SchedulerSettings {
            redis,
            schedule: self.schedules.settings(true)?,
            tasks: self.tasks.task_config(&self.prefix)?,
            stop_grace: SCHEDULER_STOP_GRACE,
            http_listen: self.http_listen.0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::config::Cli;

    /// Parses `koo SUB ARGS` ignoring the process environment.
    fn parse<T: FromArgMatches>(sub: &str, args: &[&str]) -> T {
        let cmd = Cli::command().mut_subcommand(sub, |c| c.mut_args(|a| a.env(None)));
        let matches = cmd
            .try_get_matches_from(["koo", sub].iter().chain(args))
            .unwrap();
        let (_, m) = matches.subcommand().expect("subcommand");
        T::from_arg_matches(m).unwrap()
    }

    /// Without Redis there is nothing to run; with it, the worker caches
    /// results on REDIS_URL, and both stop within their named graces.
    #[test]
    fn worker_and_scheduler_settings() {
        let none: WorkerArgs = parse("worker", &[]);
        assert!(none.into_settings().unwrap().is_none());
        let url = "redis://127.0.0.1:6379/0";
        let w: WorkerArgs = parse("worker", &["--redis-url", url, "--concurrency", "3"]);
        let w = w.into_settings().unwrap().unwrap();
        assert_eq!(w.redis.url, url);
        assert_eq!(w.cache_redis.as_ref().map(|r| r.url.as_str()), Some(url));
        assert_eq!(w.concurrency, 3);
        assert_eq!(w.stop_grace, WORKER_STOP_GRACE);
        assert_eq!(w.stop_grace.as_secs(), 30);
        // a longer task grace is honoured, with room for the hand-backs
        let long: WorkerArgs = parse(
            "worker",
            &["--redis-url", url, "--worker-shutdown-grace", "60s"],
        );
        assert_eq!(
            long.into_settings().unwrap().unwrap().stop_grace.as_secs(),
            80
        );
        let broker = "redis://127.0.0.1:6380/0";
        let w: WorkerArgs = parse("worker", &["--task-broker-url", broker]);
        let w = w.into_settings().unwrap().unwrap();
        assert_eq!(w.redis.url, broker);
        assert!(w.cache_redis.is_none());

        let none: SchedulerArgs = parse("scheduler", &[]);
        assert!(none.into_settings().unwrap().is_none());
        let s: SchedulerArgs = parse("scheduler", &["--redis-url", url, "--prefix", "p"]);
        let s = s.into_settings().unwrap().unwrap();
        assert_eq!(s.tasks.prefix, "p");
        assert!(s.schedule.enabled);
        assert_eq!(s.stop_grace, SCHEDULER_STOP_GRACE);
        assert_eq!(s.stop_grace.as_secs(), 10);
    }
}
