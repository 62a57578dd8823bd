//! Listing and clearing a level's keys: `ListKeys` pages with their
//! tokens, and `ClearLevel`.

use std::time::Instant;

use base64::Engine;

use super::metrics::Op;
use super::{
    Cache, CacheError, DEFAULT_PAGE_SIZE, KeyPage, Level, MAX_PAGE_SIZE, MAX_PATTERN_LEN, Result,
};
use crate::glob;
use crate::store::{Deadline, StoreError, fnv1a};

impl Cache {
    /// Lists one page of a level's keys matching a glob pattern.
    pub async fn list_keys(
        &self,
        level: Level,
        pattern: &str,
        page_size: i32,
        page_token: &str,
        deadline: Deadline,
    ) -> Result<KeyPage> {
        let page_size = match page_size {
            n if n < 0 => return Err(CacheError::invalid("page_size", "must not be negative")),
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let pattern = if pattern.is_empty() { "*" } else { pattern };
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(CacheError::invalid(
                "pattern",
                format!(
                    "is {} bytes, over the limit of {MAX_PATTERN_LEN}",
                    pattern.len()
                ),
            ));
        }
        glob::validate(pattern).map_err(|e| CacheError::invalid("pattern", e.to_string()))?;
        let cursor = PageToken::decode(page_token, level, pattern)?;
        let started = Instant::now();
        let full_pattern = self.inner.keys.level_pattern(level, pattern);
        let result = self
            .inner
            .store
            .scan(&full_pattern, cursor.as_deref(), page_size, deadline)
            .await
            .map_err(|e| match e {
                StoreError::InvalidCursor(why) => CacheError::invalid("page_token", why),
                other => CacheError::Store(other),
            })
            .map(|page| KeyPage {
                keys: page
                    .keys
                    .iter()
                    .filter_map(|k| self.inner.keys.user_key(level, k).map(str::to_owned))
                    .collect(),
                next_page_token: page
                    .cursor
                    .map(|c| PageToken::encode(level, pattern, &c))
                    .unwrap_or_default(),
            });
        self.observe(level, Op::ListKeys, started, &result);
        result
    }

    /// Removes every key of a level; how many.
    pub async fn clear_level(&self, level: Level, deadline: Deadline) -> Result<u64> {
        let started = Instant::now();
        let pattern = self.inner.keys.level_pattern(level, "*");
        let result = self
            .inner
            .store
            .clear(&pattern, deadline)
            .await
            .map_err(CacheError::from);
        if let Ok(n) = result {
            self.inner.metrics.deletes(level, n);
        }
        self.observe(level, Op::ClearLevel, started, &result);
        self.announce(result.is_ok(), deadline, || {
            vec![super::Change::clear(level)]
        })
        .await;
        result
    }
}

/// `ListKeys` page tokens: opaque to clients, bound to the level and pattern
/// they were issued for, so that a token reused with other parameters is
/// refused instead of silently listing the wrong thing.
struct PageToken;

impl PageToken {
    const VERSION: &'static str = "1";

    fn encode(level: Level, pattern: &str, cursor: &str) -> String {
        let raw = format!(
            "{}.{}.{:016x}.{cursor}",
            Self::VERSION,
            level.as_str(),
            fnv1a(pattern.as_bytes())
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    fn decode(token: &str, level: Level, pattern: &str) -> Result<Option<String>> {
        let not_issued = |t: &str| {
            format!(
                "{} is not a token this server issued",
                crate::quote::quote(t)
            )
        };
        if token.is_empty() {
            return Ok(None);
        }
        let bad = |why: &str| CacheError::invalid("page_token", why.to_owned());
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad(&not_issued(token)))?;
        let mut parts = raw.splitn(4, '.');
        let (Some(version), Some(lvl), Some(hash), Some(cursor)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad(&not_issued(token)));
        };
        if version != Self::VERSION {
            return Err(bad("was issued by an incompatible version of koo"));
        }
        if lvl != level.as_str() || hash != format!("{:016x}", fnv1a(pattern.as_bytes())) {
            return Err(bad("was issued for a different level or pattern"));
        }
        Ok(Some(cursor.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens round-trip and refuse other parameters or garbage.
    #[test]
    fn page_tokens() {
        let t = PageToken::encode(Level::Db, "user:*", "r:17:3");
        assert_eq!(
            PageToken::decode(&t, Level::Db, "user:*")
                .unwrap()
                .as_deref(),
            Some("r:17:3")
        );
        assert!(PageToken::decode(&t, Level::App, "user:*").is_err());
        assert!(PageToken::decode(&t, Level::Db, "user:?").is_err());
        assert!(PageToken::decode("%%%", Level::Db, "*").is_err());
        assert!(PageToken::decode("Zm9v", Level::Db, "*").is_err());
        assert_eq!(PageToken::decode("", Level::Db, "*").unwrap(), None);
    }
}
