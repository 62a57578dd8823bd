//! The cache's commands on Redis: the [`CacheBackend`] implementation. Per
//! key calls are one pipelined round trip; the pattern walks live in
//! [`super::scan`], the memory report in [`super::info`], the instance
//! records in [`super::records`].

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::watch;

use super::RedisStore;
use crate::store::{
    BackendKind, CacheBackend, CircuitState, CleanupCounts, Deadline, Entry, KeyOf, KeySize,
    LastError, LockState, MemoryReport, Result, ScanPage, Write,
};

#[tonic::async_trait]
impl CacheBackend for RedisStore {
    fn kind(&self) -> BackendKind {
        BackendKind::Redis
    }

    // No span on the per-key hot path (get, get_many, set, set_many): even a
    // disabled span costs a callsite check per call, measured on cache Get.
    async fn get(&self, key: &str, deadline: Deadline) -> Result<Option<Entry>> {
        let (_in_flight, others) = self.inner.gather.enter();
        if others {
            return self.gathered_get(key, deadline).await;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
        let (value, pttl): (Option<Vec<u8>>, i64) = self.query_pipe(&pipe, deadline).await?;
        Ok(value.map(|v| entry(v, pttl)))
    }

    async fn get_many(&self, keys: &[String], deadline: Deadline) -> Result<Vec<Option<Entry>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let replies: Vec<(Option<Vec<u8>>, i64)> = self
            .pipe_each(
                keys,
                |pipe, key| {
                    pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
                },
                deadline,
            )
            .await?;
        Ok(replies
            .into_iter()
            .map(|(v, pttl)| v.map(|v| entry(v, pttl)))
            .collect())
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Duration, deadline: Deadline) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(value.as_ref())
            .arg("PX")
            .arg(ttl_millis(ttl));
        self.query::<()>(&cmd, deadline).await
    }

    async fn set_many(&self, writes: Vec<Write>, deadline: Deadline) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        // One MULTI/EXEC: all or nothing on a server; on a Cluster, per
        // slot (keys sharing a `{hash tag}` are all or nothing together).
        self.write_each(
            &writes,
            true,
            |pipe, w| {
                pipe.cmd("SET")
                    .arg(&w.key)
                    .arg(w.value.as_ref())
                    .arg("PX")
                    .arg(ttl_millis(w.ttl))
                    .ignore();
            },
            deadline,
        )
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(keys = keys.len()))]
    async fn sizes(&self, keys: &[String], deadline: Deadline) -> Result<Vec<u64>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.pipe_each(
            keys,
            |pipe, key| {
                pipe.cmd("STRLEN").arg(key);
            },
            deadline,
        )
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(keys = keys.len()))]
    async fn delete(&self, keys: &[String], deadline: Deadline) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(keys);
        self.query(&cmd, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern, %page_size))]
    async fn scan(
        &self,
        pattern: &str,
        cursor: Option<&str>,
        page_size: usize,
        deadline: Deadline,
    ) -> Result<ScanPage> {
        self.scan_page(pattern, cursor, page_size, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern))]
    async fn clear(&self, pattern: &str, deadline: Deadline) -> Result<u64> {
        self.clear_matching(pattern, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern))]
    async fn count_by_prefix(
        &self,
        pattern: &str,
        prefixes: &[String],
        deadline: Deadline,
    ) -> Result<Vec<u64>> {
        self.count_matching(pattern, prefixes, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern))]
    async fn cleanup(&self, pattern: &str, deadline: Deadline) -> Result<CleanupCounts> {
        self.cleanup_matching(pattern, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%pattern, %sample, %top))]
    async fn largest_keys(
        &self,
        pattern: &str,
        sample: usize,
        top: usize,
        deadline: Deadline,
    ) -> Result<(u64, Vec<KeySize>)> {
        self.largest_matching(pattern, sample, top, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn memory(&self, deadline: Deadline) -> Result<MemoryReport> {
        RedisStore::memory(self, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn probe(&self, deadline: Deadline) -> Result<Duration> {
        RedisStore::probe(self, deadline).await
    }

    fn circuit_state(&self) -> CircuitState {
        self.inner.breaker.state()
    }

    fn watch_circuit(&self) -> watch::Receiver<CircuitState> {
        self.inner.breaker.watch()
    }

    fn last_error(&self) -> Option<LastError> {
        self.inner.breaker.last_error()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%index, %member))]
    async fn publish_record(
        &self,
        index: &str,
        key: &str,
        member: &str,
        payload: Bytes,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        self.publish(index, key, member, payload, ttl, deadline)
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%index))]
    async fn read_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: KeyOf<'_>,
        deadline: Deadline,
    ) -> Result<Vec<(String, Bytes)>> {
        self.read_published(index, since, key_of, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%index))]
    async fn remove_stale_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: KeyOf<'_>,
        deadline: Deadline,
    ) -> Result<u64> {
        self.remove_stale(index, since, key_of, deadline).await
    }

    // --- compute: locks, in `super::lock`
    async fn lock_acquire(
        &self,
        lock: &str,
        token: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<LockState> {
        self.lock_take(lock, token, ttl, deadline).await
    }

    async fn lock_read(
        &self,
        lock: &str,
        deadline: Deadline,
    ) -> Result<Option<(String, Duration)>> {
        self.lock_peek(lock, deadline).await
    }

    async fn lock_update(
        &self,
        lock: &str,
        token: &str,
        value: &str,
        deadline: Deadline,
    ) -> Result<bool> {
        self.lock_replace(lock, token, value, deadline).await
    }

    async fn lock_release(&self, lock: &str, token: &str, deadline: Deadline) -> Result<bool> {
        self.lock_drop(lock, token, deadline).await
    }

    // --- tags: see `super::tags`
    #[tracing::instrument(level = "debug", skip_all, fields(tags = tags.len()))]
    async fn tag_versions_for_write(
        &self,
        tags: &[(String, Duration)],
        deadline: Deadline,
    ) -> Result<Vec<u64>> {
        self.versions_for_write(tags, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(tags = keys.len()))]
    async fn tag_versions(&self, keys: &[String], deadline: Deadline) -> Result<Vec<Option<u64>>> {
        self.current_versions(keys, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(tags = keys.len()))]
    async fn bump_tags(&self, keys: &[String], deadline: Deadline) -> Result<u64> {
        self.bump(keys, deadline).await
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
pub(super) fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}
