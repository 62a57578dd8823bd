//! The cache domain: levels, TTLs, compression, size limits, metrics,
//! warming, cleanup and maintenance, over any [`Store`].
//!
//! [`Cache`] is a cheap-to-clone handle. Each operation validates its input
//! (naming the offending field), encodes values ([`value`]), talks to the
//! store once, and records metrics ([`metrics`]). Nothing here knows about
//! gRPC.

pub mod bus;
pub mod compute;
mod config;
mod entry;
mod error;
mod figures;
pub mod histogram;
mod listing;
pub mod metrics;
mod reports;
pub mod tags;
mod upkeep;
pub mod value;
pub mod warm;

use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::Compression;

pub use self::bus::{Change, ChangeKind, Notice, Subscription, Woke};
pub use self::config::{
    CacheConfig, DEFAULT_PAGE_SIZE, MAX_BATCH, MAX_PAGE_SIZE, MAX_PATTERN_LEN, MAX_TTL,
};
pub use self::entry::{Hit, KeyPage, NewEntry, Stored};
pub use self::error::CacheError;
use self::figures::{KeyCountState, SharedFigures};
use self::metrics::{Metrics, Op};
pub use self::reports::{
    CleanupReport, HealthReport, LargeKey, MaintenanceReport, MetricsReport, WarmCompute,
    WarmFailure, WarmReport,
};
pub use self::value::Value;
pub use crate::domain::Level;
use crate::keys::KeySpace;
use crate::store::{Deadline, Store, Write};

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

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
    /// Wakes GetOrLock's waiters when an entry is filled (see `compute`).
    fills: Box<dyn compute::FillSignal>,
    /// Changes, for watchers and waiters (see [`bus`]).
    bus: bus::Bus,
}

impl Cache {
    /// A cache over `store`.
    pub fn new(store: Store, config: CacheConfig) -> Self {
        let compression = Compression::new(config.compression_level.min(9));
        let keys = KeySpace::new(&config.prefix);
        Self {
            inner: Arc::new(Inner {
                bus: bus::Bus::new(&store, &keys),
                keys,
                store,
                compression,
                config,
                metrics: Metrics::default(),
                instance: uuid::Uuid::new_v4().simple().to_string(),
                started: Instant::now(),
                key_counts: tokio::sync::watch::Sender::new(KeyCountState::default()),
                walking: std::sync::atomic::AtomicBool::new(false),
                shared: tokio::sync::Mutex::new(None),
                fills: Box::new(compute::LocalFills::default()),
            }),
        }
    }

