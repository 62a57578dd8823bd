//! The embedded store: koo's zero-setup default, a process-local map with TTLs.
//!
//! It gives a single `koo serve` the same cache semantics as Redis (TTL on
//! every key, glob listing, batch writes all or nothing) without any other
//! process. It is not shared between koo instances; with `KOO_DATA_DIR`,
//! [`crate::persist`] keeps it across restarts (the image: `snapshot`).
//!
//! Layout: one ordered map of full keys, so that a listing can resume after the
//! last key it returned and a level (a key prefix) is a contiguous range; and
//! an index of expiry instants, so that purging expired entries and evicting
//! when full both cost O(log n) per entry instead of a full walk.
//!
//! The lock is a `std::sync::RwLock`, not tokio's: it is never held across an
//! `.await`, every critical section is a few map operations, and a std lock is
//! several times cheaper to take.

pub mod journal;
mod locks;
mod schedules;
mod snapshot;
mod state;
mod tags;
pub mod tasks;

pub use schedules::MemorySchedules;

pub use snapshot::{CacheEntryImage, CacheImage, CacheLoad};

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use self::state::{State, charge, entry, expiry};
use super::{
    BackendKind, CacheBackend, CircuitState, CleanupCounts, Deadline, Entry, KeyOf, KeySize,
    LastError, LockState, MemoryReport, Result, ScanPage, StoreError, Write, unix_millis,
};
use crate::glob;

/// The most entries one listing call examines before it returns a partial
/// page, so that a sparse pattern over a large store cannot hold the lock long.
const MAX_EXAMINED_PER_PAGE: usize = 100_000;

/// Settings of the embedded store.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryConfig {
    /// Capacity in bytes (keys, values and overhead). When a write would pass
    /// it, the entries closest to expiry are evicted first.
    pub max_bytes: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// A handle to the embedded store; clones share one map.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: RwLock<State>,
    max_bytes: u64,
    peak: AtomicU64,
    /// Always `Closed`: there is no connection to break. Kept so that health
    /// reporting treats both backends alike.
    circuit: watch::Sender<CircuitState>,
    /// Compute locks (GetOrLock), apart from the entries.
    locks: locks::Locks,
}

impl MemoryStore {
    /// An empty store.
    pub fn new(config: MemoryConfig) -> Self {
        let (circuit, _) = watch::channel(CircuitState::Closed);
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                max_bytes: config.max_bytes,
                peak: AtomicU64::new(0),
                circuit,
                locks: locks::Locks::default(),
            }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn note_peak(&self, bytes: u64) {
        self.inner.peak.fetch_max(bytes, Ordering::Relaxed);
    }

    /// Removes expired entries now; returns how many. The server calls this
    /// periodically so that memory is returned even for keys never read again.
    pub fn purge_expired(&self) -> u64 {
        self.write().purge_expired(Instant::now())
    }
}

