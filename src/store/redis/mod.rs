//! The Redis backend: a pool of multiplexed connections with per-call
//! deadlines, retries with exponential backoff and jitter, and a circuit
//! breaker.
//!
//! Every call is bounded by its [`Deadline`]: a call never waits past it,
//! whatever Redis does (down, paused, slow). Transient failures (I/O errors,
//! refused connections, `LOADING`/`BUSY`-style replies, and timeouts when
//! `REDIS_RETRY_ON_TIMEOUT` is on) are retried while the deadline allows; all
//! operations here are idempotent, so a retry cannot apply a write twice in a
//! way that matters.

mod acl;
mod breaker;
mod recovery;
mod schedules;
mod script;
mod tasks;
mod tls;
pub mod url;

pub use self::acl::REDIS_ACL_RULES;
pub use self::tasks::{RedisTasks, StreamReader};
pub use self::tls::{RedisTls, TlsError, TlsPart};
pub use self::url::{is_tls, redact};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, RetryMethod, Script,
};
use tokio::sync::watch;

use self::breaker::{Breaker, Evidence};
use super::{
    CircuitState, CleanupCounts, Deadline, Entry, KeySize, LastError, MemoryReport, Result,
    ScanPage, StoreError, Write, unix_millis,
};

/// Keys handed to one `UNLINK` or cleanup script call, and the `COUNT` hint
/// of bulk scans: large enough to amortise round trips, small enough not to
/// block Redis noticeably.
const BULK_BATCH: usize = 1000;

/// The most `SCAN` calls one listing page makes before it returns what it has
/// (possibly nothing) with a cursor to continue: a sparse pattern over a huge
/// keyspace must not turn one RPC into a full walk.
const MAX_SCANS_PER_PAGE: usize = 64;

/// The least time one attempt gets when `REDIS_RETRY_ON_TIMEOUT` splits a
/// call's deadline between attempts.
const ATTEMPT_FLOOR: Duration = Duration::from_millis(250);

/// Settings of the Redis backend.
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis[s]://[user:password@]host:port/db`.
    pub url: String,
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

/// A handle to the Redis backend; clones share the pool and breaker.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
    breaker: Breaker,
    retry_on_timeout: bool,
    retries: u32,
    /// How long an attempt must have waited in vain before its timeout counts
    /// against the breaker.
    timeout_evidence: Duration,
    del_if_persistent: Script,
    tasks: tasks::TaskScripts,
    /// For connections of their own (blocking reads must not hold up the
    /// pooled, multiplexed connections).
    client: redis::Client,
    connect_timeout: Duration,
}

/// How a failed call should be handled.
enum Failure {
    /// Redis could not be reached or did not answer; retry if time allows.
    Transient(String),
    /// Redis answered with an error that retrying will not fix.
    Permanent(StoreError),
}

/// Whether Redis answered with error `code`, alone or inside a pipeline or
/// transaction.
fn has_code(err: &RedisError, code: &str) -> bool {
    err.code() == Some(code)
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == code))
}

fn classify(err: &RedisError) -> Failure {
    if has_code(err, "OOM") {
        return Failure::Permanent(StoreError::OutOfMemory(err.to_string()));
    }
    if has_code(err, "WRONGTYPE") {
        return Failure::Permanent(StoreError::WrongType(err.to_string()));
    }
    match err.kind() {
        // Redis answered, but not in the shape expected (e.g. a key that is
        // not UTF-8): retrying cannot help, and Redis is not at fault.
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            Failure::Permanent(StoreError::Backend(err.to_string()))
        }
        _ => match err.retry_method() {
            RetryMethod::NoRetry => Failure::Permanent(StoreError::Backend(err.to_string())),
            _ => Failure::Transient(err.to_string()),
        },
    }
}

/// Exponential backoff with full jitter: 10 ms, 20 ms, 40 ms... capped at 1 s.
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(10u64 << attempt.min(7)).min(Duration::from_secs(1));
    rand::rng().random_range(cap / 2..=cap)
}

