//! Every Redis key name koo writes, built in one place.
//!
//! Layout, with the default prefix `koo`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `koo:cache:{level}:{key}` | string | a cached value (always with a TTL) |
//! | `koo:stats:cache:instances` | sorted set | koo instances publishing cache metrics, scored by last publish (ms) |
//! | `koo:stats:cache:instance:{id}` | string | one instance's metrics record (with a TTL) |
//!
//! The prefix lets several deployments share one Redis; it is escaped in
//! every `SCAN MATCH` pattern so that a prefix with glob characters cannot
//! widen a match beyond koo's own keys.

use crate::cache::Level;
use crate::glob;

/// Key names for one prefix.
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
    escaped: String,
    /// `{prefix}:cache:{level}:` per level, built once.
    level_prefixes: [String; 4],
}

impl KeySpace {
    /// Key names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            escaped: glob::escape(prefix),
            level_prefixes: Level::ALL.map(|l| format!("{prefix}:cache:{}:", l.as_str())),
        }
    }

    /// `{prefix}:cache:{level}:` — the start of every key of a level.
    pub fn level_prefix(&self, level: Level) -> &str {
        &self.level_prefixes[level.index()]
    }

    /// The Redis key of a cache entry.
    pub fn cache_key(&self, level: Level, key: &str) -> String {
        let prefix = self.level_prefix(level);
        let mut out = String::with_capacity(prefix.len() + key.len());
        out.push_str(prefix);
        out.push_str(key);
        out
    }

    /// The user's key within a full cache key of `level`.
    pub fn user_key<'a>(&self, level: Level, full: &'a str) -> Option<&'a str> {
        full.strip_prefix(self.level_prefix(level))
    }

    /// A `SCAN MATCH` pattern for the keys of `level` that match the user's
    /// (validated) `pattern`.
    pub fn level_pattern(&self, level: Level, pattern: &str) -> String {
        format!("{}:cache:{}:{}", self.escaped, level.as_str(), pattern)
    }

    /// A pattern for every cache key of every level.
    pub fn cache_pattern(&self) -> String {
        format!("{}:cache:*", self.escaped)
    }

    /// The sorted set of instances publishing cache metrics.
    pub fn cache_metrics_index(&self) -> String {
        format!("{}:stats:cache:instances", self.prefix)
    }

    /// One instance's cache metrics record.
    pub fn cache_metrics_record(&self, instance: &str) -> String {
        format!("{}:stats:cache:instance:{instance}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys and patterns keep levels apart and escape the prefix.
    #[test]
    fn layout() {
        let ks = KeySpace::new("k*o");
        assert_eq!(ks.cache_key(Level::Api, "a:b"), "k*o:cache:api:a:b");
        assert_eq!(ks.level_pattern(Level::Db, "x*"), "k\\*o:cache:db:x*");
        assert_eq!(ks.user_key(Level::Api, "k*o:cache:api:a:b"), Some("a:b"));
        assert_eq!(ks.user_key(Level::App, "k*o:cache:api:a:b"), None);
        let pattern = ks.level_pattern(Level::App, "*");
        assert!(glob::matches(
            pattern.as_bytes(),
            ks.cache_key(Level::App, "z").as_bytes()
        ));
        assert!(!glob::matches(pattern.as_bytes(), b"kxo:cache:app:z"));
        assert!(!glob::matches(
            pattern.as_bytes(),
            ks.cache_key(Level::Api, "z").as_bytes()
        ));
    }
}
