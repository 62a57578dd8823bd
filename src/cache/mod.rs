//! The cache domain: levels, TTLs, compression, size limits, metrics,
//! warming, cleanup and maintenance, over any [`Store`].
//!
//! [`Cache`] is a cheap-to-clone handle. Each operation validates its input
//! (naming the offending field), encodes values ([`value`]), talks to the
//! store once, and records metrics ([`metrics`]). Nothing here knows about
//! gRPC.

mod error;
pub mod histogram;
pub mod metrics;
pub mod value;
pub mod warm;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use flate2::Compression;
use tokio_util::sync::CancellationToken;

pub use self::error::CacheError;
use self::metrics::{Counters, Metrics, Op, Snapshot};
pub use self::value::Value;
pub use crate::domain::Level;
use crate::glob;
use crate::keys::KeySpace;
use crate::store::{
    BackendKind, CircuitState, Deadline, LastError, Store, StoreError, Write, fnv1a,
};

/// The most keys or entries one batch call takes.
pub const MAX_BATCH: usize = 1000;
/// Default page size of `ListKeys`.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size of `ListKeys`; larger requests are served this many.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Longest accepted `ListKeys` pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Longest TTL accepted: 100 years, far beyond any cache's use and well within
/// Redis's millisecond range.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Entries written per store call by a warm-up.
const WARM_CHUNK: usize = 500;
/// Keys sampled by maintenance to find the largest.
const MAINTENANCE_SAMPLE: usize = 1000;
/// How long other instances' figures and backend memory are reused by
/// metrics calls (they change once per metrics flush anyway).
const SHARED_FIGURES_MAX_AGE: Duration = Duration::from_millis(100);
/// Time a key-count walk may take; it runs apart from any caller.
const KEY_COUNT_BUDGET: Duration = Duration::from_secs(120);
/// Largest keys reported by maintenance.
const MAINTENANCE_TOP: usize = 10;

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Cache settings (the seed's `CACHE_*` variables and koo's additions).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Prefix of every key koo writes.
    pub prefix: String,
    /// TTL of the app, db and session levels when a write names none.
    pub default_ttl: Duration,
    /// TTL of the api level when a write names none.
    pub api_default_ttl: Duration,
    /// Values larger than this many bytes are compressed (when it helps).
    pub compression_threshold: usize,
    /// zlib level, 0 to 9.
    pub compression_level: u32,
    /// Largest value accepted, in bytes, before compression.
    pub max_value_size: usize,
    /// Longest key accepted, in bytes.
    pub max_key_size: usize,
    /// JSON Lines file of entries to preload on `Warm`.
    pub warm_file: Option<PathBuf>,
    /// How often this instance publishes its metrics for the others.
    pub metrics_flush_interval: Duration,
    /// How long key counts are reused before the keyspace is walked again.
    pub key_count_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            prefix: "koo".to_owned(),
            default_ttl: Duration::from_secs(3600),
            api_default_ttl: Duration::from_secs(300),
            compression_threshold: 1024,
            compression_level: 1,
            max_value_size: 10 * 1024 * 1024,
            max_key_size: 1024,
            warm_file: None,
            metrics_flush_interval: Duration::from_secs(1),
            key_count_interval: Duration::from_secs(10),
        }
    }
}

impl CacheConfig {
    /// The largest gRPC message koo accepts or sends: one value at the size
    /// limit plus room for its key and framing.
    pub fn message_limit(&self) -> usize {
        self.max_value_size + self.max_key_size + 1024 * 1024
    }

    /// The default TTL of `level`.
    pub fn ttl_for(&self, level: Level) -> Duration {
        match level {
            Level::Api => self.api_default_ttl,
            _ => self.default_ttl,
        }
    }

    /// How long a published metrics record counts as live.
    fn record_ttl(&self) -> Duration {
        self.metrics_flush_interval
            .saturating_mul(3)
            .max(Duration::from_secs(10))
    }
}

/// An entry to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// Its level.
    pub level: Level,
    /// Its key.
    pub key: String,
    /// Its value.
    pub value: Value,
    /// Its TTL; `None` means the level's default.
    pub ttl: Option<Duration>,
}

/// A value read from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The value as it was set.
    pub value: Value,
    /// Time left to live (`None` only for keys written without a TTL by
    /// something other than koo).
    pub ttl: Option<Duration>,
    /// Size as set.
    pub size: u64,
    /// Size as stored.
    pub stored_size: u64,
    /// Whether it is stored compressed.
    pub compressed: bool,
}