impl RedisStore {
    /// Builds the pool. Connections are made lazily, so koo starts (and
    /// reports NOT_SERVING) while Redis is down; only a malformed URL fails.
    /// Starts the store's recovery prober (see [`recovery`]).
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

    fn conn(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }

    /// Runs `call` on a pooled connection under the breaker, the deadline and
    /// the retry policy.
    ///
    /// A call keeps its connection across retries after an error: a
    /// `ConnectionManager` reconnects itself after an I/O error, so the retry
    /// repairs it, whereas hopping to the next pooled connection after a Redis
    /// restart would only meet the next broken one. After an attempt that got
    /// no answer (a half-dead connection), the retry takes another connection.
    /// A failed call counts once against the breaker, however many attempts it
    /// made, and only when one of them showed that Redis is down (see
    /// [`Evidence`]); a call that merely ran out of its caller's time is
    /// `DEADLINE_EXCEEDED` and counts for nothing.
    async fn run<T, F, Fut>(&self, deadline: Deadline, mut call: F) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        let admission = inner.breaker.admit()?;
        let mut evidence = Evidence::default();
        let mut conn = self.conn();
        let mut attempt = 0;
        loop {
            let remaining = deadline.remaining();
            // With REDIS_RETRY_ON_TIMEOUT an attempt gets half the time left
            // (at least ATTEMPT_FLOOR), leaving room to retry elsewhere.
            let budget = if inner.retry_on_timeout && attempt < inner.retries {
                (remaining / 2).max(ATTEMPT_FLOOR).min(remaining)
            } else {
                remaining
            };
            let started = Instant::now();
            let failure = match tokio::time::timeout(budget, call(conn.clone())).await {
                Ok(Ok(value)) => {
                    admission.succeeded();
                    return Ok(value);
                }
                Ok(Err(err)) => match classify(&err) {
                    Failure::Permanent(e) => {
                        admission.succeeded();
                        return Err(e);
                    }
                    Failure::Transient(message) => evidence.down(message),
                },
                Err(_) => {
                    let message = evidence.silent(started.elapsed(), inner.timeout_evidence);
                    if deadline.remaining().is_zero() {
                        return Err(evidence.settle(admission, StoreError::DeadlineExceeded));
                    }
                    conn = self.conn();
                    message
                }
            };
            let pause = backoff(attempt);
            if attempt >= inner.retries || pause >= deadline.remaining() || !admission.may_retry() {
                let unreachable = StoreError::Unavailable(format!(
                    "Redis unreachable after {} attempt(s): {failure}",
                    attempt + 1
                ));
                return Err(evidence.settle(admission, unreachable));
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// Runs a call that must not run twice (a script that moves a task):
    /// like [`Self::run`], but only a refused connection, where the request
    /// surely never left, is retried. After a timeout or a dropped
    /// connection the request may have run, so the caller is told the
    /// outcome is unknown rather than risk running it again. As in
    /// [`Self::run`], only evidence that Redis is down counts against the
    /// breaker.
    async fn run_once<T, F, Fut>(&self, deadline: Deadline, mut call: F) -> Result<T>
    where
        F: FnMut(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        let admission = inner.breaker.admit()?;
        let mut evidence = Evidence::default();
        let conn = self.conn();
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let err = match tokio::time::timeout_at(deadline.instant(), call(conn.clone())).await {
                Ok(Ok(value)) => {
                    admission.succeeded();
                    return Ok(value);
                }
                Ok(Err(err)) => err,
                Err(_) => {
                    evidence.silent(started.elapsed(), inner.timeout_evidence);
                    return Err(evidence.settle(admission, StoreError::DeadlineExceeded));
                }
            };
            let message = match classify(&err) {
                Failure::Permanent(e) => {
                    admission.succeeded();
                    return Err(e);
                }
                Failure::Transient(message) => evidence.down(message),
            };
            let pause = backoff(attempt);
            if !err.is_connection_refusal()
                || attempt >= inner.retries
                || pause >= deadline.remaining()
                || !admission.may_retry()
            {
                let unknown = StoreError::Unavailable(format!(
                    "Redis failed after {} attempt(s) (the request may or may not have been applied): {message}",
                    attempt + 1
                ));
                return Err(evidence.settle(admission, unknown));
            }
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd, deadline: Deadline) -> Result<T> {
        self.run(
            deadline,
            |mut c| async move { cmd.query_async(&mut c).await },
        )
        .await
    }

    async fn query_pipe<T: FromRedisValue>(
        &self,
        pipe: &Pipeline,
        deadline: Deadline,
    ) -> Result<T> {
        self.run(
            deadline,
            |mut c| async move { pipe.query_async(&mut c).await },
        )
        .await
    }

    /// One `SCAN` step. Keys come back as bytes: anything can write into a
    /// shared Redis, and a key that is not UTF-8 must not fail the walk.
    async fn scan_step(
        &self,
        pattern: &str,
        cursor: u64,
        count: usize,
        deadline: Deadline,
    ) -> Result<(u64, Vec<Vec<u8>>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        self.query(&cmd, deadline).await
    }

    /// Every key matching `pattern`, a `SCAN` batch at a time.
    fn batches<'a>(&'a self, pattern: &'a str, deadline: Deadline) -> KeyBatches<'a> {
        KeyBatches {
            store: self,
            pattern,
            cursor: Some(0),
            deadline,
        }
    }

    /// `UNLINK`s keys given as bytes; how many existed.
    async fn unlink(&self, keys: &[Vec<u8>], deadline: Deadline) -> Result<u64> {
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(keys);
        self.query(&cmd, deadline).await
    }

    pub(super) async fn get(&self, key: &str, deadline: Deadline) -> Result<Option<Entry>> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        let (value, pttl): (Option<Vec<u8>>, i64) = self.query_pipe(&pipe, deadline).await?;
        Ok(value.map(|v| entry(v, pttl)))
    }

    pub(super) async fn get_many(
        &self,
        keys: &[String],
        deadline: Deadline,
    ) -> Result<Vec<Option<Entry>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        }
        let replies: Vec<(Option<Vec<u8>>, i64)> = self.query_pipe(&pipe, deadline).await?;
        Ok(replies
            .into_iter()
            .map(|(v, pttl)| v.map(|v| entry(v, pttl)))
            .collect())
    }

    pub(super) async fn set(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value.as_ref())
            .arg("PX")
            .arg(ttl_millis(ttl));
        self.query::<()>(&cmd, deadline).await
    }

    pub(super) async fn set_many(&self, writes: Vec<Write>, deadline: Deadline) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for w in &writes {
            pipe.cmd("SET")
                .arg(&w.key)
                .arg(w.value.as_ref())
                .arg("PX")
                .arg(ttl_millis(w.ttl))
                .ignore();
        }
        self.query_pipe::<()>(&pipe, deadline).await
    }

    pub(super) async fn sizes(&self, keys: &[String], deadline: Deadline) -> Result<Vec<u64>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("STRLEN").arg(key);
        }
        self.query_pipe(&pipe, deadline).await
    }

    pub(super) async fn delete(&self, keys: &[String], deadline: Deadline) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(keys);
        self.query(&cmd, deadline).await
    }

    pub(super) async fn scan(
        &self,
        pattern: &str,
        cursor: Option<&str>,
        page_size: usize,
        deadline: Deadline,
    ) -> Result<ScanPage> {
        // The listing always continues from the cursor SCAN itself returned,
        // which is what makes SCAN return every key present for the whole
        // walk even across rehashing. A batch larger than the room left on
        // the page is not cut by resuming inside it (a re-scan of the same
        // cursor may cover other buckets after a resize); its overflow
        // travels in the cursor and opens the next page.
        let (mut cursor, mut pending) = match cursor {
            None => (Some(0), Vec::new()),
            Some(c) => parse_cursor(c)?,
        };
        let mut page = ScanPage::default();
        let take = |page: &mut ScanPage, pending: &mut Vec<String>| {
            let n = pending.len().min(page_size - page.keys.len());
            page.keys.extend(pending.drain(..n));
        };
        take(&mut page, &mut pending);
        for _ in 0..MAX_SCANS_PER_PAGE {
            let Some(at) = cursor else { break };
            if page.keys.len() == page_size {
                break;
            }
            let room = page_size - page.keys.len();
            let (next, batch) = self
                .scan_step(pattern, at, room.clamp(10, BULK_BATCH), deadline)
                .await?;
            cursor = (next != 0).then_some(next);
            // Keys that are not UTF-8 cannot be koo's and are left out.
            pending.extend(batch.into_iter().filter_map(|k| String::from_utf8(k).ok()));
            take(&mut page, &mut pending);
        }
        if cursor.is_some() || !pending.is_empty() {
            page.cursor = Some(format_cursor(cursor, &pending));
        }
        Ok(page)
    }

    pub(super) async fn clear(&self, pattern: &str, deadline: Deadline) -> Result<u64> {
        let mut deleted = 0;
        let mut batches = self.batches(pattern, deadline);
        while let Some(keys) = batches.next().await? {
            deleted += self.unlink(&keys, deadline).await?;
        }
        Ok(deleted)
    }

    pub(super) async fn count_by_prefix(
        &self,
        pattern: &str,
        prefixes: &[String],
        deadline: Deadline,
    ) -> Result<Vec<u64>> {
        let mut counts = vec![0; prefixes.len()];
        let mut batches = self.batches(pattern, deadline);
        while let Some(keys) = batches.next().await? {
            for key in keys {
                if let Some(i) = prefixes.iter().position(|p| key.starts_with(p.as_bytes())) {
                    counts[i] += 1;
                }
            }
        }
        Ok(counts)
    }

    pub(super) async fn cleanup(&self, pattern: &str, deadline: Deadline) -> Result<CleanupCounts> {
        let mut counts = CleanupCounts::default();
        let mut batches = self.batches(pattern, deadline);
        while let Some(keys) = batches.next().await? {
            counts.scanned += keys.len() as u64;
            let mut invocation = self.inner.del_if_persistent.prepare_invoke();
            for key in &keys {
                invocation.key(key.as_slice());
            }
            let invocation = &invocation;
            let removed: u64 = self
                .run(deadline, |mut c| async move {
                    invocation.invoke_async(&mut c).await
                })
                .await?;
            counts.removed_without_ttl += removed;
        }
        Ok(counts)
    }

    pub(super) async fn largest_keys(
        &self,
        pattern: &str,
        sample: usize,
        top: usize,
        deadline: Deadline,
    ) -> Result<(u64, Vec<KeySize>)> {
        let mut keys = Vec::new();
        let mut cursor = 0;
        while keys.len() < sample {
            let (next, batch) = self
                .scan_step(pattern, cursor, BULK_BATCH, deadline)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.truncate(sample);
        if keys.is_empty() {
            return Ok((0, Vec::new()));
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("MEMORY").arg("USAGE").arg(key.as_slice());
        }
        let usage: Vec<Option<u64>> = self.query_pipe(&pipe, deadline).await?;
        let mut sizes: Vec<KeySize> = keys
            .into_iter()
            .zip(usage)
            .filter_map(|(key, bytes)| {
                Some(KeySize {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    bytes: bytes?,
                })
            })
            .collect();
        let sampled = sizes.len() as u64;
        sizes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.key.cmp(&b.key)));
        sizes.truncate(top);
        Ok((sampled, sizes))
    }

    /// Redis's memory figures from `INFO memory`. A user whose ACL does not
    /// grant `INFO` (it is optional, see [`acl`]) gets a report that says
    /// the figures are unknown instead of an error, so that health, metrics
    /// and maintenance degrade rather than fail.
    pub(super) async fn memory(&self, deadline: Deadline) -> Result<MemoryReport> {
        let info: Option<String> = self
            .run(deadline, |mut c| async move {
                let mut cmd = redis::cmd("INFO");
                cmd.arg("memory");
                match cmd.query_async(&mut c).await {
                    Err(e) if has_code(&e, "NOPERM") => Ok(None),
                    other => other.map(Some),
                }
            })
            .await?;
        Ok(match info {
            Some(info) => parse_memory_info(&info),
            None => MemoryReport::unknown("INFO not permitted for koo's Redis user"),
        })
    }

    pub(super) fn circuit_state(&self) -> CircuitState {
        self.inner.breaker.state()
    }

    pub(super) fn watch_circuit(&self) -> watch::Receiver<CircuitState> {
        self.inner.breaker.watch()
    }

    pub(super) fn last_error(&self) -> Option<LastError> {
        self.inner.breaker.last_error()
    }

    pub(super) async fn publish_record(
        &self,
        index: &str,
        key: &str,
        member: &str,
        payload: Bytes,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        let ms = ttl_millis(ttl);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(key)
            .arg(payload.as_ref())
            .arg("PX")
            .arg(ms)
            .ignore();
        pipe.cmd("ZADD")
            .arg(index)
            .arg(unix_millis(SystemTime::now()))
            .arg(member)
            .ignore();
        pipe.cmd("PEXPIRE").arg(index).arg(ms).ignore();
        // Members that stopped publishing leave the index here, so that it
        // stays bounded even if no one runs a cleanup; their records expire.
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(index)
            .arg("-inf")
            .arg(format!("({}", unix_millis(SystemTime::now()) - ms as i64))
            .ignore();
        self.query_pipe::<()>(&pipe, deadline).await
    }

    pub(super) async fn read_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: &(dyn Fn(&str) -> String + Sync),
        deadline: Deadline,
    ) -> Result<Vec<(String, Bytes)>> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(index).arg(unix_millis(since)).arg("+inf");
        let members: Vec<Vec<u8>> = self.query(&cmd, deadline).await?;
        let members: Vec<String> = members
            .into_iter()
            .filter_map(|m| String::from_utf8(m).ok())
            .collect();
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for m in &members {
            mget.arg(key_of(m));
        }
        let payloads: Vec<Option<Vec<u8>>> = self.query(&mget, deadline).await?;
        Ok(members
            .into_iter()
            .zip(payloads)
            .filter_map(|(m, p)| Some((m, Bytes::from(p?))))
            .collect())
    }

    pub(super) async fn remove_stale_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: &(dyn Fn(&str) -> String + Sync),
        deadline: Deadline,
    ) -> Result<u64> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(index)
            .arg("-inf")
            .arg(format!("({}", unix_millis(since)));
        let stale: Vec<Vec<u8>> = self.query(&cmd, deadline).await?;
        if stale.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for m in &stale {
            if let Ok(member) = std::str::from_utf8(m) {
                pipe.cmd("UNLINK").arg(key_of(member)).ignore();
            }
        }
        pipe.cmd("ZREM").arg(index).arg(&stale).ignore();
        self.query_pipe::<()>(&pipe, deadline).await?;
        Ok(stale.len() as u64)
    }
}

