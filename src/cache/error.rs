//! What can go wrong in the cache domain.

use crate::store::StoreError;

/// A cache operation's failure. Mapped to a gRPC status in one place,
/// `grpc::status`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// A request field is wrong; `field` is its path (`key`, `entries[2].ttl`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value is over `CACHE_MAX_VALUE_SIZE`.
    #[error("{field}: is {size} bytes, over the limit of {limit} bytes (CACHE_MAX_VALUE_SIZE)")]
    ValueTooLarge {
        /// Path of the value field.
        field: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A reply would be larger than the gRPC message limit.
    #[error(
        "the reply would be {size} bytes, over the {limit}-byte message limit; ask for fewer keys"
    )]
    ReplyTooLarge {
        /// Size of the reply.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A stored value cannot be read back.
    #[error(
        "the value stored under {} cannot be read: {reason}",
        crate::quote::quote(key)
    )]
    Corrupt {
        /// The user's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The configured warm file cannot be used.
    #[error("warm file {path}: {reason}")]
    WarmFile {
        /// Its path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A `Fill` whose token no longer holds the entry's lock, and whose
    /// lapsed lock someone else took or whose entry someone else stored.
    #[error(
        "the lock was lost: lock_ttl passed and another caller took the lock or stored the entry (or the token is not this key's)"
    )]
    LockLost,
    /// The call's deadline passed while it waited for another caller's value.
    #[error("the deadline passed while waiting for another caller to fill the entry")]
    DeadlineExceeded,
    /// The backend failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CacheError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CacheError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Whether this failure is the backend's (counted in error metrics) rather
    /// than the caller's.
    pub fn is_backend(&self) -> bool {
        matches!(self, CacheError::Store(_) | CacheError::Corrupt { .. })
    }
}