/// What a write stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The TTL applied.
    pub ttl: Duration,
    /// Size as set.
    pub size: u64,
    /// Size as stored.
    pub stored_size: u64,
    /// Whether it is stored compressed.
    pub compressed: bool,
}

/// One page of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// User keys.
    pub keys: Vec<String>,
    /// Token of the next page; empty on the last.
    pub next_page_token: String,
}

/// The backend's health as seen by one probe.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// Whether the probe got an answer.
    pub healthy: bool,
    /// Which backend.
    pub backend: BackendKind,
    /// The probe's round trip.
    pub ping_latency: Option<Duration>,
    /// The circuit breaker's state.
    pub circuit: CircuitState,
    /// Backend memory figures, when reachable.
    pub memory: Option<crate::store::MemoryReport>,
    /// The last backend error.
    pub last_error: Option<LastError>,
    /// This instance's uptime.
    pub uptime: Duration,
}

/// Metrics of all instances together.
#[derive(Debug, Clone)]
pub struct MetricsReport {
    /// Summed figures.
    pub snapshot: Snapshot,
    /// Keys per level, in [`Level::ALL`] order.
    pub keys: [u64; 4],
    /// When the key counts were taken.
    pub keys_counted_at: Option<SystemTime>,
    /// Backend memory in use.
    pub backend_used_memory: u64,
    /// This instance's uptime.
    pub uptime: Duration,
    /// Instances summed.
    pub instances: u32,
    /// When this report was made.
    pub sampled_at: SystemTime,
    /// Why some figures are missing, if they are.
    pub partial: Option<String>,
}

impl MetricsReport {
    /// Counters of all levels.
    pub fn total(&self) -> Counters {
        self.snapshot.total()
    }
}

/// What a cleanup removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CleanupReport {
    /// Keys examined.
    pub scanned: u64,
    /// Keys without a TTL removed.
    pub removed_without_ttl: u64,
    /// Expired entries removed.
    pub removed_expired: u64,
    /// Stale instance records removed.
    pub removed_stale_instances: u64,
}

/// What a maintenance run did and found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MaintenanceReport {
    /// The cleanup.
    pub cleanup: CleanupReport,
    /// Backend memory.
    pub memory: crate::store::MemoryReport,
    /// Keys sampled for sizes.
    pub sampled_keys: u64,
    /// Largest keys of the sample, largest first.
    pub largest: Vec<LargeKey>,
}

/// A key of the maintenance sample and its size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LargeKey {
    /// Its level.
    pub level: Level,
    /// The user key.
    pub key: String,
    /// Bytes used by key and value.
    pub bytes: u64,
}

/// One entry a warm-up could not load.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarmFailure {
    /// `request` or the file's path.
    pub source: String,
    /// Line (file, 1-based) or index (request, 0-based).
    pub line: u64,
    /// What was wrong.
    pub reason: String,
}

/// What a warm-up loaded.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WarmReport {
    /// Entries written.
    pub loaded: u64,
    /// Entries refused.
    pub failures: Vec<WarmFailure>,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// Entries whose value a task computes (the warm file's `task` lines):
    /// [`Cache::warm`] lists them, the warm task submits them.
    #[serde(default)]
    pub computed: Vec<WarmCompute>,
}

/// An entry whose value a task computes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WarmCompute {
    /// The warm file's path.
    pub source: String,
    /// Its line (1-based).
    pub line: u64,
    /// The entry's level.
    pub level: Level,
    /// The entry's key.
    pub key: String,
    /// The entry's TTL (ms); absent means the level's default.
    pub ttl_ms: Option<u64>,
    /// The task, as the line gave it.
    pub task: serde_json::Map<String, serde_json::Value>,
    /// The submitted task, once submitted.
    pub task_id: Option<String>,
}

/// A handle to the cache; clones share everything.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    config: CacheConfig,
    keys: KeySpace,
    metrics: Metrics,
    compression: Compression,
    instance: String,
    started: Instant,
    /// The latest key counts. A walk runs in a task of its own, one at a
    /// time (`walking`), so that concurrent metrics calls share it, a slow
    /// walk outlives the call that started it, and callers wait for it only
    /// as long as their deadline allows.
    key_counts: tokio::sync::watch::Sender<KeyCountState>,
    walking: std::sync::atomic::AtomicBool,
    /// Other instances' figures and the backend's memory, reused for
    /// [`SHARED_FIGURES_MAX_AGE`] so that any number of `WatchMetrics`
    /// streams cost the backend a bounded number of reads. A tokio mutex,
    /// held while reading, so that concurrent callers share one read.
    shared: tokio::sync::Mutex<Option<SharedFigures>>,
}

