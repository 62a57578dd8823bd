//! Cache tag versions in the embedded store (see `crate::cache::tags`): the
//! same layout as on Redis, one entry per live tag under its tag key holding
//! a random u64 (decimal), so that tags share the entries' capacity,
//! eviction, expiry and data-directory image.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::MemoryStore;
use super::state::expiry;
use crate::store::{Result, StoreError};

impl MemoryStore {
    /// See [`crate::store::CacheBackend::tag_versions_for_write`].
    pub(super) fn versions_for_write(&self, tags: &[(String, Duration)]) -> Result<Vec<u64>> {
        let now = Instant::now();
        let mut versions = Vec::with_capacity(tags.len());
        let mut writes = Vec::new();
        let bytes = {
            let mut state = self.write();
            for (key, ttl) in tags {
                let at = expiry(*ttl);
                match state.live(key, now) {
                    Some(slot) => {
                        versions.push(parse(&slot.value)?);
                        // Only ever lengthened, as `PEXPIRE GT` does.
                        if slot.expires_at < at {
                            writes.push((key.clone(), slot.value.clone(), at));
                        }
                    }
                    None => {
                        let v: u64 = rand::random();
                        versions.push(v);
                        writes.push((key.clone(), Bytes::from(v.to_string()), at));
                    }
                }
            }
            state.write_batch(writes, self.inner.max_bytes)?;
            state.bytes
        };
        self.note_peak(bytes);
        Ok(versions)
    }

    /// See [`crate::store::CacheBackend::tag_versions`].
    pub(super) fn current_versions(&self, keys: &[String]) -> Vec<Option<u64>> {
        let now = Instant::now();
        let state = self.read();
        keys.iter()
            .map(|k| state.live(k, now).and_then(|s| parse(&s.value).ok()))
            .collect()
    }

    /// See [`crate::store::CacheBackend::bump_tags`].
    pub(super) fn bump(&self, keys: &[String]) -> Result<u64> {
        let now = Instant::now();
        let mut state = self.write();
        let writes: Vec<_> = keys
            .iter()
            .filter_map(|k| {
                let at = state.live(k, now)?.expires_at;
                Some((
                    k.clone(),
                    Bytes::from(rand::random::<u64>().to_string()),
                    at,
                ))
            })
            .collect();
        let existed = writes.len() as u64;
        state.write_batch(writes, self.inner.max_bytes)?;
        Ok(existed)
    }
}

fn parse(value: &Bytes) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            StoreError::Backend(format!(
                "a cache tag key holds {}, not a tag version",
                crate::quote::quote(&String::from_utf8_lossy(value))
            ))
        })
}
