//! Flow control's vocabulary: global rate limits (on a queue, a task name
//! or a key) and concurrency caps (on a key), as stored and as the API
//! names them. The lease transition enforces both (see
//! `docs/design/flow-control.md`); this module only says what they are.
//!
//! A limit's *name* is its scope, in the API's resource form:
//! `queues/<queue>`, `tasks/<task name>`, `keys/<key>`, or `keys/*` (every
//! key without a limit of its own). The stores key their records by
//! [`RateLimit::field`] and [`ConcurrencyLimit::field`]: the name behind a
//! one-letter kind, which the lease scripts build from a task's queue,
//! name and keys.

use std::time::Duration;

/// Longest limit name (scope), in bytes.
pub const MAX_NAME: usize = 300;
/// Longest rate-limit or concurrency key a task carries, in bytes.
pub const MAX_KEY: usize = 256;
/// Largest `limit`, `burst` and `max_running`.
pub const MAX_COUNT: u32 = 1_000_000;
/// Longest period of a rate limit, and longest key back-off.
pub const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// What a limit applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every task of a queue.
    Queue(String),
    /// Every task with this name.
    Task(String),
    /// Every task with this key (`*`: every key without its own limit).
    Key(String),
}

impl Scope {
    /// Parses a limit's name (`queues/x`, `tasks/x`, `keys/x`); the error
    /// says what is wrong, for the caller to name its field.
    pub fn parse(name: &str) -> Result<Self, String> {
        if name.len() > MAX_NAME {
            // the caller quotes the name, with its length
            return Err(format!("is over the limit of {MAX_NAME} bytes"));
        }
        let (kind, rest) = name
            .split_once('/')
            .ok_or_else(|| "must be queues/<queue>, tasks/<task name> or keys/<key>".to_owned())?;
        if rest.is_empty() {
            return Err(format!("names no {kind} after the slash"));
        }
        if rest.chars().any(char::is_control) {
            return Err(format!(
                "{} holds control characters",
                crate::quote::quote(rest)
            ));
        }
        match kind {
            "queues" => Ok(Self::Queue(rest.to_owned())),
            "tasks" => Ok(Self::Task(rest.to_owned())),
            "keys" => {
                if rest.len() > MAX_KEY {
                    return Err(format!("a key is at most {MAX_KEY} bytes"));
                }
                Ok(Self::Key(rest.to_owned()))
            }
            other => Err(format!(
                "starts with \"{other}/\": must be queues/, tasks/ or keys/"
            )),
        }
    }

    /// The API's name, e.g. `keys/openai`.
    pub fn name(&self) -> String {
        match self {
            Self::Queue(q) => format!("queues/{q}"),
            Self::Task(t) => format!("tasks/{t}"),
            Self::Key(k) => format!("keys/{k}"),
        }
    }
}

/// Where a limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `KOO_RATE_LIMITS` / `KOO_CONCURRENCY_LIMITS`, set again at every start.
    Config,
    /// The API.
    Api,
}

impl Source {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Api => "api",
        }
    }

    /// From its stored form (anything else reads as `Api`).
    pub fn parse(s: &str) -> Self {
        if s == "config" {
            Self::Config
        } else {
            Self::Api
        }
    }
}

/// A global rate limit: at most `limit` starts per `period`, `burst` at
/// once, as a GCRA bucket (emission interval `period / limit`, tolerance
/// `(burst - 1)` intervals): any window of one period admits at most
/// `limit + burst - 1` tasks, and a steady stream is spaced evenly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// What it limits.
    pub scope: Scope,
    /// Starts per period (1 to [`MAX_COUNT`]).
    pub limit: u32,
    /// The period (1 ms to [`MAX_PERIOD`]).
    pub period: Duration,
    /// Starts at once after a quiet spell (1 to [`MAX_COUNT`]).
    pub burst: u32,
    /// Where it came from.
    pub source: Source,
}

impl RateLimit {
    /// The store's field for a rate limit on `scope`.
    pub fn field_of(scope: &Scope) -> String {
        format!("r:{}", scope.name())
    }

    /// This limit's field in the store.
    pub fn field(&self) -> String {
        Self::field_of(&self.scope)
    }

    /// The emission interval in microseconds (at least 1).
    pub fn interval_us(&self) -> u64 {
        ((self.period.as_micros() / u128::from(self.limit.max(1))) as u64).max(1)
    }

    /// As stored: `limit period_ms burst source`.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {}",
            self.limit,
            self.period.as_millis(),
            self.burst,
            self.source.as_str()
        )
    }

    /// From its field and stored value; `None` when either is not one.
    pub fn decode(field: &str, value: &str) -> Option<Self> {
        let scope = Scope::parse(field.strip_prefix("r:")?).ok()?;
        let mut parts = value.split(' ');
        let limit = parts.next()?.parse().ok()?;
        let period = Duration::from_millis(parts.next()?.parse().ok()?);
        let burst = parts.next()?.parse().ok()?;
        let source = Source::parse(parts.next().unwrap_or("api"));
        Some(Self {
            scope,
            limit,
            period,
            burst,
            source,
        })
    }
}