/// Figures that come from the backend rather than this process.
#[derive(Clone)]
struct SharedFigures {
    taken: Instant,
    peers: Result<Vec<Snapshot>, String>,
    memory: Result<u64, String>,
}

/// The outcome of the latest key-count walk.
#[derive(Clone, Default)]
struct KeyCountState {
    counts: Option<KeyCounts>,
    error: Option<String>,
}

#[derive(Clone, Copy)]
struct KeyCounts {
    taken: Instant,
    at: SystemTime,
    counts: [u64; 4],
}

impl Cache {
    /// A cache over `store`.
    pub fn new(store: Store, config: CacheConfig) -> Self {
        let compression = Compression::new(config.compression_level.min(9));
        Self {
            inner: Arc::new(Inner {
                keys: KeySpace::new(&config.prefix),
                store,
                compression,
                config,
                metrics: Metrics::default(),
                instance: uuid::Uuid::new_v4().simple().to_string(),
                started: Instant::now(),
                key_counts: tokio::sync::watch::Sender::new(KeyCountState::default()),
                walking: std::sync::atomic::AtomicBool::new(false),
                shared: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// Checks a key; `field` names it and is only built when the key is bad
    /// (this runs on every call).
    fn check_key(&self, field: impl FnOnce() -> String, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(CacheError::invalid(field(), "must not be empty"));
        }
        let max = self.inner.config.max_key_size;
        if key.len() > max {
            return Err(CacheError::invalid(
                field(),
                format!(
                    "is {} bytes, over the limit of {max} bytes (KOO_MAX_KEY_SIZE)",
                    key.len()
                ),
            ));
        }
        Ok(())
    }

    /// Checks the size of a batch named `field`.
    fn check_batch(&self, field: &str, len: usize) -> Result<()> {
        if len > MAX_BATCH {
            return Err(CacheError::invalid(
                field,
                format!("has {len} items, over the limit of {MAX_BATCH}"),
            ));
        }
        Ok(())
    }

    /// Checks a batch of keys (`keys`, `keys[3]`).
    fn check_keys(&self, keys: &[String]) -> Result<()> {
        self.check_batch("keys", keys.len())?;
        for (i, k) in keys.iter().enumerate() {
            self.check_key(|| format!("keys[{i}]"), k)?;
        }
        Ok(())
    }

    /// Validates an entry and returns its TTL; `at` gives the prefix of field
    /// names (`entries[3].`) and is only called when something is wrong.
    fn check_entry(&self, at: impl Fn() -> String, e: &NewEntry) -> Result<Duration> {
        self.check_key(|| format!("{}key", at()), &e.key)?;
        let limit = self.inner.config.max_value_size;
        if e.value.len() > limit {
            return Err(CacheError::ValueTooLarge {
                field: format!("{}value", at()),
                size: e.value.len(),
                limit,
            });
        }
        let ttl = e.ttl.unwrap_or_else(|| self.inner.config.ttl_for(e.level));
        if ttl < Duration::from_millis(1) {
            return Err(CacheError::invalid(
                format!("{}ttl", at()),
                "must be at least 1 ms",
            ));
        }
        if ttl > MAX_TTL {
            return Err(CacheError::invalid(
                format!("{}ttl", at()),
                "must be at most 100 years",
            ));
        }
        Ok(ttl)
    }

    fn encode(&self, e: &NewEntry, ttl: Duration) -> (Write, Stored) {
        let encoded = value::encode(
            &e.value,
            self.inner.config.compression_threshold,
            self.inner.compression,
        );
        let stored = Stored {
            ttl,
            size: e.value.len() as u64,
            stored_size: encoded.bytes.len() as u64,
            compressed: encoded.compressed,
        };
        let write = Write {
            key: self.inner.keys.cache_key(e.level, &e.key),
            value: encoded.bytes,
            ttl,
        };
        (write, stored)
    }

    fn decode(key: &str, entry: crate::store::Entry) -> Result<Hit> {
        let stored_size = entry.value.len() as u64;
        let decoded = value::decode(&entry.value).map_err(|e| CacheError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Hit {
            size: decoded.value.len() as u64,
            value: decoded.value,
            ttl: entry.ttl,
            stored_size,
            compressed: decoded.compressed,
        })
    }

    /// Counts a write. Compression figures compare payloads, without koo's
    /// fixed header, so that `bytes_saved` is what compression saved.
    fn count_write(&self, level: Level, s: &Stored) {
        let payload = s.stored_size.saturating_sub(value::HEADER as u64);
        self.inner.metrics.write(level, s.size, payload);
    }

    /// Counts an operation, its latency and (if it is the backend's fault)
    /// its failure.
    fn observe<T>(&self, level: Level, op: Op, started: Instant, result: &Result<T>) {
        let m = &self.inner.metrics;
        m.operation(level);
        m.latency(op, started.elapsed());
        if let Err(e) = result
            && e.is_backend()
        {
            m.error(level);
        }
    }

    /// Reads one value; `Ok(None)` on a miss.
    pub async fn get(&self, level: Level, key: &str, deadline: Deadline) -> Result<Option<Hit>> {
        self.check_key(|| "key".into(), key)?;
        let started = Instant::now();
        let result = async {
            let full = self.inner.keys.cache_key(level, key);
            match self.inner.store.get(&full, deadline).await? {
                Some(entry) => Ok(Some(Self::decode(key, entry)?)),
                None => Ok(None),
            }
        }
        .await;
        if let Ok(hit) = &result {
            let found = u64::from(hit.is_some());
            self.inner.metrics.reads(level, found, 1 - found);
        }
        self.observe(level, Op::Get, started, &result);
        result
    }

    /// Writes one value.
    pub async fn set(&self, entry: NewEntry, deadline: Deadline) -> Result<Stored> {
        let ttl = self.check_entry(String::new, &entry)?;
        let started = Instant::now();
        let (write, stored) = self.encode(&entry, ttl);
        let result = self
            .inner
            .store
            .set(&write.key, write.value, write.ttl, deadline)
            .await
            .map(|()| stored)
            .map_err(CacheError::from);
        if result.is_ok() {
            self.count_write(entry.level, &stored);
        }
        self.observe(entry.level, Op::Set, started, &result);
        result
    }

    /// Removes one key; whether it existed.
    pub async fn delete(&self, level: Level, key: &str, deadline: Deadline) -> Result<bool> {
        self.check_key(|| "key".into(), key)?;
        let n = self
            .remove(level, Op::Delete, &[key.to_owned()], deadline)
            .await?;
        Ok(n > 0)
    }

    /// Reads up to [`MAX_BATCH`] keys of one level, answers in order. A reply
    /// that would pass the message limit is refused before anything large is
    /// fetched or inflated.
    pub async fn get_many(
        &self,
        level: Level,
        keys: &[String],
        deadline: Deadline,
    ) -> Result<Vec<Option<Hit>>> {
        self.check_keys(keys)?;
        let started = Instant::now();
        let result = async {
            let limit = self.inner.config.message_limit();
            let key_bytes: usize = keys.iter().map(String::len).sum();
            let check = |size: usize| {
                if size + key_bytes > limit {
                    Err(CacheError::ReplyTooLarge {
                        size: size + key_bytes,
                        limit,
                    })
                } else {
                    Ok(())
                }
            };
            let full: Vec<String> = keys
                .iter()
                .map(|k| self.inner.keys.cache_key(level, k))
                .collect();
            let stored: u64 = self.inner.store.sizes(&full, deadline).await?.iter().sum();
            check(stored as usize)?;
            let entries = self.inner.store.get_many(&full, deadline).await?;
            check(
                entries
                    .iter()
                    .flatten()
                    .map(|e| value::declared_len(&e.value).unwrap_or(e.value.len()))
                    .sum(),
            )?;
            keys.iter()
                .zip(entries)
                .map(|(k, e)| e.map(|e| Self::decode(k, e)).transpose())
                .collect::<Result<Vec<_>>>()
        }
        .await;
        if let Ok(hits) = &result {
            let found = hits.iter().filter(|h| h.is_some()).count() as u64;
            self.inner
                .metrics
                .reads(level, found, hits.len() as u64 - found);
        }
        self.observe(level, Op::GetMany, started, &result);
        result
    }

    /// Writes up to [`MAX_BATCH`] entries, all or nothing: every entry is
    /// validated before anything is written.
    pub async fn set_many(&self, entries: &[NewEntry], deadline: Deadline) -> Result<Vec<Stored>> {
        self.check_batch("entries", entries.len())?;
        let ttls = entries
            .iter()
            .enumerate()
            .map(|(i, e)| self.check_entry(|| format!("entries[{i}]."), e))
            .collect::<Result<Vec<_>>>()?;
        let started = Instant::now();
        let result = self.write_all(entries, &ttls, deadline).await;
        let mut levels: Vec<Level> = entries.iter().map(|e| e.level).collect();
        levels.sort();
        levels.dedup();
        for level in levels {
            self.inner.metrics.operation(level);
            if result.as_ref().is_err_and(CacheError::is_backend) {
                self.inner.metrics.error(level);
            }
        }
        self.inner.metrics.latency(Op::SetMany, started.elapsed());
        result
    }

    /// Encodes and writes validated entries in one atomic store call.
    async fn write_all(
        &self,
        entries: &[NewEntry],
        ttls: &[Duration],
        deadline: Deadline,
    ) -> Result<Vec<Stored>> {
        let (writes, stored): (Vec<Write>, Vec<Stored>) = entries
            .iter()
            .zip(ttls)
            .map(|(e, ttl)| self.encode(e, *ttl))
            .unzip();
        self.inner.store.set_many(writes, deadline).await?;
        for (e, s) in entries.iter().zip(&stored) {
            self.count_write(e.level, s);
        }
        Ok(stored)
    }

    /// Removes up to [`MAX_BATCH`] keys of one level; how many existed.
    pub async fn delete_many(
        &self,
        level: Level,
        keys: &[String],
        deadline: Deadline,
    ) -> Result<u64> {
        self.check_keys(keys)?;
        self.remove(level, Op::DeleteMany, keys, deadline).await
    }

    async fn remove(
        &self,
        level: Level,
        op: Op,
        keys: &[String],
        deadline: Deadline,
    ) -> Result<u64> {
        let started = Instant::now();
        let full: Vec<String> = keys
            .iter()
            .map(|k| self.inner.keys.cache_key(level, k))
            .collect();
        let result = self
            .inner
            .store
            .delete(&full, deadline)
            .await
            .map_err(CacheError::from);
        if let Ok(n) = result {
            self.inner.metrics.deletes(level, n);
        }
        self.observe(level, op, started, &result);
        result
    }

    /// Lists one page of a level's keys matching a glob pattern.
    pub async fn list_keys(
        &self,
        level: Level,
        pattern: &str,
        page_size: i32,
        page_token: &str,
        deadline: Deadline,
    ) -> Result<KeyPage> {
        let page_size = match page_size {
            n if n < 0 => return Err(CacheError::invalid("page_size", "must not be negative")),
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let pattern = if pattern.is_empty() { "*" } else { pattern };
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(CacheError::invalid(
                "pattern",
                format!(
                    "is {} bytes, over the limit of {MAX_PATTERN_LEN}",
                    pattern.len()
                ),
            ));
        }
        glob::validate(pattern).map_err(|e| CacheError::invalid("pattern", e.to_string()))?;
        let cursor = PageToken::decode(page_token, level, pattern)?;
        let started = Instant::now();
        let full_pattern = self.inner.keys.level_pattern(level, pattern);
        let result = self
            .inner
            .store
            .scan(&full_pattern, cursor.as_deref(), page_size, deadline)
            .await
            .map_err(|e| match e {
                StoreError::InvalidCursor(why) => CacheError::invalid("page_token", why),
                other => CacheError::Store(other),
            })
            .map(|page| KeyPage {
                keys: page
                    .keys
                    .iter()
                    .filter_map(|k| self.inner.keys.user_key(level, k).map(str::to_owned))
                    .collect(),
                next_page_token: page
                    .cursor
                    .map(|c| PageToken::encode(level, pattern, &c))
                    .unwrap_or_default(),
            });
        self.observe(level, Op::ListKeys, started, &result);
        result
    }

    /// Removes every key of a level; how many.
    pub async fn clear_level(&self, level: Level, deadline: Deadline) -> Result<u64> {
        let started = Instant::now();
        let pattern = self.inner.keys.level_pattern(level, "*");
        let result = self
            .inner
            .store
            .clear(&pattern, deadline)
            .await
            .map_err(CacheError::from);
        if let Ok(n) = result {
            self.inner.metrics.deletes(level, n);
        }
        self.observe(level, Op::ClearLevel, started, &result);
        result
    }

    /// Probes the backend now.
    pub async fn health(&self, deadline: Deadline) -> HealthReport {
        let store = &self.inner.store;
        let ping = store.probe(deadline).await;
        let memory = match ping {
            Ok(_) => store.memory(deadline).await.ok(),
            Err(_) => None,
        };
        HealthReport {
            healthy: ping.is_ok(),
            backend: store.kind(),
            ping_latency: ping.ok(),
            circuit: store.circuit_state(),
            memory,
            last_error: store.last_error(),
            uptime: self.inner.started.elapsed(),
        }
    }

    /// Metrics summed over every instance sharing the backend. When the
    /// backend cannot be read, this instance's own figures are returned with
    /// `partial` saying why.
    pub async fn metrics(&self, deadline: Deadline) -> MetricsReport {
        let (shared, counts) =
            tokio::join!(self.shared_figures(deadline), self.key_counts(deadline));
        // This instance's own figures are always live.
        let mut snapshot = self.inner.metrics.snapshot();
        let mut partial = None;
        let instances = match &shared.peers {
            Ok(peers) => {
                for peer in peers {
                    snapshot.merge(peer);
                }
                1 + peers.len() as u32
            }
            Err(e) => {
                partial = Some(format!("other instances' figures are missing: {e}"));
                1
            }
        };
        if let (Err(e), None) = (&counts, &partial) {
            partial = Some(format!("key counts are missing: {e}"));
        }
        if let (Err(e), None) = (&shared.memory, &partial) {
            partial = Some(format!("backend memory is missing: {e}"));
        }
        let counts = counts.ok();
        MetricsReport {
            snapshot,
            keys: counts.map(|c| c.counts).unwrap_or_default(),
            keys_counted_at: counts.map(|c| c.at),
            backend_used_memory: shared.memory.unwrap_or(0),
            uptime: self.inner.started.elapsed(),
            instances,
            sampled_at: SystemTime::now(),
            partial,
        }
    }

    /// Other instances' figures and backend memory, at most
    /// [`SHARED_FIGURES_MAX_AGE`] old.
    async fn shared_figures(&self, deadline: Deadline) -> SharedFigures {
        let waited = tokio::time::timeout_at(deadline.instant(), self.inner.shared.lock()).await;
        let Ok(mut cached) = waited else {
            let why = "no answer within the deadline".to_owned();
            return SharedFigures {
                taken: Instant::now(),
                peers: Err(why.clone()),
                memory: Err(why),
            };
        };
        if let Some(figures) = cached.as_ref()
            && figures.taken.elapsed() < SHARED_FIGURES_MAX_AGE
        {
            return figures.clone();
        }
        let peers = async {
            if self.inner.store.kind() == BackendKind::Redis {
                self.peer_snapshots(deadline)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                Ok(Vec::new())
            }
        };
        let memory = async {
            self.inner
                .store
                .memory(deadline)
                .await
                .map_err(|e| e.to_string())
                .and_then(|m| match m.unavailable {
                    Some(why) => Err(why),
                    None => Ok(m.used),
                })
        };
        let (peers, memory) = tokio::join!(peers, memory);
        let figures = SharedFigures {
            taken: Instant::now(),
            peers,
            memory,
        };
        *cached = Some(figures.clone());
        figures
    }

    /// The published snapshots of the other live instances.
    async fn peer_snapshots(&self, deadline: Deadline) -> Result<Vec<Snapshot>, StoreError> {
        let keys = &self.inner.keys;
        let since = SystemTime::now() - self.inner.config.record_ttl();
        let records = self
            .inner
            .store
            .read_records(
                &keys.cache_metrics_index(),
                since,
                &|m| keys.cache_metrics_record(m),
                deadline,
            )
            .await?;
        Ok(records
            .into_iter()
            .filter(|(member, _)| *member != self.inner.instance)
            .filter_map(|(member, payload)| match serde_json::from_slice(&payload) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(instance = %member, error = %e, "ignoring unreadable metrics record");
                    None
                }
            })
            .collect())
    }

    /// Key counts no older than `key_count_interval` when a walk can finish
    /// within half the caller's time left, else the latest ones.
    async fn key_counts(&self, deadline: Deadline) -> Result<KeyCounts, String> {
        use std::sync::atomic::Ordering;
        let mut latest = self.inner.key_counts.subscribe();
        let known = latest.borrow_and_update().clone();
        if let Some(c) = known.counts
            && c.taken.elapsed() < self.inner.config.key_count_interval
        {
            return Ok(c);
        }
        if !self.inner.walking.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                let result = this.count_keys(Deadline::after(KEY_COUNT_BUDGET)).await;
                this.inner.key_counts.send_modify(|state| match result {
                    Ok(c) => {
                        *state = KeyCountState {
                            counts: Some(c),
                            error: None,
                        }
                    }
                    Err(e) => state.error = Some(e.to_string()),
                });
                this.inner.walking.store(false, Ordering::Release);
            });
        }
        let _ = tokio::time::timeout(deadline.remaining() / 2, latest.changed()).await;
        let state = latest.borrow().clone();
        state
            .counts
            .ok_or_else(|| state.error.unwrap_or_else(|| "not counted yet".to_owned()))
    }

    /// Counts every level's keys in one walk of the cache namespace.
    async fn count_keys(&self, deadline: Deadline) -> Result<KeyCounts, StoreError> {
        let keys = &self.inner.keys;
        let prefixes: Vec<String> = Level::ALL
            .iter()
            .map(|l| keys.level_prefix(*l).to_owned())
            .collect();
        let counted = self
            .inner
            .store
            .count_by_prefix(&keys.cache_pattern(), &prefixes, deadline)
            .await?;
        let mut counts = [0; 4];
        counts.copy_from_slice(&counted);
        Ok(KeyCounts {
            taken: Instant::now(),
            at: SystemTime::now(),
            counts,
        })
    }

    /// Publishes this instance's figures for the others to sum.
    pub async fn publish_metrics(&self, deadline: Deadline) -> Result<(), StoreError> {
        let keys = &self.inner.keys;
        let payload = serde_json::to_vec(&self.inner.metrics.snapshot())
            .map_err(|e| StoreError::Backend(format!("cannot encode metrics: {e}")))?;
        self.inner
            .store
            .publish_record(
                &keys.cache_metrics_index(),
                &keys.cache_metrics_record(&self.inner.instance),
                &self.inner.instance,
                payload.into(),
                self.inner.config.record_ttl(),
                deadline,
            )
            .await
    }

    /// Publishes metrics every `metrics_flush_interval` until `stop`. Only a
    /// shared (Redis) backend has anyone to publish to.
    pub async fn run_metrics_publisher(self, stop: CancellationToken) {
        if self.inner.store.kind() != BackendKind::Redis {
            return;
        }
        let interval = self.inner.config.metrics_flush_interval;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self
                .publish_metrics(Deadline::after(interval.max(Duration::from_secs(1))))
                .await
            {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("publishing cache metrics again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot publish cache metrics; other instances will not see this one's figures");
                }
                Err(_) => {}
            }
        }
    }

    /// The default TTL of `level`, as configured.
    pub fn default_ttl(&self, level: Level) -> Duration {
        self.inner.config.ttl_for(level)
    }

    /// Removes what the backend does not expire by itself.
    pub async fn cleanup(&self, deadline: Deadline) -> Result<CleanupReport> {
        let keys = &self.inner.keys;
        let counts = self
            .inner
            .store
            .cleanup(&keys.cache_pattern(), deadline)
            .await?;
        let since = SystemTime::now() - self.inner.config.record_ttl();
        let stale = self
            .inner
            .store
            .remove_stale_records(
                &keys.cache_metrics_index(),
                since,
                &|m| keys.cache_metrics_record(m),
                deadline,
            )
            .await?;
        Ok(CleanupReport {
            scanned: counts.scanned,
            removed_without_ttl: counts.removed_without_ttl,
            removed_expired: counts.removed_expired,
            removed_stale_instances: stale,
        })
    }

    /// A cleanup, then a memory report with the largest keys of a sample.
    pub async fn maintenance(&self, deadline: Deadline) -> Result<MaintenanceReport> {
        let cleanup = self.cleanup(deadline).await?;
        let memory = self.inner.store.memory(deadline).await?;
        let (sampled_keys, sizes) = self
            .inner
            .store
            .largest_keys(
                &self.inner.keys.cache_pattern(),
                MAINTENANCE_SAMPLE,
                MAINTENANCE_TOP,
                deadline,
            )
            .await?;
        let largest = sizes
            .into_iter()
            .filter_map(|ks| {
                Level::ALL.into_iter().find_map(|level| {
                    self.inner.keys.user_key(level, &ks.key).map(|k| LargeKey {
                        level,
                        key: k.to_owned(),
                        bytes: ks.bytes,
                    })
                })
            })
            .collect();
        Ok(MaintenanceReport {
            cleanup,
            memory,
            sampled_keys,
            largest,
        })
    }

    /// Preloads `entries` (a request's, by index, as parsed from their
    /// warm lines) and, unless `skip_file`, the configured warm file. Bad
    /// entries are reported, not fatal; a warm file that cannot be read fails
    /// the whole warm-up, since it is a configuration error.
    pub async fn warm(
        &self,
        entries: Vec<(u64, std::result::Result<NewEntry, String>)>,
        skip_file: bool,
        deadline: Deadline,
    ) -> Result<WarmReport> {
        let mut report = WarmReport::default();
        let mut valid = Vec::new();
        for (i, e) in entries {
            let checked = e.and_then(|e| {
                let ttl = self
                    .check_entry(|| format!("entries[{i}]."), &e)
                    .map_err(|err| err.to_string())?;
                Ok((e, ttl))
            });
            match checked {
                Ok(ok) => valid.push(ok),
                Err(reason) => report.failures.push(WarmFailure {
                    source: "request".to_owned(),
                    line: i,
                    reason,
                }),
            }
        }
        if let (false, Some(path)) = (skip_file, &self.inner.config.warm_file) {
            let lines = warm::read(path).await.map_err(|e| CacheError::WarmFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            for (line, parsed) in lines {
                let parsed = match parsed {
                    Ok(warm::WarmLine::Task {
                        level,
                        key,
                        ttl,
                        task,
                    }) => {
                        match self.check_key(|| "key".to_owned(), &key) {
                            Ok(()) => report.computed.push(WarmCompute {
                                source: path.display().to_string(),
                                line,
                                level,
                                key,
                                ttl_ms: ttl.map(|t| t.as_millis() as u64),
                                task,
                                task_id: None,
                            }),
                            Err(e) => report.failures.push(WarmFailure {
                                source: path.display().to_string(),
                                line,
                                reason: e.to_string(),
                            }),
                        }
                        continue;
                    }
                    Ok(warm::WarmLine::Entry(e)) => Ok(e),
                    Err(e) => Err(e),
                };
                let checked = parsed.and_then(|e| {
                    let ttl = self
                        .check_entry(String::new, &e)
                        .map_err(|err| err.to_string())?;
                    Ok((e, ttl))
                });
                match checked {
                    Ok(ok) => valid.push(ok),
                    Err(reason) => report.failures.push(WarmFailure {
                        source: path.display().to_string(),
                        line,
                        reason,
                    }),
                }
            }
            report.file = Some(path.clone());
        }
        let (entries, ttls): (Vec<NewEntry>, Vec<Duration>) = valid.into_iter().unzip();
        for (entries, ttls) in entries.chunks(WARM_CHUNK).zip(ttls.chunks(WARM_CHUNK)) {
            self.write_all(entries, ttls, deadline).await?;
            report.loaded += entries.len() as u64;
        }
        Ok(report)
    }
}

