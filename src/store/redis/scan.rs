//! Walking the keyspace with `SCAN`: listing pages with resumable cursors,
//! and the bulk walks (clear, count, cleanup, sampling the largest keys)
//! that go through every matching key a batch at a time.

use super::RedisStore;
use crate::store::{CleanupCounts, Deadline, KeySize, Result, ScanPage, StoreError};

/// Keys handed to one `UNLINK` or cleanup script call, and the `COUNT` hint
/// of bulk scans: large enough to amortise round trips, small enough not to
/// block Redis noticeably.
const BULK_BATCH: usize = 1000;

/// The most `SCAN` calls one listing page makes before it returns what it has
/// (possibly nothing) with a cursor to continue: a sparse pattern over a huge
/// keyspace must not turn one RPC into a full walk.
const MAX_SCANS_PER_PAGE: usize = 64;

impl RedisStore {
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

    /// A listing page (see [`crate::store::CacheBackend::scan`]).
    pub(super) async fn scan_page(
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

    /// Unlinks every key matching `pattern`; how many.
    pub(super) async fn clear_matching(&self, pattern: &str, deadline: Deadline) -> Result<u64> {
        let mut deleted = 0;
        let mut batches = self.batches(pattern, deadline);
        while let Some(keys) = batches.next().await? {
            deleted += self.unlink(&keys, deadline).await?;
        }
        Ok(deleted)
    }

    /// Counts matching keys by prefix, in one walk.
    pub(super) async fn count_matching(
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

    /// Removes matching keys without a TTL.
    pub(super) async fn cleanup_matching(
        &self,
        pattern: &str,
        deadline: Deadline,
    ) -> Result<CleanupCounts> {
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

    /// Samples matching keys and returns the largest.
    pub(super) async fn largest_matching(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
