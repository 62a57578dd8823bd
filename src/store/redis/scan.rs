//! Walking the keyspace with `SCAN`: listing pages with resumable cursors,
//! and the bulk walks (clear, count, cleanup, sampling the largest keys)
//! that go through every matching key a batch at a time. On a Cluster every
//! walk visits every master in turn (see [`super::walk`]).

use futures::{StreamExt, TryStreamExt};

use super::{RedisStore, slots};
use crate::store::{CleanupCounts, Deadline, KeySize, Result, ScanPage, StoreError};

/// Keys handed to one `UNLINK` or cleanup script call, and the `COUNT` hint
/// of bulk scans: large enough to amortise round trips, small enough not to
/// block Redis noticeably.
const BULK_BATCH: usize = 1000;

/// The most `SCAN` calls one listing page makes before it returns what it has
/// (possibly nothing) with a cursor to continue: a sparse pattern over a huge
/// keyspace must not turn one RPC into a full walk.
const MAX_SCANS_PER_PAGE: usize = 64;

/// Cleanup scripts (one per slot of a batch) in flight at once on a Cluster.
const CLEANUP_IN_FLIGHT: usize = 16;

impl RedisStore {
    /// Every key matching `pattern` on every node, a `SCAN` batch at a time.
    async fn batches<'a>(&'a self, pattern: &'a str, deadline: Deadline) -> Result<KeyBatches<'a>> {
        let mut nodes = self.walk_nodes(deadline).await?;
        nodes.reverse();
        Ok(KeyBatches {
            store: self,
            pattern,
            nodes,
            cursor: Some(0),
            deadline,
        })
    }

