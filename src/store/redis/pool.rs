//! The pool: multiplexed connections to one Redis, made lazily, handed out
//! round robin, with the breaker and the scripts every call shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError, Script};

use super::breaker::Breaker;
use super::{RedisConfig, is_tls, recovery, redact, tasks};
use crate::store::{Result, StoreError};

/// A handle to the Redis backend; clones share the pool and breaker.
#[derive(Clone)]
pub struct RedisStore {
    pub(super) inner: Arc<Inner>,
}

/// What every clone of a [`RedisStore`] shares.
pub(super) struct Inner {
    pub(super) conns: Vec<ConnectionManager>,
    pub(super) next: AtomicUsize,
    pub(super) breaker: Breaker,
    pub(super) retry_on_timeout: bool,
    pub(super) retries: u32,
    /// How long an attempt must have waited in vain before its timeout counts
    /// against the breaker.
    pub(super) timeout_evidence: Duration,
    pub(super) del_if_persistent: Script,
    pub(super) tasks: tasks::TaskScripts,
    /// For connections of their own (blocking reads must not hold up the
    /// pooled, multiplexed connections).
    pub(super) client: redis::Client,
    pub(super) connect_timeout: Duration,
}

impl RedisStore {
    /// Builds the pool. Connections are made lazily, so koo starts (and
    /// reports NOT_SERVING) while Redis is down; only a malformed URL fails.
    /// Starts the store's recovery prober (see `recovery`).
    pub fn connect(config: &RedisConfig) -> Result<Self> {
        let bad = |e: RedisError| StoreError::InvalidConfig(format!("REDIS_URL: {e}"));
        let info = config.url.as_str().into_connection_info().map_err(bad)?;
        // Small commands should not wait for Nagle, keepalive or not.
        let mut tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        if config.keepalive {
            tcp = tcp.set_keepalive(
                redis::io::tcp::socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(10)),
            );
        }
        let info = info.set_tcp_settings(tcp);
        let client = match &config.tls {
            // The one place a Redis client is built: the cache's, the tasks',
            // the watchers' and those of `koo worker` and `koo scheduler`.
            Some(tls) if is_tls(&config.url) => {
                redis::Client::build_with_tls(info, tls.certificates()).map_err(bad)?
            }
            Some(_) => {
                return Err(StoreError::InvalidConfig(format!(
                    "REDIS_URL: {} is plaintext but TLS files are set; use rediss://",
                    redact(&config.url)
                )));
            }
            None => redis::Client::open(info).map_err(bad)?,
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let conns = (0..config.max_connections.max(1))
            .map(|_| {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(bad)?;
        let inner = Arc::new(Inner {
            conns,
            next: AtomicUsize::new(0),
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            retry_on_timeout: config.retry_on_timeout,
            retries: config.retries,
            timeout_evidence: config.connect_timeout,
            del_if_persistent: Script::new(include_str!("lua/del_if_persistent.lua")),
            tasks: tasks::TaskScripts::new(),
            client: client.clone(),
            connect_timeout: config.connect_timeout,
        });
        recovery::start(Arc::downgrade(&inner), inner.breaker.watch());
        Ok(Self { inner })
    }

    /// The next connection, round robin. (A connection per calling thread
    /// halved the reads per cache Get, docs/perf/cache-get.md, but pinned a
    /// thread to a connection still in its reconnect backoff after a Redis
    /// restart, where a worker's recovery then took over 5 s in CI, and cost
    /// the task path about 7 %: withdrawn until it can follow the
    /// connections' health.)
    pub(super) fn conn(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }
}
