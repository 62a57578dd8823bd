//! The cache's settings and the limits every call is held to.

use std::path::PathBuf;
use std::time::Duration;

use super::Level;

/// The most keys or entries one batch call takes.
pub const MAX_BATCH: usize = 1000;
/// Default page size of `ListKeys`.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page size of `ListKeys`; larger requests are served this many.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Longest accepted `ListKeys` pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Longest TTL accepted: 100 years, far beyond any cache's use and well within
/// Redis's millisecond range.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Cache settings (the seed's `CACHE_*` variables and koo's additions).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Prefix of every key koo writes.
    pub prefix: String,
    /// TTL of the app, db and session levels when a write names none.
    pub default_ttl: Duration,
    /// TTL of the api level when a write names none.
    pub api_default_ttl: Duration,
    /// Values larger than this many bytes are compressed (when it helps).
    pub compression_threshold: usize,
    /// zlib level, 0 to 9.
    pub compression_level: u32,
    /// Largest value accepted, in bytes, before compression.
    pub max_value_size: usize,
    /// Longest key accepted, in bytes.
    pub max_key_size: usize,
    /// JSON Lines file of entries to preload on `Warm`.
    pub warm_file: Option<PathBuf>,
    /// How often this instance publishes its metrics for the others.
    pub metrics_flush_interval: Duration,
    /// How long key counts are reused before the keyspace is walked again.
    pub key_count_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            prefix: "koo".to_owned(),
            default_ttl: Duration::from_secs(3600),
            api_default_ttl: Duration::from_secs(300),
            compression_threshold: 1024,
            compression_level: 1,
            max_value_size: 10 * 1024 * 1024,
            max_key_size: 1024,
            warm_file: None,
            metrics_flush_interval: Duration::from_secs(1),
            key_count_interval: Duration::from_secs(10),
        }
    }
}

impl CacheConfig {
    /// The largest gRPC message koo accepts or sends: one value at the size
    /// limit plus room for its key and framing.
    pub fn message_limit(&self) -> usize {
        self.max_value_size + self.max_key_size + 1024 * 1024
    }

    /// The default TTL of `level`.
    pub fn ttl_for(&self, level: Level) -> Duration {
        match level {
            Level::Api => self.api_default_ttl,
            _ => self.default_ttl,
        }
    }

    /// How long a published metrics record counts as live.
    pub(super) fn record_ttl(&self) -> Duration {
        self.metrics_flush_interval
            .saturating_mul(3)
            .max(Duration::from_secs(10))
    }
}