/// `ListKeys` page tokens: opaque to clients, bound to the level and pattern
/// they were issued for, so that a token reused with other parameters is
/// refused instead of silently listing the wrong thing.
struct PageToken;

impl PageToken {
    const VERSION: &'static str = "1";

    fn encode(level: Level, pattern: &str, cursor: &str) -> String {
        let raw = format!(
            "{}.{}.{:016x}.{cursor}",
            Self::VERSION,
            level.as_str(),
            fnv1a(pattern.as_bytes())
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    fn decode(token: &str, level: Level, pattern: &str) -> Result<Option<String>> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = |why: &str| CacheError::invalid("page_token", why.to_owned());
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad("is not a token this server issued"))?;
        let mut parts = raw.splitn(4, '.');
        let (Some(version), Some(lvl), Some(hash), Some(cursor)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("is not a token this server issued"));
        };
        if version != Self::VERSION {
            return Err(bad("was issued by an incompatible version of koo"));
        }
        if lvl != level.as_str() || hash != format!("{:016x}", fnv1a(pattern.as_bytes())) {
            return Err(bad("was issued for a different level or pattern"));
        }
        Ok(Some(cursor.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens round-trip and refuse other parameters or garbage.
    #[test]
    fn page_tokens() {
        let t = PageToken::encode(Level::Db, "user:*", "r:17:3");
        assert_eq!(
            PageToken::decode(&t, Level::Db, "user:*")
                .unwrap()
                .as_deref(),
            Some("r:17:3")
        );
        assert!(PageToken::decode(&t, Level::App, "user:*").is_err());
        assert!(PageToken::decode(&t, Level::Db, "user:?").is_err());
        assert!(PageToken::decode("%%%", Level::Db, "*").is_err());
        assert!(PageToken::decode("Zm9v", Level::Db, "*").is_err());
        assert_eq!(PageToken::decode("", Level::Db, "*").unwrap(), None);
    }
}
