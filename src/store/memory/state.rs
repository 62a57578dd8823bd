//! The embedded store's data: one ordered map of full keys, an index of
//! expiry instants, the bytes charged, and the record indexes; and the
//! eviction that makes a batch fit, nearest expiry first.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::glob;
use crate::store::{Entry, Result, StoreError};

/// Bookkeeping bytes charged per entry on top of its key and value: map
/// nodes, the expiry index entry and the `Bytes` header. An estimate, so that
/// many tiny entries still count against the capacity.
pub(super) const ENTRY_OVERHEAD: u64 = 96;

#[derive(Default)]
pub(super) struct State {
    pub(super) entries: BTreeMap<String, Slot>,
    pub(super) expiries: BTreeSet<(Instant, String)>,
    pub(super) bytes: u64,
    /// Sorted-set-like indexes of published records: index -> member -> score.
    pub(super) indexes: HashMap<String, HashMap<String, i64>>,
}

pub(super) struct Slot {
    pub(super) value: Bytes,
    pub(super) expires_at: Instant,
}

impl Slot {
    pub(super) fn live(&self, now: Instant) -> bool {
        self.expires_at > now
    }
}

pub(super) fn charge(key: &str, value: &Bytes) -> u64 {
    2 * key.len() as u64 + value.len() as u64 + ENTRY_OVERHEAD
}

impl State {
    /// The entry under `key`, unless it has expired.
    pub(super) fn live(&self, key: &str, now: Instant) -> Option<&Slot> {
        self.entries.get(key).filter(|s| s.live(now))
    }

    pub(super) fn remove(&mut self, key: &str) -> Option<Slot> {
        let slot = self.entries.remove(key)?;
        self.expiries.remove(&(slot.expires_at, key.to_owned()));
        self.bytes -= charge(key, &slot.value);
        Some(slot)
    }

    fn insert(&mut self, key: String, value: Bytes, expires_at: Instant) {
        self.remove(&key);
        self.bytes += charge(&key, &value);
        self.expiries.insert((expires_at, key.clone()));
        self.entries.insert(key, Slot { value, expires_at });
    }

    /// Applies a batch of writes, first evicting the entries nearest to
    /// expiry (expired ones come first) until the batch fits, but never an
    /// entry the batch writes. If it cannot fit, nothing changes.
    pub(super) fn write_batch(
        &mut self,
        writes: Vec<(String, Bytes, Instant)>,
        max: u64,
    ) -> Result<()> {
        let written: HashSet<&str> = writes.iter().map(|(k, _, _)| k.as_str()).collect();
        let incoming: u64 = writes.iter().map(|(k, v, _)| charge(k, v)).sum();
        let replaced: u64 = written
            .iter()
            .filter_map(|k| self.entries.get(*k).map(|s| charge(k, &s.value)))
            .sum();
        let after = self.bytes - replaced + incoming;
        let mut victims = Vec::new();
        if after > max {
            let mut freed = 0;
            for (_, key) in &self.expiries {
                if freed >= after - max {
                    break;
                }
                if !written.contains(key.as_str()) {
                    freed += charge(key, &self.entries[key].value);
                    victims.push(key.clone());
                }
            }
            if freed < after - max {
                return Err(StoreError::OutOfMemory(format!(
                    "{incoming} bytes do not fit in the embedded store's capacity of {max} bytes (KOO_MEMORY_MAX_BYTES)"
                )));
            }
        }
        drop(written);
        for key in victims {
            self.remove(&key);
        }
        for (key, value, expires_at) in writes {
            self.insert(key, value, expires_at);
        }
        Ok(())
    }

    /// Live keys in the range a pattern's literal prefix selects that match it.
    pub(super) fn matching<'a>(
        &'a self,
        pattern: &'a str,
        now: Instant,
    ) -> impl Iterator<Item = (&'a String, &'a Slot)> + 'a {
        let prefix = glob::literal_prefix(pattern);
        self.entries
            .range(prefix.clone()..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .filter(move |(k, s)| s.live(now) && glob::matches(pattern.as_bytes(), k.as_bytes()))
    }

    pub(super) fn purge_expired(&mut self, now: Instant) -> u64 {
        let mut purged = 0;
        while let Some((at, key)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            self.remove(&key);
            purged += 1;
        }
        purged
    }
}

pub(super) fn expiry(ttl: Duration) -> Instant {
    let now = Instant::now();
    // A TTL too large for the clock is as good as forever; cap at 100 years.
    now.checked_add(ttl)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

pub(super) fn entry(slot: &Slot, now: Instant) -> Entry {
    Entry {
        value: slot.value.clone(),
        ttl: Some(slot.expires_at.saturating_duration_since(now)),
    }
}