/// A walk over the keys matching a pattern, one non-empty `SCAN` batch at a time.
struct KeyBatches<'a> {
    store: &'a RedisStore,
    pattern: &'a str,
    /// `None` once the walk is complete.
    cursor: Option<u64>,
    deadline: Deadline,
}

impl KeyBatches<'_> {
    async fn next(&mut self) -> Result<Option<Vec<Vec<u8>>>> {
        while let Some(cursor) = self.cursor {
            let (next, keys) = self
                .store
                .scan_step(self.pattern, cursor, BULK_BATCH, self.deadline)
                .await?;
            self.cursor = (next != 0).then_some(next);
            if !keys.is_empty() {
                return Ok(Some(keys));
            }
        }
        Ok(None)
    }
}

fn entry(value: Vec<u8>, pttl: i64) -> Entry {
    Entry {
        value: Bytes::from(value),
        // -1: no TTL; -2: gone between GET and PTTL (treated as about to expire).
        ttl: match pttl {
            -1 => None,
            ms => Some(Duration::from_millis(ms.max(0) as u64)),
        },
    }
}

/// Whole milliseconds, rounded up so that Redis never expires a key early.
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// `r:{SCAN cursor, or - when SCAN is done}:{JSON array of keys already
/// scanned but not yet returned}`.
fn format_cursor(cursor: Option<u64>, pending: &[String]) -> String {
    let pending = serde_json::to_string(pending).unwrap_or_else(|_| "[]".to_owned());
    match cursor {
        Some(c) => format!("r:{c}:{pending}"),
        None => format!("r:-:{pending}"),
    }
}

