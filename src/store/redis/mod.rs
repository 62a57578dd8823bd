//! The Redis backend: a pool of multiplexed connections with per-call
//! deadlines, retries with exponential backoff and jitter, and a circuit
//! breaker.
//!
//! Every call is bounded by its [`Deadline`](crate::store::Deadline): a call never waits past it,
//! whatever Redis does (down, paused, slow). Transient failures (I/O errors,
//! refused connections, `LOADING`/`BUSY`-style replies, and timeouts when
//! `REDIS_RETRY_ON_TIMEOUT` is on) are retried while the deadline allows; all
//! operations here are idempotent, so a retry cannot apply a write twice in a
//! way that matters.

mod acl;
mod breaker;
mod bus;
mod call;
pub(crate) mod conn;
mod gather;
mod info;
mod keyevents;
mod kv;
mod lock;
mod partial;
mod pool;
mod records;
mod recovery;
mod scan;
mod schedules;
mod script;
mod sentinel;
mod slots;
mod tags;
mod tasks;
mod tls;
pub mod topology;
pub mod url;
mod walk;

pub use self::acl::REDIS_ACL_RULES;
pub use self::bus::keyevent_channels;
pub use self::keyevents::Messages;
pub use self::pool::RedisStore;
pub use self::schedules::RedisSchedules;
pub use self::tasks::{RedisTasks, StreamReader, SubmitWatch, Woken};
pub use self::tls::{RedisTls, TlsError, TlsPart};
pub use self::url::{is_tls, redact};

// The task scripts and connections reach the pool through these names.
use self::pool::Inner;

use std::time::Duration;

/// Settings of the Redis backend.
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis[s]://[user:password@]host:port/db`.
    pub url: String,
    /// The setting the URL came from (`REDIS_URL`, `TASK_BROKER_URL`, ...),
    /// named in every message about it.
    pub setting: &'static str,
    /// CA and client certificate for a `rediss://` URL; `None` trusts the
    /// system roots and presents no client certificate.
    pub tls: Option<RedisTls>,
    /// Multiplexed connections in the pool.
    pub max_connections: usize,
    /// Whether a timed-out call is retried (if the deadline allows).
    pub retry_on_timeout: bool,
    /// Whether TCP keepalive probes are sent on idle connections.
    pub keepalive: bool,
    /// Bound on establishing one connection.
    pub connect_timeout: Duration,
    /// Extra attempts after a transient failure.
    pub retries: u32,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a trial call.
    pub breaker_cooldown: Duration,
}

impl RedisConfig {
    /// Defaults for the given URL, as documented for the seed's variables.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            setting: "REDIS_URL",
            tls: None,
            max_connections: 20,
            retry_on_timeout: true,
            keepalive: true,
            connect_timeout: Duration::from_secs(1),
            retries: 3,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    /// The URL without its password (settings may be logged).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("tls", &self.tls)
            .field("max_connections", &self.max_connections)
            .field("retry_on_timeout", &self.retry_on_timeout)
            .field("keepalive", &self.keepalive)
            .field("connect_timeout", &self.connect_timeout)
            .field("retries", &self.retries)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .finish()
    }
}
