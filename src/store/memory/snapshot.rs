//! The embedded cache's entries as plain data, for the data directory
//! (`crate::persist`): what a restart needs to find them again.
//!
//! Expiry is stored as an absolute time (ms since the Unix epoch), since the
//! process's `Instant`s mean nothing to the next one: an entry keeps the TTL
//! it had left, minus the time koo was down, and one that expired meanwhile
//! is not loaded. Values are base64 in the JSON document.

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::MemoryStore;
use crate::store::unix_millis;

/// Saved cache entries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheImage {
    /// Live entries, in key order.
    pub entries: Vec<CacheEntryImage>,
}

/// One saved entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntryImage {
    /// The full key.
    pub key: String,
    /// The stored bytes, base64.
    pub value: String,
    /// When it expires (ms since the Unix epoch).
    pub expires_ms: i64,
}

/// What loading an image did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheLoad {
    /// Entries loaded.
    pub loaded: u64,
    /// Entries that expired while koo was down.
    pub expired: u64,
    /// Entries that no longer fit (a smaller `KOO_MEMORY_MAX_BYTES`).
    pub evicted: u64,
}

impl MemoryStore {
    /// The live entries whose key starts with `prefix`.
    pub fn export(&self, prefix: &str) -> CacheImage {
        let now = Instant::now();
        let wall = SystemTime::now();
        let state = self.read();
        let entries = state
            .entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, s)| s.live(now))
            .map(|(key, slot)| CacheEntryImage {
                key: key.clone(),
                value: STANDARD.encode(&slot.value),
                expires_ms: unix_millis(wall + slot.expires_at.duration_since(now)),
            })
            .collect();
        CacheImage { entries }
    }

    /// How many live entries start with `prefix`.
    pub fn count_live(&self, prefix: &str) -> u64 {
        let now = Instant::now();
        self.read()
            .entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, s)| s.live(now))
            .count() as u64
    }

    /// Loads saved entries into this store, with the TTL they have left;
    /// a value that is not base64 is an error naming its key.
    pub fn import(&self, image: CacheImage) -> Result<CacheLoad, String> {
        let now = Instant::now();
        let wall = unix_millis(SystemTime::now());
        let mut load = CacheLoad::default();
        let mut state = self.write();
        for e in image.entries {
            let left = e.expires_ms.saturating_sub(wall);
            if left <= 0 {
                load.expired += 1;
                continue;
            }
            let value = STANDARD
                .decode(&e.value)
                .map_err(|err| format!("cache entry {:?}: value is not base64: {err}", e.key))?;
            let at = super::expiry(Duration::from_millis(left as u64)).max(now);
            match state.write_batch(vec![(e.key, Bytes::from(value), at)], self.inner.max_bytes) {
                Ok(()) => load.loaded += 1,
                Err(_) => load.evicted += 1,
            }
        }
        let bytes = state.bytes;
        drop(state);
        self.note_peak(bytes);
        Ok(load)
    }
}

#[cfg(test)]
mod tests {
    use super::super::MemoryConfig;
    use super::*;
    use crate::store::{CacheBackend, Deadline};

    /// Entries come back with the TTL they had left; expired ones and keys
    /// outside the prefix are not saved or not loaded.
    #[tokio::test]
    async fn entries_round_trip_with_their_remaining_ttl() {
        let a = MemoryStore::new(MemoryConfig::default());
        let d = Deadline::after(Duration::from_secs(5));
        a.set(
            "p:x",
            Bytes::from_static(b"\x00\xffbin"),
            Duration::from_secs(100),
            d,
        )
        .await
        .unwrap();
        a.set(
            "q:y",
            Bytes::from_static(b"other"),
            Duration::from_secs(100),
            d,
        )
        .await
        .unwrap();
        let mut image = a.export("p:");
        assert_eq!(image.entries.len(), 1);
        image.entries.push(CacheEntryImage {
            key: "p:gone".into(),
            value: STANDARD.encode(b"old"),
            expires_ms: unix_millis(SystemTime::now()) - 1,
        });
        let b = MemoryStore::new(MemoryConfig::default());
        let load = b.import(image).unwrap();
        assert_eq!((load.loaded, load.expired), (1, 1));
        let got = b.get("p:x", d).await.unwrap().unwrap();
        assert_eq!(&got.value[..], b"\x00\xffbin");
        let ttl = got.ttl.unwrap();
        assert!(ttl > Duration::from_secs(98) && ttl <= Duration::from_secs(100));
        assert!(b.get("q:y", d).await.unwrap().is_none());
        assert!(b.get("p:gone", d).await.unwrap().is_none());
    }
}