    /// `UNLINK`s keys given as bytes; how many existed. (A Cluster client
    /// splits the command by slot itself.)
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
        // travels in the cursor and opens the next page. On a Cluster the
        // walk visits the masters in address order, and the cursor names
        // the master it is on.
        let mut at = match cursor {
            None => Cursor::start(),
            Some(c) => Cursor::parse(c, self.is_cluster())?,
        };
        let nodes = self.walk_nodes(deadline).await?;
        let masters = masters_digest(&nodes);
        if cursor.is_some() && at.masters != masters {
            // A master replaced since the last page may sort anywhere: the
            // walk could skip one not yet visited. Refuse rather than miss.
            return Err(StoreError::Expired(format!(
                "the Redis Cluster's masters changed since the listing began (a failover \
                 or resharding; it was on {}): start the listing again",
                at.node
            )));
        }
        at.masters = masters;
        if at.node.is_empty() {
            at.node.clone_from(&nodes[0]);
        }
        let mut page = ScanPage::default();
        let take = |page: &mut ScanPage, pending: &mut Vec<String>| {
            let n = pending.len().min(page_size - page.keys.len());
            page.keys.extend(pending.drain(..n));
        };
        take(&mut page, &mut at.pending);
        for _ in 0..MAX_SCANS_PER_PAGE {
            if at.scan.is_none() {
                // this node is done: on to the next master, if any
                match nodes.iter().find(|n| **n > at.node) {
                    Some(next) => (at.node, at.scan) = (next.clone(), Some(0)),
                    None => break,
                }
            }
            let Some(from) = at.scan else { break };
            if page.keys.len() == page_size {
                break;
            }
            let room = page_size - page.keys.len();
            let (next, batch) = self
                .scan_node(
                    &at.node,
                    pattern,
                    from,
                    room.clamp(10, BULK_BATCH),
                    deadline,
                )
                .await?;
            at.scan = (next != 0).then_some(next);
            // Keys that are not UTF-8 cannot be koo's and are left out.
            at.pending
                .extend(batch.into_iter().filter_map(|k| String::from_utf8(k).ok()));
            take(&mut page, &mut at.pending);
        }
        let more_nodes = nodes.iter().any(|n| *n > at.node);
        if at.scan.is_some() || !at.pending.is_empty() || more_nodes {
            page.cursor = Some(at.format());
        }
        Ok(page)
    }

    /// Unlinks every key matching `pattern`; how many.
    pub(super) async fn clear_matching(&self, pattern: &str, deadline: Deadline) -> Result<u64> {
        let mut deleted = 0;
        let mut batches = self.batches(pattern, deadline).await?;
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
        let mut batches = self.batches(pattern, deadline).await?;
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
        let mut batches = self.batches(pattern, deadline).await?;
        while let Some(keys) = batches.next().await? {
            counts.scanned += keys.len() as u64;
            counts.removed_without_ttl += if self.is_cluster() {
                // a script may touch only its KEYS' slot
                let groups = slots::by_slot(&keys);
                futures::stream::iter(groups)
                    .map(|group| {
                        let keys: Vec<&[u8]> = group.iter().map(|&i| keys[i].as_slice()).collect();
                        async move { self.del_if_persistent(&keys, deadline).await }
                    })
                    .buffer_unordered(CLEANUP_IN_FLIGHT)
                    .try_fold(0, |sum, n| async move { Ok(sum + n) })
                    .await?
            } else {
                let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                self.del_if_persistent(&keys, deadline).await?
            };
        }
        Ok(counts)
    }

    /// Runs the cleanup script on `keys` (of one slot on a Cluster).
    async fn del_if_persistent(&self, keys: &[&[u8]], deadline: Deadline) -> Result<u64> {
        let mut invocation = self.inner.del_if_persistent.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        let invocation = &invocation;
        self.run(deadline, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
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
        let mut batches = self.batches(pattern, deadline).await?;
        while keys.len() < sample {
            match batches.next().await? {
                Some(batch) => keys.extend(batch),
                None => break,
            }
        }
        keys.truncate(sample);
        if keys.is_empty() {
            return Ok((0, Vec::new()));
        }
        // MEMORY USAGE is per key: a pipeline per slot on a Cluster
        let usage: Vec<Option<u64>> = self
            .pipe_each(
                &keys,
                |pipe, key| {
                    pipe.cmd("MEMORY").arg("USAGE").arg(key.as_slice());
                },
                deadline,
            )
            .await?;
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

/// A walk over the keys matching a pattern, one non-empty `SCAN` batch at a
/// time, node after node.
struct KeyBatches<'a> {
    store: &'a RedisStore,
    pattern: &'a str,
    /// The nodes of the walk, the current one last.
    nodes: Vec<String>,
    /// `None` once the current node is done.
    cursor: Option<u64>,
    deadline: Deadline,
}

impl KeyBatches<'_> {
    async fn next(&mut self) -> Result<Option<Vec<Vec<u8>>>> {
        while let Some(node) = self.nodes.last() {
            let Some(cursor) = self.cursor else {
                self.nodes.pop();
                self.cursor = Some(0);
                continue;
            };
            let (next, keys) = self
                .store
                .scan_node(node, self.pattern, cursor, BULK_BATCH, self.deadline)
                .await?;
            self.cursor = (next != 0).then_some(next);
            if !keys.is_empty() {
                return Ok(Some(keys));
            }
        }
        Ok(None)
    }
}

/// The masters a Cluster listing walks, as a digest its cursor carries (0
/// on one server, whose cursor carries none).
fn masters_digest(nodes: &[String]) -> u64 {
    match nodes {
        [one] if one.is_empty() => 0,
        _ => crate::store::fnv1a(nodes.join(",").as_bytes()),
    }
}

/// Where a listing is: the node (`""`: the one server), its `SCAN` cursor
/// (`None`: that node is done), keys already scanned but not yet returned,
/// and (on a Cluster) the digest of the masters it walks.
#[derive(Debug, PartialEq)]
struct Cursor {
    node: String,
    scan: Option<u64>,
    pending: Vec<String>,
    masters: u64,
}

impl Cursor {
    fn start() -> Self {
        Self {
            node: String::new(),
            scan: Some(0),
            pending: Vec::new(),
            masters: 0,
        }
    }

