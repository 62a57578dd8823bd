//! Tags, `InvalidateTags` and soft TTLs: what an entry carries besides its
//! value (stored in the value's version-2 block, [`super::value::Meta`]).
//!
//! **Versioned tags**, as Symfony's `TagAwareAdapter` does them. Each
//! (level, tag) has a version in a key of its own (`KeySpace::tag_key`), a
//! random u64. A tagged write reads each tag's version (creating it when
//! absent) in one round trip, then writes the entry with those versions in
//! its header. A read of a tagged entry reads its tags' versions (one `MGET`,
//! only for tagged entries; one for a whole `GetMany`) and answers a miss
//! when any is absent or different. `InvalidateTags` replaces each tag's
//! version with a new random one: one command per tag, however many entries
//! carry it, and no entry is touched (dead ones expire, or are unlinked when
//! next read).
//!
//! Why versions and not tag sets (a set of keys per tag): invalidation is
//! O(tags) rather than O(entries), nothing grows with the number of
//! entries, and a tag costs one small key that expires with the last entry
//! carrying it (a write only ever lengthens its TTL). The price is a second
//! round trip on tagged reads and writes; untagged entries pay nothing.
//!
//! Why random versions and not a counter: a tag key that expires or is
//! evicted and is created again must never match entries written under its
//! old life; a fresh random u64 cannot, where a counter restarting at 1
//! would.
//!
//! Races, all of which end in a miss, never in a stale hit: an
//! `InvalidateTags` between a write's two round trips makes the new entry
//! miss (it holds the old version); a tag key evicted under memory pressure
//! makes its entries miss; a write that races the unlinking of a dead entry
//! under the same key may be unlinked with it.
//!
//! **Soft TTL**: an entry may carry a soft expiry before its TTL; after it,
//! reads still answer the value, marked `stale`, so that one caller can
//! refresh it while others keep being served (GetOrLock builds on this).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::value::Meta;
use super::{Cache, CacheError, Hit, Level, NewEntry, Result};
use crate::store::{Deadline, unix_millis};

/// Most tags on one entry.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 256;
/// Most tags one `InvalidateTags` names.
pub const MAX_INVALIDATE: usize = 1000;

/// Checks one tag named `field`.
fn check_tag(field: impl FnOnce() -> String, tag: &str) -> Result<()> {
    if tag.is_empty() {
        return Err(CacheError::invalid(
            field(),
            format!("must not be empty (a tag is 1 to {MAX_TAG_LEN} bytes)"),
        ));
    }
    if tag.len() > MAX_TAG_LEN {
        // (a tag this long is always quoted with its length)
        return Err(CacheError::invalid(
            field(),
            format!(
                "{} is over the limit of {MAX_TAG_LEN} bytes",
                crate::quote::quote(tag)
            ),
        ));
    }
    Ok(())
}

/// Whether `e` carries tags or a soft TTL (and so needs version 2).
pub(super) fn has_meta(e: &NewEntry) -> bool {
    !e.tags.is_empty() || e.soft_ttl.is_some()
}

/// Checks an entry's tags and soft TTL; `at` prefixes the field names.
pub(super) fn check_meta(at: impl Fn() -> String, e: &NewEntry, ttl: Duration) -> Result<()> {
    check(&at(), &e.tags, e.soft_ttl, ttl)
}

/// Checks tags and a soft TTL for an entry of `ttl` (also for a task's
/// `cache_result`, at submission); `at` prefixes the field names
/// (`entries[2].`).
pub fn check(at: &str, tags: &[String], soft_ttl: Option<Duration>, ttl: Duration) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(CacheError::invalid(
            format!("{at}tags"),
            format!("has {} tags, over the limit of {MAX_TAGS}", tags.len()),
        ));
    }
    for (i, tag) in tags.iter().enumerate() {
        check_tag(|| format!("{at}tags[{i}]"), tag)?;
    }
    if let Some(soft) = soft_ttl
        && soft >= ttl
    {
        return Err(CacheError::invalid(
            format!("{at}soft_ttl"),
            format!("must be shorter than the TTL ({soft:?} is not under {ttl:?})"),
        ));
    }
    Ok(())
}

/// The stale flag and time left before it turns stale, from `meta`.
pub(super) fn freshness(meta: &Meta, hit: &mut Hit) {
    let Some(at) = meta.soft_expiry_ms else {
        return;
    };
    let when = SystemTime::UNIX_EPOCH + Duration::from_millis(at.max(0) as u64);
    hit.soft_expiry = Some(when);
    hit.compute = Duration::from_millis(u64::from(meta.compute_ms));
    match when.duration_since(SystemTime::now()) {
        Ok(left) if !left.is_zero() => hit.soft_ttl = Some(left),
        _ => hit.stale = true,
    }
}

