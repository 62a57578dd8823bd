//! The pool: multiplexed connections to one Redis (or to a Cluster), made
//! lazily, handed out round robin, with the breaker and the scripts every call shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::Script;

use super::breaker::Breaker;
use super::conn::{Conn, Connector};
use super::gather::Gather;
use super::{RedisConfig, recovery, tasks};
use crate::store::Result;

/// A handle to the Redis backend; clones share the pool and breaker.
#[derive(Clone)]
pub struct RedisStore {
    pub(super) inner: Arc<Inner>,
}

/// What every clone of a [`RedisStore`] shares.
pub(super) struct Inner {
    pub(super) conns: Vec<Conn>,
    pub(super) next: AtomicUsize,
    pub(super) breaker: Breaker,
    pub(super) retry_on_timeout: bool,
    pub(super) retries: u32,
    /// How long an attempt must have waited in vain before its timeout counts
    /// against the breaker.
    pub(super) timeout_evidence: Duration,
    pub(super) del_if_persistent: Script,
    pub(super) tasks: tasks::TaskScripts,
    /// For connections of their own (blocking reads and Pub/Sub must not
    /// hold up the pooled, multiplexed connections).
    pub(super) connector: Connector,
    pub(super) connect_timeout: Duration,
    /// Concurrent cache reads, gathered into pipelines.
    pub(super) gather: Gather,
}

impl RedisStore {
    /// Builds the pool. Connections are made lazily, so koo starts (and
    /// reports NOT_SERVING) while Redis is down; only a malformed URL fails.
    /// Starts the store's recovery prober (see `recovery`).
    pub fn connect(config: &RedisConfig) -> Result<Self> {
        let connector = Connector::new(config)?;
        let conns = connector.pooled(config.max_connections, config)?;
        let inner = Arc::new(Inner {
            conns,
            next: AtomicUsize::new(0),
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            retry_on_timeout: config.retry_on_timeout,
            retries: config.retries,
            timeout_evidence: config.connect_timeout,
            del_if_persistent: Script::new(include_str!("lua/del_if_persistent.lua")),
            tasks: tasks::TaskScripts::new(),
            connector,
            connect_timeout: config.connect_timeout,
            gather: Gather::default(),
        });
        let name = format!("{} {}", config.setting, super::url::redact(&config.url));
        recovery::start(Arc::downgrade(&inner), inner.breaker.watch(), name);
        Ok(Self { inner })
    }

    /// Whether this store is a Redis Cluster (see [`Connector::is_cluster`]).
    pub fn is_cluster(&self) -> bool {
        self.inner.connector.is_cluster()
    }

    /// The next connection, round robin. (A connection per calling thread
    /// halved the reads per cache Get, docs/perf/cache-get.md, but pinned a
    /// thread to a connection still in its reconnect backoff after a Redis
    /// restart, where a worker's recovery then took over 5 s in CI, and cost
    /// the task path about 7 %: withdrawn until it can follow the
    /// connections' health.)
    pub(super) fn conn(&self) -> Conn {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }
}
