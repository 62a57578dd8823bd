//! The pool: multiplexed connections to one Redis, made lazily, one per
//! calling thread (see `affinity`), with the breaker and the scripts every
//! call shares.

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

    /// The connection for a call made on this thread: every call of one
    /// thread shares one connection (see [`affinity`]), so that replies to
    /// the calls in flight come back together in one read, instead of a
    /// write and a read each on as many sockets as calls (measured on cache
    /// `Get` at concurrency 16: half the reads, Redis's socket from 21 % to
    /// 12 % of koo's CPU; docs/perf/cache-get.md).
    pub(super) fn conn(&self) -> ConnectionManager {
        let conns = &self.inner.conns;
        conns[affinity::slot() % conns.len()].clone()
    }

    /// The next connection round robin, whatever the thread: for task
    /// transitions (`run_once`). A transition is a script that runs tens of
    /// µs inside Redis; sharing a thread's connection gains nothing there,
    /// and measured on the task benchmark it cost about 7 % of tasks/s
    /// (`RUNS=3 scripts/bench-compare`, against the build before the
    /// thread's connection), so they keep the spread the pool had before.
    pub(super) fn any_conn(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }

    /// Moves this thread to another connection, after an attempt on its own
    /// got no answer (a half-dead connection): the retry, and this thread's
    /// later calls, go elsewhere.
    pub(super) fn other_conn(&self) -> ConnectionManager {
        let conns = &self.inner.conns;
        let n = conns.len();
        // 1 to n-1 connections on: never back to the silent one (unless it
        // is the only one), and threads moving at once spread out
        let step = 1 + self.inner.next.fetch_add(1, Ordering::Relaxed) % (n - 1).max(1);
        conns[affinity::move_by(step) % n].clone()
    }
}

/// Which pooled connection a thread uses. Threads are numbered as they
/// first call, so the runtime's N worker threads spread over the first N
/// connections; a pool larger than the runtime keeps its spare connections
/// for the threads moved by [`move_by`] (and for blocking threads).
mod affinity {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static THREADS: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// This thread's slot.
    pub(super) fn slot() -> usize {
        SLOT.with(|s| match s.get() {
            Some(slot) => slot,
            None => {
                let slot = THREADS.fetch_add(1, Ordering::Relaxed);
                s.set(Some(slot));
                slot
            }
        })
    }

    /// Moves this thread `step` slots on; returns the new slot.
    pub(super) fn move_by(step: usize) -> usize {
        let slot = slot().wrapping_add(step);
        SLOT.with(|s| s.set(Some(slot)));
        slot
    }
}
