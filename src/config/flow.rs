//! Flow control's configuration: the rate limits and concurrency caps
//! `koo serve` sets at every start (`KOO_RATE_LIMITS`,
//! `KOO_CONCURRENCY_LIMITS`), each replacing the stored limit of its name
//! (listed with source CONFIG); limits set through the API for other names
//! stay.
//!
//! Both are comma-separated entries, checked at start-up: a bad entry stops
//! koo, naming the variable and quoting the entry.

use std::time::Duration;

use clap::Args;

use super::{ConfigError, parse_duration};
use crate::domain::flow::{
    ConcurrencyLimit, Limit, MAX_COUNT, MAX_PERIOD, Policy, RateLimit, Scope, Source,
};
use crate::domain::task::{Category, QueueName};

const RATE: &str = "KOO_RATE_LIMITS";
const CONCURRENCY: &str = "KOO_CONCURRENCY_LIMITS";

/// Flow control's flags, read by `koo serve`.
#[derive(Debug, Args, Default)]
pub struct FlowArgs {
    /// Global rate limits set at start-up, comma-separated `NAME=LIMIT/PERIOD[:burst=B]`, NAME
    /// one of `queues/<queue>`, `tasks/<task name>`, `keys/<rate_limit_key>`, `keys/*` (e.g.
    /// `keys/openai=50/1s,queues/ai_service=100/1m:burst=10`; `100/m` is `100/1m`). Each
    /// replaces the stored limit of its name; SetRateLimit changes it until the next start.
    #[arg(long, env = RATE, value_name = RATE)]
    pub rate_limits: Option<String>,
    /// Concurrency caps set at start-up, comma-separated `keys/<concurrency_key>=MAX[:POLICY]`
    /// (`keys/*`: every key without a cap of its own; POLICY `wait` (the default),
    /// `cancel_newest` or `cancel_oldest`), e.g. `keys/*=2,keys/tenant-1=5:cancel_oldest`.
    #[arg(long, env = CONCURRENCY, value_name = CONCURRENCY)]
    pub concurrency_limits: Option<String>,
}

impl FlowArgs {
    /// The configured limits, checked; a `queues/` name must be one of the
    /// six category queues or `extra_queues`.
    pub fn limits(&self, extra_queues: &[QueueName]) -> Result<Vec<Limit>, ConfigError> {
        let mut limits = Vec::new();
        for entry in entries(self.rate_limits.as_deref()) {
            let limit = rate_limit(entry, extra_queues).map_err(|why| bad(RATE, entry, why))?;
            limits.push(Limit::Rate(limit));
        }
        for entry in entries(self.concurrency_limits.as_deref()) {
            let limit = concurrency_limit(entry).map_err(|why| bad(CONCURRENCY, entry, why))?;
            limits.push(Limit::Concurrency(limit));
        }
        Ok(limits)
    }
}

fn entries(value: Option<&str>) -> impl Iterator<Item = &str> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

fn bad(variable: &'static str, entry: &str, why: String) -> ConfigError {
    ConfigError {
        variable,
        reason: format!("entry {}: {why}", crate::quote::quote(entry)),
    }
}

/// `NAME=VALUE` as the name's scope and the value.
fn split(entry: &str, example: &str) -> Result<(Scope, String), String> {
    let (name, value) = entry
        .split_once('=')
        .ok_or_else(|| format!("must be NAME={example}"))?;
    let scope = Scope::parse(name.trim()).map_err(|why| format!("the name {why}"))?;
    Ok((scope, value.trim().to_owned()))
}

fn count(what: &str, raw: &str) -> Result<u32, String> {
    match raw.trim().parse::<u32>() {
        Ok(n @ 1..=MAX_COUNT) => Ok(n),
        _ => Err(format!("{what} must be 1 to {MAX_COUNT} (got {raw:?})")),
    }
}

/// `NAME=LIMIT/PERIOD[:burst=B]`.
fn rate_limit(entry: &str, extra_queues: &[QueueName]) -> Result<RateLimit, String> {
    let (scope, value) = split(entry, "LIMIT/PERIOD[:burst=B]")?;
    if let Scope::Queue(q) = &scope {
        let known = QueueName::parse(q)
            .is_ok_and(|q| Category::queues().contains(&q) || extra_queues.contains(&q));
        if !known {
            return Err(format!(
                "no queue {q:?} (the six category queues and KOO_TASK_QUEUES)"
            ));
        }
    }
    let mut parts = value.split(':');
    let rate = parts.next().unwrap_or_default();
    let (limit, period) = rate
        .split_once('/')
        .ok_or_else(|| format!("the value must be LIMIT/PERIOD, e.g. 50/1s (got {rate:?})"))?;
    let limit = count("the limit", limit)?;
    let period = period.trim();
    // `100/m` reads as `100/1m`
    let period = if period.chars().all(|c| c.is_ascii_alphabetic()) {
        format!("1{period}")
    } else {
        period.to_owned()
    };
    let period = parse_duration(&period)?;
    if period < Duration::from_millis(1) || period > MAX_PERIOD {
        return Err(format!("the period must be 1 ms to 24 h (got {period:?})"));
    }
    if period.as_micros() < u128::from(limit) {
        return Err(format!(
            "{limit} per {period:?} is more than one a microsecond"
        ));
    }
    let mut burst = 1;
    for option in parts {
        match option.trim().split_once('=') {
            Some(("burst", b)) => burst = count("burst", b)?,
            _ => return Err(format!("unknown option {option:?} (burst=B is the one)")),
        }
    }
    Ok(RateLimit {
        scope,
        limit,
        period,
        burst,
        source: Source::Config,
    })
}

