//! The cache's flags, shared by `koo serve` (which serves the cache) and
//! `koo worker` (which writes tasks' `cache_result` entries), so that an
//! entry is written the same way by either.

use std::time::Duration;

use clap::Args;

use super::{ConfigError, MAX_VALUE_SIZE_CEILING, parse_positive_duration};
use crate::cache::CacheConfig;

/// The cache's settings: what `koo serve` serves, and what `koo worker`
/// applies when it caches a task's result (`cache_result`), so that an
/// entry is written the same way by either.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Default TTL of the app, db and session levels.
    #[arg(long, env = "CACHE_DEFAULT_TTL", value_name = "CACHE_DEFAULT_TTL", default_value = "3600",
          value_parser = parse_positive_duration)]
    pub cache_default_ttl: Duration,
    /// Default TTL of the api level.
    #[arg(long, env = "CACHE_API_DEFAULT_TTL", value_name = "CACHE_API_DEFAULT_TTL", default_value = "300",
          value_parser = parse_positive_duration)]
    pub cache_api_default_ttl: Duration,
    /// Values larger than this many bytes are zlib-compressed when that makes them smaller.
    #[arg(
        long,
        env = "CACHE_COMPRESSION_THRESHOLD",
        value_name = "CACHE_COMPRESSION_THRESHOLD",
        default_value_t = 1024
    )]
    pub cache_compression_threshold: usize,
    /// zlib level, 0 (store) to 9 (smallest); 1 favours latency.
    #[arg(long, env = "KOO_COMPRESSION_LEVEL", value_name = "KOO_COMPRESSION_LEVEL", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=9))]
    pub compression_level: u32,
    /// Largest value accepted, in bytes, before compression (at most 1 GiB).
    #[arg(
        long,
        env = "CACHE_MAX_VALUE_SIZE",
        value_name = "CACHE_MAX_VALUE_SIZE",
        default_value_t = 10_485_760
    )]
    pub cache_max_value_size: usize,
    /// Longest key accepted, in bytes.
    #[arg(
        long,
        env = "KOO_MAX_KEY_SIZE",
        value_name = "KOO_MAX_KEY_SIZE",
        default_value_t = 1024
    )]
    pub max_key_size: usize,
}

impl CacheArgs {
    /// Checks the values and builds the cache settings under `prefix` (the
    /// serve-only settings at their defaults).
    pub fn cache_config(&self, prefix: &str) -> Result<CacheConfig, ConfigError> {
        let err = |variable, reason: String| ConfigError { variable, reason };
        if self.cache_max_value_size == 0 || self.cache_max_value_size > MAX_VALUE_SIZE_CEILING {
            return Err(err(
                "CACHE_MAX_VALUE_SIZE",
                format!(
                    "must be between 1 and {MAX_VALUE_SIZE_CEILING} bytes, got {}",
                    self.cache_max_value_size
                ),
            ));
        }
        for (variable, ttl) in [
            ("CACHE_DEFAULT_TTL", self.cache_default_ttl),
            ("CACHE_API_DEFAULT_TTL", self.cache_api_default_ttl),
        ] {
            if ttl < Duration::from_millis(1) || ttl > crate::cache::MAX_TTL {
                return Err(err(
                    variable,
                    format!("must be between 1 ms and 100 years, got {ttl:?}"),
                ));
            }
        }
        if self.max_key_size == 0 || self.max_key_size > 64 * 1024 {
            return Err(err(
                "KOO_MAX_KEY_SIZE",
                format!(
                    "must be between 1 and 65536 bytes, got {}",
                    self.max_key_size
                ),
            ));
        }
        Ok(CacheConfig {
            prefix: prefix.to_owned(),
            default_ttl: self.cache_default_ttl,
            api_default_ttl: self.cache_api_default_ttl,
            compression_threshold: self.cache_compression_threshold,
            compression_level: self.compression_level,
            max_value_size: self.cache_max_value_size,
            max_key_size: self.max_key_size,
            ..CacheConfig::default()
        })
    }
}
