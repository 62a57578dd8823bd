//! Cache levels: the four namespaces of the seed's multi-level cache.

/// A cache namespace. The same key in two levels names two entries.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Frequently accessed application data.
    App,
    /// Database query results.
    Db,
    /// API responses.
    Api,
    /// Session data.
    Session,
}

impl Level {
    /// Every level, in a fixed order (also the index into per-level arrays).
    pub const ALL: [Level; 4] = [Level::App, Level::Db, Level::Api, Level::Session];

    /// The name used in Redis keys, warm files and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::App => "app",
            Level::Db => "db",
            Level::Api => "api",
            Level::Session => "session",
        }
    }

    /// Position in [`Level::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses `app`, `db`, `api`, `session`, in any case, with or without the
    /// proto enum's `CACHE_LEVEL_` prefix.
    pub fn parse(s: &str) -> Option<Level> {
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_prefix("cache_level_").unwrap_or(&lower);
        Level::ALL.into_iter().find(|l| l.as_str() == name)
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names parse in every accepted spelling and index matches ALL.
    #[test]
    fn parse_and_index() {
        assert_eq!(Level::parse("APP"), Some(Level::App));
        assert_eq!(Level::parse("CACHE_LEVEL_SESSION"), Some(Level::Session));
        assert_eq!(Level::parse("api"), Some(Level::Api));
        assert_eq!(Level::parse("unspecified"), None);
        assert_eq!(Level::parse(""), None);
        for (i, l) in Level::ALL.iter().enumerate() {
            assert_eq!(l.index(), i);
        }
    }
}