    /// Checks a key; `field` names it and is only built when the key is bad
    /// (this runs on every call).
    pub(crate) fn check_key(&self, field: impl FnOnce() -> String, key: &str) -> Result<()> {
        if key.is_empty() {
            return Err(CacheError::invalid(field(), "must not be empty"));
        }
        let max = self.inner.config.max_key_size;
        if key.len() > max {
            return Err(CacheError::invalid(
                field(),
                format!(
                    "{} is over the limit of {max} bytes (KOO_MAX_KEY_SIZE)",
                    crate::quote::quote_sized(key)
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
    pub(crate) fn check_entry(&self, at: impl Fn() -> String, e: &NewEntry) -> Result<Duration> {
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
        if tags::has_meta(e) {
            tags::check_meta(&at, e, ttl)?;
        }
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

    fn encode(&self, e: &NewEntry, ttl: Duration, meta: &value::Meta) -> (Write, Stored) {
        let encoded = value::encode_with(
            &e.value,
            meta,
            self.inner.config.compression_threshold,
            self.inner.compression,
        );
        let stored = Stored {
            ttl,
            size: e.value.len() as u64,
            stored_size: encoded.bytes.len() as u64,
            compressed: encoded.compressed,
            payload_size: (encoded.bytes.len() - encoded.overhead) as u64,
        };
        let write = Write {
            key: self.inner.keys.cache_key(e.level, &e.key),
            value: encoded.bytes,
            ttl,
        };
        (write, stored)
    }

    /// A hit, and the versions its tags were written with (empty, without
    /// allocating, for an untagged entry).
    fn decode(key: &str, entry: crate::store::Entry) -> Result<(Hit, Vec<u64>)> {
        let stored_size = entry.value.len() as u64;
        let decoded = value::decode(&entry.value).map_err(|e| CacheError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        let meta = decoded.meta;
        let mut hit = Hit {
            size: decoded.value.len() as u64,
            value: decoded.value,
            ttl: entry.ttl,
            stored_size,
            compressed: decoded.compressed,
            tags: Vec::new(),
            stale: false,
            soft_ttl: None,
            soft_expiry: None,
            compute: Duration::ZERO,
        };
        if meta.is_empty() {
            return Ok((hit, Vec::new()));
        }
        tags::freshness(&meta, &mut hit);
        let (names, versions) = meta.tags.into_iter().unzip();
        hit.tags = names;
        Ok((hit, versions))
    }

    /// Counts a write. Compression figures compare payloads, without koo's
    /// fixed header, so that `bytes_saved` is what compression saved.
    fn count_write(&self, level: Level, s: &Stored) {
        // the payload only: a tag block is not compression's doing, and
        // counting it would make "saved" (raw - stored) go backwards
        self.inner.metrics.write(level, s.size, s.payload_size);
    }

    /// Counts an operation, its latency and (if it is the backend's fault)
    /// its failure.
    fn observe<T>(&self, level: Level, op: Op, started: Instant, result: &Result<T>) {
        self.inner
            .metrics
            .level_latency(level, op, started.elapsed());
        self.count_call(level, result);
    }

    /// Counts an operation and (if it is the backend's fault) its failure,
    /// without a latency: for calls whose time includes waiting for another
    /// caller (GetOrLock), which would read as slow reads.
    fn count_call<T>(&self, level: Level, result: &Result<T>) {
        let m = &self.inner.metrics;
        m.operation(level);
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
        let result = self.read(level, key, deadline).await;
        if let Ok(hit) = &result {
            let found = u64::from(hit.is_some());
            self.inner.metrics.reads(level, found, 1 - found);
        }
        self.observe(level, Op::Get, started, &result);
        result
    }

    /// [`Cache::get`] of a checked key without counting it: for the reads
    /// a call makes on its way to one answer (GetOrLock's re-reads and
    /// polls, GetOrCompute's read of what its task stored), which the call
    /// counts once, by what its caller got.
    pub(crate) async fn read(
        &self,
        level: Level,
        key: &str,
        deadline: Deadline,
    ) -> Result<Option<Hit>> {
        let full = self.inner.keys.cache_key(level, key);
        let Some(entry) = self.inner.store.get(&full, deadline).await? else {
            return Ok(None);
        };
        let (hit, versions) = Self::decode(key, entry)?;
        if versions.is_empty() {
            return Ok(Some(hit));
        }
        let mut hits = [Some(hit)];
        self.drop_invalidated(level, &[key.to_owned()], &mut hits, &[versions], deadline)
            .await?;
        let [hit] = hits;
        Ok(hit)
    }

    /// Writes one value.
    pub async fn set(&self, entry: NewEntry, deadline: Deadline) -> Result<Stored> {
        let ttl = self.check_entry(String::new, &entry)?;
        let started = Instant::now();
        let result = async {
            let (write, stored) = match self
                .metas(std::slice::from_ref(&entry), &[ttl], deadline)
                .await?
            {
                Some(metas) => self.encode(&entry, ttl, &metas[0]),
                None => self.encode(&entry, ttl, &value::NO_META),
            };
            self.inner
                .store
                .set(&write.key, write.value, write.ttl, deadline)
                .await?;
            Ok(stored)
        }
        .await;
        if let Ok(stored) = &result {
            self.count_write(entry.level, stored);
        }
        self.observe(entry.level, Op::Set, started, &result);
        self.announce(result.is_ok(), deadline, || {
            vec![Change::keys(ChangeKind::Set, entry.level, vec![entry.key])]
        })
        .await;
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
            let mut hits = Vec::with_capacity(keys.len());
            // Tag versions per hit, allocated only once a hit has tags.
            let mut versions: Vec<Vec<u64>> = Vec::new();
            for (i, (k, e)) in keys.iter().zip(entries).enumerate() {
                let (hit, v) = e.map(|e| Self::decode(k, e)).transpose()?.unzip();
                hits.push(hit);
                if let Some(v) = v.filter(|v| !v.is_empty()) {
                    versions.resize(keys.len(), Vec::new());
                    versions[i] = v;
                }
            }
            if !versions.is_empty() {
                self.drop_invalidated(level, keys, &mut hits, &versions, deadline)
                    .await?;
            }
            Ok(hits)
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
        self.announce(result.is_ok(), deadline, || Self::set_changes(entries))
            .await;
        result
    }

    /// Encodes and writes validated entries in one atomic store call. Its
    /// callers announce the entries to near caches (`SetMany` once its
    /// latency is taken, as `Set` does; a warm-up per chunk): the
    /// `cache_watch` scenario fails for a batch write that does not.
    async fn write_all(
        &self,
        entries: &[NewEntry],
        ttls: &[Duration],
        deadline: Deadline,
    ) -> Result<Vec<Stored>> {
        let metas = self.metas(entries, ttls, deadline).await?;
        let (writes, stored): (Vec<Write>, Vec<Stored>) = entries
            .iter()
            .zip(ttls)
            .enumerate()
            .map(|(i, (e, ttl))| {
                let meta = metas.as_ref().map_or(&value::NO_META, |m| &m[i]);
                self.encode(e, *ttl, meta)
            })
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
        self.announce(result.is_ok(), deadline, || {
            vec![Change::keys(ChangeKind::Delete, level, keys.to_vec())]
        })
        .await;
        result
    }

    /// The circuit breaker's state in front of the cache's store, as it
    /// changes (a stream that cannot start while it is open says so).
    pub fn circuit(&self) -> tokio::sync::watch::Receiver<crate::store::CircuitState> {
        self.inner.store.watch_circuit()
    }

    /// The default TTL of `level`, as configured.
    pub fn default_ttl(&self, level: Level) -> Duration {
        self.inner.config.ttl_for(level)
    }
}