impl Cache {
    /// The version-2 blocks of a batch of validated writes (`ttls` in
    /// order), reading every distinct tag's version in one store call; `None`
    /// when no entry needs one (the plain path: no call, no allocation).
    pub(super) async fn metas(
        &self,
        entries: &[NewEntry],
        ttls: &[Duration],
        deadline: Deadline,
    ) -> Result<Option<Vec<Meta>>> {
        if !entries.iter().any(has_meta) {
            return Ok(None);
        }
        // Each distinct tag key once, with the longest TTL of its entries
        // (indexed: a SetMany may name 1000 entries of 32 tags).
        let mut wanted: Vec<(String, Duration)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (e, ttl) in entries.iter().zip(ttls) {
            for tag in &e.tags {
                let key = self.inner.keys.tag_key(e.level, tag);
                match index.get(&key) {
                    Some(&i) => wanted[i].1 = wanted[i].1.max(*ttl),
                    None => {
                        index.insert(key.clone(), wanted.len());
                        wanted.push((key, *ttl));
                    }
                }
            }
        }
        let versions = self
            .inner
            .store
            .tag_versions_for_write(&wanted, deadline)
            .await?;
        let now = SystemTime::now();
        let metas = entries
            .iter()
            .map(|e| {
                let mut tags: Vec<(String, u64)> = Vec::with_capacity(e.tags.len());
                for tag in &e.tags {
                    if tags.iter().any(|(t, _)| t == tag) {
                        continue; // duplicates dropped
                    }
                    let key = self.inner.keys.tag_key(e.level, tag);
                    let version = index.get(&key).and_then(|&i| versions.get(i));
                    tags.push((tag.clone(), version.copied().unwrap_or(0)));
                }
                Meta {
                    soft_expiry_ms: e.soft_ttl.map(|s| unix_millis(now + s)),
                    compute_ms: 0,
                    tags,
                }
            })
            .collect();
        Ok(Some(metas))
    }

    /// Turns hits whose tags were invalidated into misses: one store call
    /// for the tags of every hit, made only when some hit has tags
    /// (`versions[i]` are hit `i`'s tag versions as written). Dead entries
    /// are unlinked, best-effort, before answering (one more round trip,
    /// once per dead entry), so that they stop taking memory.
    pub(super) async fn drop_invalidated(
        &self,
        level: Level,
        keys: &[String],
        hits: &mut [Option<Hit>],
        versions: &[Vec<u64>],
        deadline: Deadline,
    ) -> Result<()> {
        let mut wanted: Vec<String> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for hit in hits.iter().flatten() {
            for tag in &hit.tags {
                if !index.contains_key(tag.as_str()) {
                    index.insert(tag, wanted.len());
                    wanted.push(self.inner.keys.tag_key(level, tag));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let current = self.inner.store.tag_versions(&wanted, deadline).await?;
        let is_dead: Vec<bool> = hits
            .iter()
            .zip(versions)
            .map(|(slot, written)| {
                slot.as_ref().is_some_and(|hit| {
                    !hit.tags.iter().zip(written).all(|(tag, v)| {
                        let now = index.get(tag.as_str()).and_then(|&i| current.get(i));
                        now.copied().flatten() == Some(*v)
                    })
                })
            })
            .collect();
        drop(index);
        let mut dead = Vec::new();
        for ((slot, key), is_dead) in hits.iter_mut().zip(keys).zip(is_dead) {
            if is_dead {
                *slot = None;
                dead.push(self.inner.keys.cache_key(level, key));
            }
        }
        if !dead.is_empty() {
            // Best-effort: a failure leaves the entry to expire, still dead.
            let _ = self.inner.store.delete(&dead, deadline).await;
        }
        Ok(())
    }

    /// Makes every entry carrying any of `tags` miss from now on, in
    /// `level` or (`None`) in every level, on every koo instance sharing
    /// the store: one write per (level, tag). Answers how many of those
    /// pairs had live entries.
    pub async fn invalidate_tags(
        &self,
        level: Option<Level>,
        tags: &[String],
        deadline: Deadline,
    ) -> Result<u64> {
        if tags.is_empty() || tags.len() > MAX_INVALIDATE {
            return Err(CacheError::invalid(
                "tags",
                format!("has {} tags; give 1 to {MAX_INVALIDATE}", tags.len()),
            ));
        }
        for (i, tag) in tags.iter().enumerate() {
            check_tag(|| format!("tags[{i}]"), tag)?;
        }
        let levels: &[Level] = match &level {
            Some(l) => std::slice::from_ref(l),
            None => &Level::ALL,
        };
        let mut keys: Vec<String> = levels
            .iter()
            .flat_map(|l| tags.iter().map(|t| self.inner.keys.tag_key(*l, t)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let result = self
            .inner
            .store
            .bump_tags(&keys, deadline)
            .await
            .map_err(CacheError::from);
        for l in levels {
            self.inner.metrics.operation(*l);
            if result.is_err() {
                self.inner.metrics.error(*l);
            }
        }
        // near caches drop what carries the tags (`None`: in every level)
        self.announce(result.is_ok(), deadline, || {
            vec![super::bus::Change::tags(level, tags.to_vec())]
        })
        .await;
        result
    }
}