#[tonic::async_trait]
impl CacheBackend for MemoryStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Memory
    }

    // No span on the per-key hot path (get, get_many, set, set_many): even a
    // disabled span costs a callsite check per call, measured on cache Get.
    async fn get(&self, key: &str, _deadline: Deadline) -> Result<Option<Entry>> {
        let now = Instant::now();
        let state = self.read();
        Ok(state.live(key, now).map(|s| entry(s, now)))
    }

    async fn get_many(&self, keys: &[String], _deadline: Deadline) -> Result<Vec<Option<Entry>>> {
        let now = Instant::now();
        let state = self.read();
        Ok(keys
            .iter()
            .map(|k| state.live(k, now).map(|s| entry(s, now)))
            .collect())
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration, _deadline: Deadline) -> Result<()> {
        let bytes = {
            let mut state = self.write();
            state.write_batch(
                vec![(key.to_owned(), value, expiry(ttl))],
                self.inner.max_bytes,
            )?;
            state.bytes
        };
        self.note_peak(bytes);
        Ok(())
    }

    async fn set_many(&self, writes: Vec<Write>, _deadline: Deadline) -> Result<()> {
        let writes = writes
            .into_iter()
            .map(|w| (w.key, w.value, expiry(w.ttl)))
            .collect();
        let bytes = {
            let mut state = self.write();
            state.write_batch(writes, self.inner.max_bytes)?;
            state.bytes
        };
        self.note_peak(bytes);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(keys = keys.len()))]
    async fn sizes(&self, keys: &[String], _deadline: Deadline) -> Result<Vec<u64>> {
        let now = Instant::now();
        let state = self.read();
        Ok(keys
            .iter()
            .map(|k| state.live(k, now).map_or(0, |s| s.value.len() as u64))
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(keys = keys.len()))]
    async fn delete(&self, keys: &[String], _deadline: Deadline) -> Result<u64> {
        let now = Instant::now();
        let mut state = self.write();
        let mut deleted = 0;
        for key in keys {
            if let Some(slot) = state.remove(key) {
                deleted += u64::from(slot.live(now));
            }
        }
        Ok(deleted)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern, %page_size))]
    async fn scan(
        &self,
        pattern: &str,
        cursor: Option<&str>,
        page_size: usize,
        _deadline: Deadline,
    ) -> Result<ScanPage> {
        let prefix = glob::literal_prefix(pattern);
        let start = match cursor {
            Some(c) => {
                let after = c.strip_prefix("m:").ok_or_else(|| {
                    StoreError::InvalidCursor(format!(
                        "{} is not an embedded-store cursor",
                        crate::quote::quote(c)
                    ))
                })?;
                Bound::Excluded(after.to_owned())
            }
            None => Bound::Included(prefix.clone()),
        };
        let now = Instant::now();
        let state = self.read();
        let mut page = ScanPage::default();
        let mut examined = 0;
        for (key, slot) in state.entries.range((start, Bound::Unbounded)) {
            if !key.starts_with(&prefix) {
                return Ok(page);
            }
            if slot.live(now) && glob::matches(pattern.as_bytes(), key.as_bytes()) {
                page.keys.push(key.clone());
                if page.keys.len() >= page_size {
                    page.cursor = Some(format!("m:{key}"));
                    return Ok(page);
                }
            }
            examined += 1;
            if examined >= MAX_EXAMINED_PER_PAGE {
                page.cursor = Some(format!("m:{key}"));
                return Ok(page);
            }
        }
        Ok(page)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern))]
    async fn clear(&self, pattern: &str, _deadline: Deadline) -> Result<u64> {
        let now = Instant::now();
        let mut state = self.write();
        let keys: Vec<String> = state
            .matching(pattern, now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            state.remove(key);
        }
        Ok(keys.len() as u64)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern))]
    async fn count_by_prefix(
        &self,
        pattern: &str,
        prefixes: &[String],
        _deadline: Deadline,
    ) -> Result<Vec<u64>> {
        let mut counts = vec![0; prefixes.len()];
        for (key, _) in self.read().matching(pattern, Instant::now()) {
            if let Some(i) = prefixes.iter().position(|p| key.starts_with(p.as_str())) {
                counts[i] += 1;
            }
        }
        Ok(counts)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern))]
    async fn cleanup(&self, pattern: &str, _deadline: Deadline) -> Result<CleanupCounts> {
        let now = Instant::now();
        let mut state = self.write();
        let scanned = state.matching(pattern, now).count() as u64;
        // Every entry here has a TTL; only expired ones can linger.
        let removed_expired = state.purge_expired(now);
        Ok(CleanupCounts {
            scanned,
            removed_without_ttl: 0,
            removed_expired,
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern, %sample, %top))]
    async fn largest_keys(
        &self,
        pattern: &str,
        sample: usize,
        top: usize,
        _deadline: Deadline,
    ) -> Result<(u64, Vec<KeySize>)> {
        let state = self.read();
        let mut sizes: Vec<KeySize> = state
            .matching(pattern, Instant::now())
            .take(sample)
            .map(|(k, s)| KeySize {
                key: k.clone(),
                bytes: charge(k, &s.value),
            })
            .collect();
        drop(state);
        let sampled = sizes.len() as u64;
        sizes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.key.cmp(&b.key)));
        sizes.truncate(top);
        Ok((sampled, sizes))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn memory(&self, _deadline: Deadline) -> Result<MemoryReport> {
        let used = self.read().bytes;
        Ok(MemoryReport {
            used,
            peak: self.inner.peak.load(Ordering::Relaxed).max(used),
            fragmentation: 0.0,
            max: self.inner.max_bytes,
            policy: "volatile-ttl".to_owned(),
            unavailable: None,
        })
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn probe(&self, _deadline: Deadline) -> Result<Duration> {
        let started = Instant::now();
        drop(self.read());
        Ok(started.elapsed())
    }

    fn circuit_state(&self) -> CircuitState {
        CircuitState::Closed
    }

    fn watch_circuit(&self) -> watch::Receiver<CircuitState> {
        self.inner.circuit.subscribe()
    }

    fn last_error(&self) -> Option<LastError> {
        None
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%index, %member))]
    async fn publish_record(
        &self,
        index: &str,
        key: &str,
        member: &str,
        payload: Bytes,
        ttl: Duration,
        _deadline: Deadline,
    ) -> Result<()> {
        let mut state = self.write();
        state.write_batch(
            vec![(key.to_owned(), payload, expiry(ttl))],
            self.inner.max_bytes,
        )?;
        state
            .indexes
            .entry(index.to_owned())
            .or_default()
            .insert(member.to_owned(), unix_millis(SystemTime::now()));
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%index))]
    async fn read_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: KeyOf<'_>,
        _deadline: Deadline,
    ) -> Result<Vec<(String, Bytes)>> {
        let now = Instant::now();
        let since = unix_millis(since);
        let state = self.read();
        let Some(members) = state.indexes.get(index) else {
            return Ok(Vec::new());
        };
        Ok(members
            .iter()
            .filter(|(_, score)| **score >= since)
            .filter_map(|(member, _)| {
                let slot = state.live(&key_of(member), now)?;
                Some((member.clone(), slot.value.clone()))
            })
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%index))]
    async fn remove_stale_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: KeyOf<'_>,
        _deadline: Deadline,
    ) -> Result<u64> {
        let since = unix_millis(since);
        let mut state = self.write();
        let stale: Vec<String> = match state.indexes.get(index) {
            Some(members) => members
                .iter()
                .filter(|(_, score)| **score < since)
                .map(|(m, _)| m.clone())
                .collect(),
            None => return Ok(0),
        };
        for member in &stale {
            state.remove(&key_of(member));
            if let Some(members) = state.indexes.get_mut(index) {
                members.remove(member);
            }
        }
        Ok(stale.len() as u64)
    }

    // --- compute: locks, in `locks`
    async fn lock_acquire(
        &self,
        lock: &str,
        token: &str,
        ttl: Duration,
        _deadline: Deadline,
    ) -> Result<LockState> {
        Ok(self.inner.locks.take(lock, token, ttl))
    }

    async fn lock_read(
        &self,
        lock: &str,
        _deadline: Deadline,
    ) -> Result<Option<(String, Duration)>> {
        Ok(self.inner.locks.peek(lock))
    }

    async fn lock_update(
        &self,
        lock: &str,
        token: &str,
        value: &str,
        _deadline: Deadline,
    ) -> Result<bool> {
        Ok(self.inner.locks.replace(lock, token, value))
    }

    async fn lock_release(&self, lock: &str, token: &str, _deadline: Deadline) -> Result<bool> {
        Ok(self.inner.locks.drop_if(lock, token))
    }

    // --- tags: see `tags`
    async fn tag_versions_for_write(
        &self,
        tags: &[(String, Duration)],
        _deadline: Deadline,
    ) -> Result<Vec<u64>> {
        self.versions_for_write(tags)
    }

    async fn tag_versions(&self, keys: &[String], _deadline: Deadline) -> Result<Vec<Option<u64>>> {
        Ok(self.current_versions(keys))
    }

    async fn bump_tags(&self, keys: &[String], _deadline: Deadline) -> Result<u64> {
        self.bump(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::state::ENTRY_OVERHEAD;
    use super::*;

    fn store(max_bytes: u64) -> MemoryStore {
        MemoryStore::new(MemoryConfig { max_bytes })
    }

    fn later() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    /// When full, the entries nearest to expiry go first and accounting stays exact.
    #[tokio::test]
    async fn evicts_nearest_expiry_first() {
        let s = store(3 * (ENTRY_OVERHEAD + 2 + 10));
        let v = Bytes::from_static(b"0123456789");
        s.set("a", v.clone(), Duration::from_secs(10), later())
            .await
            .unwrap();
        s.set("b", v.clone(), Duration::from_secs(30), later())
            .await
            .unwrap();
        s.set("c", v.clone(), Duration::from_secs(20), later())
            .await
            .unwrap();
        s.set("d", v.clone(), Duration::from_secs(40), later())
            .await
            .unwrap();
        assert!(s.get("a", later()).await.unwrap().is_none());
        for k in ["b", "c", "d"] {
            assert!(s.get(k, later()).await.unwrap().is_some(), "{k} evicted");
        }
        assert_eq!(s.read().bytes, 3 * (ENTRY_OVERHEAD + 2 + 10));
    }

    /// A write never evicts itself: the new entry survives even when it is
    /// the one nearest to expiry.
    #[tokio::test]
    async fn a_write_never_evicts_itself() {
        let s = store(2 * (ENTRY_OVERHEAD + 2 + 10));
        let v = Bytes::from_static(b"0123456789");
        s.set("a", v.clone(), Duration::from_secs(60), later())
            .await
            .unwrap();
        s.set("b", v.clone(), Duration::from_secs(60), later())
            .await
            .unwrap();
        s.set("c", v.clone(), Duration::from_secs(1), later())
            .await
            .unwrap();
        assert!(s.get("c", later()).await.unwrap().is_some());
        assert!(s.get("a", later()).await.unwrap().is_none());
    }

    /// A batch that cannot fit changes nothing; one that fits evicts others.
    #[tokio::test]
    async fn batches_fit_whole_or_not_at_all() {
        // two-byte keys: 2 * 2 + 10 value bytes + overhead
        let one = ENTRY_OVERHEAD + 4 + 10;
        let s = store(2 * one);
        let v = Bytes::from_static(b"0123456789");
        let w = |k: &str| Write {
            key: k.into(),
            value: v.clone(),
            ttl: Duration::from_secs(1),
        };
        s.set("xx", v.clone(), Duration::from_secs(60), later())
            .await
            .unwrap();
        let err = s
            .set_many(vec![w("k1"), w("k2"), w("k3")], later())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::OutOfMemory(_)), "{err:?}");
        assert!(
            s.get("xx", later()).await.unwrap().is_some(),
            "failed batch evicted xx"
        );
        s.set_many(vec![w("k1"), w("k2")], later()).await.unwrap();
        assert!(s.get("k1", later()).await.unwrap().is_some());
        assert!(s.get("k2", later()).await.unwrap().is_some());
        assert!(s.get("xx", later()).await.unwrap().is_none());
        assert_eq!(s.read().bytes, 2 * one);
    }

    /// Overwriting a key replaces its expiry index entry instead of leaking one.
    #[tokio::test]
    async fn overwrite_keeps_index_consistent() {
        let s = store(1 << 20);
        for ttl in [5, 50, 500] {
            s.set(
                "k",
                Bytes::from_static(b"v"),
                Duration::from_secs(ttl),
                later(),
            )
            .await
            .unwrap();
        }
        let state = s.read();
        assert_eq!(state.entries.len(), 1);
        assert_eq!(state.expiries.len(), 1);
        assert_eq!(state.bytes, charge("k", &Bytes::from_static(b"v")));
    }

    /// A listing resumes after its cursor and stops at the prefix boundary.
    #[tokio::test]
    async fn scan_pages_resume_after_cursor() {
        let s = store(1 << 20);
        for k in ["p:a", "p:b", "p:c", "q:a"] {
            s.set(
                k,
                Bytes::from_static(b"v"),
                Duration::from_secs(60),
                later(),
            )
            .await
            .unwrap();
        }
        let first = s.scan("p:*", None, 2, later()).await.unwrap();
        assert_eq!(first.keys, ["p:a", "p:b"]);
        let second = s
            .scan("p:*", first.cursor.as_deref(), 2, later())
            .await
            .unwrap();
        assert_eq!(second.keys, ["p:c"]);
        assert_eq!(second.cursor, None);
    }
}
