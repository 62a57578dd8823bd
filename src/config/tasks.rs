//! Task engine settings: the seed's Celery settings under TASK_*, WORKER_*
//! and RESULT_* names, with the CELERY_* names read as aliases.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap::builder::BoolishValueParser;

use super::{
    ConfigError, MAX_SETTING_DURATION, RedisArgs, parse_duration, parse_positive_duration,
};
use crate::domain::task::QueueName;
use crate::store::RedisConfig;
use crate::store::redis::url as redis_url;
use crate::store::tasks::TaskLimits;
use crate::tasks::engine::TaskConfig;
use crate::tasks::retry::Backoff;

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
    /// Replicas a submit waits for before it is acknowledged (Redis `WAIT`
    /// in the submit's round trip; UNAVAILABLE when fewer confirm within
    /// `KOO_TASK_SUBMIT_WAIT_TIMEOUT`): an acknowledged submit then survives a failover. 0: no
    /// wait (asynchronous replication: a failover can lose acknowledged
    /// submits).
    #[arg(long, env = "KOO_TASK_SUBMIT_WAIT_REPLICAS", value_name = "KOO_TASK_SUBMIT_WAIT_REPLICAS",
          default_value = "0", value_parser = clap::value_parser!(u32).range(0..=64))]
    pub task_submit_wait_replicas: u32,
    /// How long a submit waits for `KOO_TASK_SUBMIT_WAIT_REPLICAS` before
    /// answering UNAVAILABLE (at most a third of the call's deadline).
    /// `WAIT` holds the pooled connection it runs on: a replica normally
    /// confirms within a millisecond; a missing one costs each submit this.
    #[arg(long, env = "KOO_TASK_SUBMIT_WAIT_TIMEOUT", value_name = "KOO_TASK_SUBMIT_WAIT_TIMEOUT",
          default_value = "200ms", value_parser = parse_positive_duration)]
    pub task_submit_wait_timeout: Duration,
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

/// A value from its flag or variable (`name`), else its CELERY_* alias,
/// else a default; with the name of the variable it came from, for a later
/// error about it.
fn aliased<T: std::str::FromStr>(
    value: Option<T>,
    (name, alias): (&'static str, &'static str),
    default: T,
) -> Result<(T, &'static str), ConfigError> {
    if let Some(v) = value {
        return Ok((v, name));
    }
    match std::env::var(alias) {
        Ok(raw) => raw
            .trim()
            .parse()
            .map(|v| (v, alias))
            .map_err(|_| ConfigError {
                variable: alias,
                reason: format!("{raw:?} is not a valid value"),
            }),
        Err(_) => Ok((default, name)),
    }
}

/// A boolean as Celery's settings write it (`True`, `false`, `1`, `no`,
/// `on`...): read by the parser `TASK_ACKS_LATE` itself uses, so that the
/// alias accepts exactly what the setting does.
struct Flag(bool);

impl std::str::FromStr for Flag {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        use clap::builder::TypedValueParser as _;
        BoolishValueParser::new()
            .parse_ref(&clap::Command::new("koo"), None, std::ffi::OsStr::new(s))
            .map(Flag)
            .map_err(drop)
    }
}

fn aliased_duration(
    value: Option<Duration>,
    names: (&'static str, &'static str),
    default_secs: u64,
) -> Result<(Duration, &'static str), ConfigError> {
    let (secs, variable) = aliased(value.map(|d| d.as_secs_f64()), names, default_secs as f64)?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_SETTING_DURATION)
        .map(|d| (d, variable))
        .ok_or(ConfigError {
            variable,
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
        let named = |v: &'static str| move |url: String| (v, url);
        let broker = self
            .task_broker_url
            .clone()
            .map(named("TASK_BROKER_URL"))
            .or_else(|| {
                std::env::var("CELERY_BROKER_URL")
                    .ok()
                    .map(named("CELERY_BROKER_URL"))
            });
        let results = self
            .task_result_backend
            .clone()
            .map(named("TASK_RESULT_BACKEND"))
            .or_else(|| {
                std::env::var("CELERY_RESULT_BACKEND")
                    .ok()
                    .map(named("CELERY_RESULT_BACKEND"))
            });
        if let (Some((_, b)), Some((_, r))) = (&broker, &results)
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
        let (variable, url) = match broker.or(results) {
            Some((variable, url)) => (variable, Some(url)),
            None => ("REDIS_URL", redis.redis_url.clone()),
        };
        redis.redis_config(variable, url)
    }

    /// The hard and soft time limits, the soft one no longer than the hard.
    fn time_limits(&self) -> Result<(Duration, Duration), ConfigError> {
        let (time_limit, limit_name) = aliased_duration(
            self.task_time_limit,
            ("TASK_TIME_LIMIT", "CELERY_TASK_TIME_LIMIT"),
            1800,
        )?;
        let (soft_time_limit, soft_name) = aliased_duration(
            self.task_soft_time_limit,
            ("TASK_SOFT_TIME_LIMIT", "CELERY_TASK_SOFT_TIME_LIMIT"),
            1500,
        )?;
        if soft_time_limit > time_limit {
            return Err(ConfigError {
                variable: soft_name,
                reason: format!("{soft_time_limit:?} is longer than {limit_name} ({time_limit:?})"),
            });
        }
        Ok((time_limit, soft_time_limit))
    }

    /// Celery's prefetch multiplier: only 1 (one task per slot) is served.
    fn check_prefetch(&self) -> Result<(), ConfigError> {
        let (prefetch, prefetch_name) = aliased(
            self.worker_prefetch_multiplier,
            (
                "WORKER_PREFETCH_MULTIPLIER",
                "CELERY_WORKER_PREFETCH_MULTIPLIER",
            ),
            1,
        )?;
        if prefetch != 1 {
            return Err(ConfigError {
                variable: prefetch_name,
                reason: format!(
                    "built-in workers lease one task per slot; {prefetch} is not supported (use 1)"
                ),
            });
        }
        Ok(())
    }

    /// The engine settings.
    pub fn task_config(&self, prefix: &str) -> Result<TaskConfig, ConfigError> {
        let (time_limit, soft_time_limit) = self.time_limits()?;
        self.check_prefetch()?;
        Ok(TaskConfig {
            prefix: prefix.to_owned(),
            lease: self.task_lease,
            sweep_interval: self.task_sweep_interval,
            acks_late: aliased(
                self.task_acks_late.map(Flag),
                ("TASK_ACKS_LATE", "CELERY_TASK_ACKS_LATE"),
                Flag(true),
            )?
            .0
            .0,
            soft_time_limit,
            time_limit,
            result_ttl: aliased_duration(
                self.result_expires,
                ("RESULT_EXPIRES", "CELERY_RESULT_EXPIRES"),
                3600,
            )?
            .0,
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
                submit_wait_replicas: self.task_submit_wait_replicas,
                submit_wait_timeout: self.task_submit_wait_timeout,
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

#[cfg(test)]
mod tests {
    use super::Flag;

    /// The alias reads what `TASK_ACKS_LATE` reads: Celery's `True`,
    /// clap's `t`/`f`, `on`/`off`, `1`/`0`; anything else is refused.
    #[test]
    fn flags_read_as_the_setting_does() {
        for (text, want) in [
            ("True", true),
            ("t", true),
            ("on", true),
            ("F", false),
            ("0", false),
        ] {
            assert_eq!(text.parse::<Flag>().map(|f| f.0), Ok(want), "{text}");
        }
        assert!("maybe".parse::<Flag>().is_err());
    }
}