fn parse_cursor(cursor: &str) -> Result<(Option<u64>, Vec<String>)> {
    let bad = || {
        StoreError::InvalidCursor(format!(
            "{} is not a Redis cursor",
            crate::quote::quote(cursor)
        ))
    };
    let rest = cursor.strip_prefix("r:").ok_or_else(bad)?;
    let (c, pending) = rest.split_once(':').ok_or_else(bad)?;
    let at = match c {
        "-" => None,
        c => Some(c.parse().map_err(|_| bad())?),
    };
    Ok((at, serde_json::from_str(pending).map_err(|_| bad())?))
}

fn parse_memory_info(info: &str) -> MemoryReport {
    let mut report = MemoryReport::default();
    for line in info.lines() {
        let Some((name, value)) = line.trim().split_once(':') else {
            continue;
        };
        match name {
            "used_memory" => report.used = value.parse().unwrap_or(0),
            "used_memory_peak" => report.peak = value.parse().unwrap_or(0),
            "mem_fragmentation_ratio" => report.fragmentation = value.parse().unwrap_or(0.0),
            "maxmemory" => report.max = value.parse().unwrap_or(0),
            "maxmemory_policy" => report.policy = value.to_owned(),
            _ => {}
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// INFO memory is parsed field by field, unknown lines ignored.
    #[test]
    fn parses_info_memory() {
        let info = "# Memory\r\nused_memory:1024\r\nused_memory_peak:2048\r\nmem_fragmentation_ratio:1.50\r\nmaxmemory:0\r\nmaxmemory_policy:allkeys-lru\r\nother:x\r\n";
        let r = parse_memory_info(info);
        assert_eq!(r.used, 1024);
        assert_eq!(r.peak, 2048);
        assert!((r.fragmentation - 1.5).abs() < 1e-9);
        assert_eq!(r.max, 0);
        assert_eq!(r.policy, "allkeys-lru");
    }

    /// Cursors round-trip and foreign ones are refused.
    #[test]
    fn cursor_format() {
        let pending = vec!["a:b".to_owned(), "x\"y".to_owned()];
        assert_eq!(
            parse_cursor(&format_cursor(Some(42), &pending)).unwrap(),
            (Some(42), pending.clone())
        );
        assert_eq!(
            parse_cursor(&format_cursor(None, &[])).unwrap(),
            (None, vec![])
        );
        assert!(matches!(
            parse_cursor("m:key"),
            Err(StoreError::InvalidCursor(_))
        ));
        assert!(parse_cursor("r:x:[]").is_err());
        assert!(parse_cursor("r:1:zz").is_err());
    }

    /// Backoff grows and stays capped.
    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            let b = backoff(attempt);
            assert!(b <= Duration::from_secs(1), "{b:?}");
            assert!(b >= Duration::from_millis(5), "{b:?}");
        }
    }
}