/// What a task that would start past its key's cap does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// It stays QUEUED until one of the key's tasks ends.
    #[default]
    Wait,
    /// It ends CANCELLED instead of starting.
    CancelNewest,
    /// The key's oldest running task is asked to cancel; it starts when
    /// that one has ended.
    CancelOldest,
}

impl Policy {
    /// As stored (and as the lease scripts read it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wait => "wait",
            Self::CancelNewest => "cancel_newest",
            Self::CancelOldest => "cancel_oldest",
        }
    }

    /// From its stored form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "wait" => Some(Self::Wait),
            "cancel_newest" => Some(Self::CancelNewest),
            "cancel_oldest" => Some(Self::CancelOldest),
            _ => None,
        }
    }
}

/// A cap on the running tasks of one concurrency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcurrencyLimit {
    /// The key (`*`: every key without a cap of its own).
    pub key: String,
    /// At most this many run at once (1 to [`MAX_COUNT`]).
    pub max_running: u32,
    /// What a task past the cap does.
    pub policy: Policy,
    /// Where it came from.
    pub source: Source,
}

impl ConcurrencyLimit {
    /// The store's field for the cap of `key`.
    pub fn field_of(key: &str) -> String {
        format!("c:keys/{key}")
    }

    /// This cap's field in the store.
    pub fn field(&self) -> String {
        Self::field_of(&self.key)
    }

    /// As stored: `max_running policy source`.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {}",
            self.max_running,
            self.policy.as_str(),
            self.source.as_str()
        )
    }

    /// From its field and stored value; `None` when either is not one.
    pub fn decode(field: &str, value: &str) -> Option<Self> {
        let key = field.strip_prefix("c:keys/")?.to_owned();
        let mut parts = value.split(' ');
        let max_running = parts.next()?.parse().ok()?;
        let policy = Policy::parse(parts.next()?)?;
        let source = Source::parse(parts.next().unwrap_or("api"));
        Some(Self {
            key,
            max_running,
            policy,
            source,
        })
    }
}

/// A limit of either kind, as a store lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// A rate limit.
    Rate(RateLimit),
    /// A concurrency cap.
    Concurrency(ConcurrencyLimit),
}

impl Limit {
    /// The store's field.
    pub fn field(&self) -> String {
        match self {
            Self::Rate(r) => r.field(),
            Self::Concurrency(c) => c.field(),
        }
    }

    /// As stored.
    pub fn encode(&self) -> String {
        match self {
            Self::Rate(r) => r.encode(),
            Self::Concurrency(c) => c.encode(),
        }
    }

    /// From a stored field and value.
    pub fn decode(field: &str, value: &str) -> Option<Self> {
        if field.starts_with("r:") {
            RateLimit::decode(field, value).map(Self::Rate)
        } else {
            ConcurrencyLimit::decode(field, value).map(Self::Concurrency)
        }
    }

    /// Whether the lease must look it up on every call (a queue's or a task
    /// name's rate limit); key limits are looked up only for tasks with a
    /// key, whatever the process knows.
    pub fn is_per_call(&self) -> bool {
        matches!(
            self,
            Self::Rate(RateLimit {
                scope: Scope::Queue(_) | Scope::Task(_),
                ..
            })
        )
    }
}

/// A limit's live state, as GetRateLimit and GetConcurrencyLimit show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitState {
    /// A rate limit's bucket: when its next task may start (ms since the
    /// epoch; `None` when the bucket is idle: now).
    pub next_free_ms: Option<i64>,
    /// A key's back-off from a worker's 429: until when (ms).
    pub backoff_until_ms: Option<i64>,
    /// A concurrency key's running tasks.
    pub running: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_refuse_what_is_not_one() {
        for name in ["queues/ai_service", "tasks/a.b", "keys/openai", "keys/*"] {
            assert_eq!(Scope::parse(name).unwrap().name(), name);
        }
        assert!(Scope::parse("openai").is_err());
        assert!(Scope::parse("keys/").is_err());
        assert!(Scope::parse("users/x").is_err());
        assert!(Scope::parse(&format!("keys/{}", "k".repeat(257))).is_err());
        assert!(Scope::parse("keys/a\nb").is_err());
    }

    #[test]
    fn limits_round_trip_through_their_stored_form() {
        let r = Limit::Rate(RateLimit {
            scope: Scope::Key("openai".into()),
            limit: 50,
            period: Duration::from_secs(1),
            burst: 5,
            source: Source::Config,
        });
        assert_eq!(Limit::decode(&r.field(), &r.encode()), Some(r.clone()));
        assert!(!r.is_per_call());
        let c = Limit::Concurrency(ConcurrencyLimit {
            key: "*".into(),
            max_running: 2,
            policy: Policy::CancelOldest,
            source: Source::Api,
        });
        assert_eq!(Limit::decode(&c.field(), &c.encode()), Some(c));
        assert_eq!(Limit::decode("r:keys/x", "nonsense"), None);
    }

    #[test]
    fn the_interval_is_the_period_over_the_limit() {
        let r = RateLimit {
            scope: Scope::Queue("q".into()),
            limit: 50,
            period: Duration::from_secs(1),
            burst: 1,
            source: Source::Api,
        };
        assert_eq!(r.interval_us(), 20_000);
    }
}
