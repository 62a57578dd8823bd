//! What the cache's reads and writes take and return: an entry to write,
//! a value read, what a write stored, a page of keys.

use std::time::{Duration, SystemTime};

use super::{Level, Value};

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
    /// Its tags, for `InvalidateTags` (validated by the cache).
    pub tags: Vec<String>,
    /// Its soft TTL (stale-while-revalidate); `None` means none.
    pub soft_ttl: Option<Duration>,
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
    /// The tags it was set with.
    pub tags: Vec<String>,
    /// Whether it is past its soft TTL.
    pub stale: bool,
    /// Time left before it turns stale (`None`: no soft TTL, or stale).
    pub soft_ttl: Option<Duration>,
    /// When it turns (or turned) stale; `None`: no soft TTL.
    pub soft_expiry: Option<SystemTime>,
    /// How long computing it took, as its writer said (zero: unknown), for
    /// probabilistic early refresh.
    pub compute: Duration,
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
    /// The stored size without koo's header and the entry's tags and soft
    /// expiry: what compression made of `size` (the metrics' "stored").
    pub payload_size: u64,
}

/// One page of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// User keys.
    pub keys: Vec<String>,
    /// Token of the next page; empty on the last.
    pub next_page_token: String,
}