/// `keys/<key>=MAX[:POLICY]`.
fn concurrency_limit(entry: &str) -> Result<ConcurrencyLimit, String> {
    let (scope, value) = split(entry, "MAX[:POLICY]")?;
    let Scope::Key(key) = scope else {
        return Err("a concurrency cap's name is keys/<concurrency_key> or keys/*".to_owned());
    };
    let (max, policy) = match value.split_once(':') {
        Some((max, policy)) => (max, Some(policy.trim())),
        None => (value.as_str(), None),
    };
    let policy = match policy {
        None => Policy::Wait,
        Some(p) => Policy::parse(p).ok_or_else(|| {
            format!("unknown policy {p:?} (wait, cancel_newest or cancel_oldest)")
        })?,
    };
    Ok(ConcurrencyLimit {
        key,
        max_running: count("the cap", max)?,
        policy,
        source: Source::Config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(rate: &str, concurrency: &str) -> FlowArgs {
        FlowArgs {
            rate_limits: Some(rate.to_owned()),
            concurrency_limits: Some(concurrency.to_owned()),
        }
    }

    /// The examples of `--help` parse as they say.
    #[test]
    fn the_documented_examples_parse() {
        let limits = args(
            "keys/openai=50/1s, queues/ai_service=100/1m:burst=10,tasks/a.b=5/m",
            "keys/*=2,keys/tenant-1=5:cancel_oldest",
        )
        .limits(&[])
        .unwrap();
        let Limit::Rate(openai) = &limits[0] else {
            panic!()
        };
        assert_eq!(
            (openai.limit, openai.period, openai.burst),
            (50, Duration::from_secs(1), 1)
        );
        let Limit::Rate(ai) = &limits[1] else {
            panic!()
        };
        assert_eq!(ai.scope, Scope::Queue("ai_service".into()));
        assert_eq!((ai.period, ai.burst), (Duration::from_secs(60), 10));
        let Limit::Rate(task) = &limits[2] else {
            panic!()
        };
        assert_eq!(task.period, Duration::from_secs(60));
        let Limit::Concurrency(tenant) = &limits[4] else {
            panic!()
        };
        assert_eq!(
            (tenant.key.as_str(), tenant.max_running, tenant.policy),
            ("tenant-1", 5, Policy::CancelOldest)
        );
        assert!(limits.iter().all(|l| match l {
            Limit::Rate(r) => r.source == Source::Config,
            Limit::Concurrency(c) => c.source == Source::Config,
        }));
        assert!(FlowArgs::default().limits(&[]).unwrap().is_empty());
    }

    /// A bad entry names its variable and quotes the entry.
    #[test]
    fn bad_entries_name_the_variable_and_the_entry() {
        for (rate, concurrency, variable, needle) in [
            ("openai=50/1s", "", RATE, "\"openai=50/1s\""),
            ("keys/x=0/1s", "", RATE, "the limit must be 1"),
            ("keys/x=5", "", RATE, "LIMIT/PERIOD"),
            ("keys/x=5/2d", "", RATE, "1 ms to 24 h"),
            ("keys/x=5/1s:burts=2", "", RATE, "unknown option"),
            ("queues/nope=5/1s", "", RATE, "no queue \"nope\""),
            (
                "",
                "queues/ai_service=2",
                CONCURRENCY,
                "keys/<concurrency_key>",
            ),
            ("", "keys/t=2:later", CONCURRENCY, "unknown policy"),
            ("", "keys/t=x", CONCURRENCY, "the cap must be"),
        ] {
            let e = args(rate, concurrency).limits(&[]).unwrap_err();
            assert_eq!(e.variable, variable, "{e}");
            assert!(e.reason.contains(needle), "{e}");
            assert!(e.reason.starts_with("entry \""), "{e}");
        }
        let extra = [QueueName::parse("gpu").unwrap()];
        assert!(args("queues/gpu=5/1s", "").limits(&extra).is_ok());
    }
}