    /// One server: `r:{SCAN cursor, or - when SCAN is done}:{JSON array of
    /// pending keys}` (as before Clusters). A Cluster: `rc:{masters digest,
    /// hex}:{host:port}/` then the same two fields.
    fn format(&self) -> String {
        let pending = serde_json::to_string(&self.pending).unwrap_or_else(|_| "[]".to_owned());
        let scan = self.scan.map_or_else(|| "-".to_owned(), |c| c.to_string());
        if self.node.is_empty() {
            format!("r:{scan}:{pending}")
        } else {
            format!("rc:{:x}:{}/{scan}:{pending}", self.masters, self.node)
        }
    }

    /// A cursor of this deployment (`cluster` or not); another's is refused.
    fn parse(cursor: &str, cluster: bool) -> Result<Self> {
        let bad = || {
            let what = if cluster { "Redis Cluster" } else { "Redis" };
            StoreError::InvalidCursor(format!(
                "{} is not a {what} cursor",
                crate::quote::quote(cursor)
            ))
        };
        let (masters, node, rest) = if cluster {
            let rest = cursor.strip_prefix("rc:").ok_or_else(bad)?;
            let (masters, rest) = rest.split_once(':').ok_or_else(bad)?;
            let masters = u64::from_str_radix(masters, 16).map_err(|_| bad())?;
            let (node, rest) = rest.split_once('/').ok_or_else(bad)?;
            if node.is_empty() {
                return Err(bad());
            }
            (masters, node.to_owned(), rest)
        } else {
            (0, String::new(), cursor.strip_prefix("r:").ok_or_else(bad)?)
        };
        let (c, pending) = rest.split_once(':').ok_or_else(bad)?;
        let scan = match c {
            "-" => None,
            c => Some(c.parse().map_err(|_| bad())?),
        };
        let pending = serde_json::from_str(pending).map_err(|_| bad())?;
        Ok(Self {
            node,
            scan,
            pending,
            masters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(node: &str, scan: Option<u64>, pending: &[&str]) -> Cursor {
        Cursor {
            node: node.to_owned(),
            scan,
            pending: pending.iter().map(|s| s.to_string()).collect(),
            masters: if node.is_empty() { 0 } else { 0xabc },
        }
    }

    /// Cursors round-trip and foreign ones are refused.
    #[test]
    fn cursor_format() {
        let c = cursor("", Some(42), &["a:b", "x\"y"]);
        assert_eq!(Cursor::parse(&c.format(), false).unwrap(), c);
        let done = cursor("", None, &[]);
        assert_eq!(done.format(), "r:-:[]");
        assert_eq!(Cursor::parse("r:-:[]", false).unwrap(), done);
        assert!(matches!(
            Cursor::parse("m:key", false),
            Err(StoreError::InvalidCursor(_))
        ));
        assert!(Cursor::parse("r:x:[]", false).is_err());
        assert!(Cursor::parse("r:1:zz", false).is_err());
    }

    /// A Cluster cursor names its master (IPv6 too); the two kinds are not
    /// mixed up.
    #[test]
    fn cluster_cursor_format() {
        for node in ["127.0.0.1:7000", "[::1]:7001"] {
            let c = cursor(node, Some(7), &["k"]);
            assert!(c.format().starts_with("rc:"), "{}", c.format());
            assert_eq!(Cursor::parse(&c.format(), true).unwrap(), c);
            assert!(Cursor::parse(&c.format(), false).is_err());
        }
        let done = cursor("127.0.0.1:7000", None, &[]);
        assert_eq!(Cursor::parse(&done.format(), true).unwrap(), done);
        assert!(Cursor::parse("r:1:[]", true).is_err());
        assert!(Cursor::parse("rc:abc:/1:[]", true).is_err());
        assert!(Cursor::parse("rc:zz:127.0.0.1:7000/1:[]", true).is_err());
        assert!(Cursor::parse("rc:abc:127.0.0.1:7000", true).is_err());
    }

    /// One server's listing carries no digest; a Cluster's names its masters.
    #[test]
    fn masters_digest_names_the_masters() {
        assert_eq!(masters_digest(&[String::new()]), 0);
        let a = masters_digest(&["h:1".into(), "h:2".into()]);
        let b = masters_digest(&["h:1".into(), "h:3".into()]);
        assert_ne!(a, 0);
        assert_ne!(a, b);
    }
}
