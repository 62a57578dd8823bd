//! Storage backends: Redis for production, an embedded in-process store as the
//! zero-setup default.
//!
//! Both backends speak in full key names (built by [`crate::keys`]) and opaque
//! byte values; they know nothing of cache levels, value encodings or protobuf.
//! [`Store`] is an enum rather than a trait object: there are exactly two
//! backends, and static dispatch keeps the hot path free of boxing.

pub mod clock;
pub mod memory;
pub mod redis;
pub mod task_fields;
pub mod tasks;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;

pub use self::memory::{MemoryConfig, MemoryStore};
pub use self::redis::{RedisConfig, RedisStore};

/// Why a backend call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached (down, refusing connections, circuit open).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer before the caller's deadline.
    #[error("backend did not answer within the deadline")]
    DeadlineExceeded,
    /// The backend refused a write because it is out of memory.
    #[error("backend is out of memory: {0}")]
    OutOfMemory(String),
    /// The backend answered something koo did not expect.
    #[error("backend error: {0}")]
    Backend(String),
    /// A key holds a value of another Redis type (not written by koo).
    #[error("backend holds a value of another type: {0}")]
    WrongType(String),
    /// A listing cursor that this backend did not issue.
    #[error("invalid cursor: {0}")]
    InvalidCursor(String),
    /// A resume position older than what the backend still keeps.
    #[error("{0}")]
    Expired(String),
    /// The backend's configuration is unusable (for example a malformed URL).
    #[error("invalid backend configuration: {0}")]
    InvalidConfig(String),
}

/// The instant by which a call must be answered.
///
/// Built from the caller's gRPC deadline (or koo's default request timeout) and
/// passed down, so that every retry and every wait in the store stops in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline `timeout` from now (a year at most: longer is forever).
    pub fn after(timeout: Duration) -> Self {
        let now = Instant::now();
        let timeout = timeout.min(Duration::from_secs(365 * 24 * 3600));
        Self(now.checked_add(timeout).unwrap_or(now))
    }

    /// The instant itself.
    pub fn instant(self) -> Instant {
        self.0
    }

    /// Time left before the deadline; zero once it has passed.
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// A stored value and the time it has left to live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stored bytes.
    pub value: Bytes,
    /// Time left to live; `None` for a key without a TTL.
    pub ttl: Option<Duration>,
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub struct Write {
    /// The full key.
    pub key: String,
    /// The bytes to store.
    pub value: Bytes,
    /// Time to live (at least 1 ms).
    pub ttl: Duration,
}

/// One page of a key listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Full key names.
    pub keys: Vec<String>,
    /// Where the next page starts; `None` when the listing is complete. The
    /// format is the backend's own and is only ever handed back to it.
    pub cursor: Option<String>,
}

/// What a cleanup pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanupCounts {
    /// Keys examined.
    pub scanned: u64,
    /// Keys without a TTL that were removed.
    pub removed_without_ttl: u64,
    /// Expired entries that were removed (only the embedded store keeps them).
    pub removed_expired: u64,
}

/// The backend's memory figures.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemoryReport {
    /// Bytes in use.
    pub used: u64,
    /// Peak bytes in use (0 when unknown).
    pub peak: u64,
    /// RSS / used (0 when unknown).
    pub fragmentation: f64,
    /// The memory limit (0 for none).
    pub max: u64,
    /// The eviction policy.
    pub policy: String,
    /// Why the figures are unknown (zeros), when they are: e.g. a Redis
    /// user not granted `INFO`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl MemoryReport {
    /// A report whose figures are unknown, saying why; its policy reads
    /// `unknown (why)` so that a reply showing only the policy says it too.
    pub fn unknown(why: &str) -> Self {
        Self {
            policy: format!("unknown ({why})"),
            unavailable: Some(why.to_owned()),
            ..Self::default()
        }
    }
}

/// A key and the memory it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySize {
    /// The full key.
    pub key: String,
    /// Bytes used by key and value.
    pub bytes: u64,
}

/// The state of the circuit breaker in front of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls flow.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// One trial call is allowed through.
    HalfOpen,
}

/// Which backend a [`Store`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// The embedded in-process store.
    Memory,
    /// Redis.
    Redis,
}

/// The last error a backend saw, for health reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// What went wrong.
    pub message: String,
    /// When.
    pub at: SystemTime,
}

/// A storage backend: a cheap-to-clone handle.
#[derive(Clone)]
pub enum Store {
    /// The embedded store.
    Memory(MemoryStore),
    /// Redis.
    Redis(RedisStore),
}

/// Forwards a call to whichever backend this is.
macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Memory($s) => $call,
            Store::Redis($s) => $call,
        }
    };
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<MemoryStore> for Store {
    fn from(m: MemoryStore) -> Self {
        Store::Memory(m)
    }
}

impl From<RedisStore> for Store {
    fn from(r: RedisStore) -> Self {
        Store::Redis(r)
    }
}

impl Store {
    /// The embedded store, when this is one.
    pub fn as_memory(&self) -> Option<&MemoryStore> {
        match self {
            Store::Memory(m) => Some(m),
            Store::Redis(_) => None,
        }
    }

    /// The Redis pool, when this is Redis.
    pub fn as_redis(&self) -> Option<&RedisStore> {
        match self {
            Store::Redis(r) => Some(r),
            Store::Memory(_) => None,
        }
    }

    /// Which backend this is.
    pub fn kind(&self) -> BackendKind {
        match self {
            Store::Memory(_) => BackendKind::Memory,
            Store::Redis(_) => BackendKind::Redis,
        }
    }

    /// Reads one key.
    pub async fn get(&self, key: &str, deadline: Deadline) -> Result<Option<Entry>> {
        dispatch!(self, s => s.get(key, deadline).await)
    }

    /// Reads several keys in one round trip, answers in order.
    pub async fn get_many(
        &self,
        keys: &[String],
        deadline: Deadline,
    ) -> Result<Vec<Option<Entry>>> {
        dispatch!(self, s => s.get_many(keys, deadline).await)
    }

    /// Writes one key with a TTL.
    pub async fn set(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        dispatch!(self, s => s.set(key, value, ttl, deadline).await)
    }

    /// Writes several keys, all or nothing.
    pub async fn set_many(&self, writes: Vec<Write>, deadline: Deadline) -> Result<()> {
        dispatch!(self, s => s.set_many(writes, deadline).await)
    }

    /// The stored size of each key (0 when absent), in one round trip.
    pub async fn sizes(&self, keys: &[String], deadline: Deadline) -> Result<Vec<u64>> {
        dispatch!(self, s => s.sizes(keys, deadline).await)
    }

    /// Removes keys; returns how many existed.
    pub async fn delete(&self, keys: &[String], deadline: Deadline) -> Result<u64> {
        dispatch!(self, s => s.delete(keys, deadline).await)
    }

    /// Lists up to `page_size` keys matching a (validated) glob pattern,
    /// starting at `cursor`.
    pub async fn scan(
        &self,
        pattern: &str,
        cursor: Option<&str>,
        page_size: usize,
        deadline: Deadline,
    ) -> Result<ScanPage> {
        dispatch!(self, s => s.scan(pattern, cursor, page_size, deadline).await)
    }

    /// Removes every key matching a pattern; returns how many.
    pub async fn clear(&self, pattern: &str, deadline: Deadline) -> Result<u64> {
        dispatch!(self, s => s.clear(pattern, deadline).await)
    }

    /// Counts the keys matching `pattern` by which of `prefixes` they start
    /// with, in one walk.
    pub async fn count_by_prefix(
        &self,
        pattern: &str,
        prefixes: &[String],
        deadline: Deadline,
    ) -> Result<Vec<u64>> {
        dispatch!(self, s => s.count_by_prefix(pattern, prefixes, deadline).await)
    }

    /// Removes keys matching a pattern that have no TTL, and (embedded store)
    /// expired entries.
    pub async fn cleanup(&self, pattern: &str, deadline: Deadline) -> Result<CleanupCounts> {
        dispatch!(self, s => s.cleanup(pattern, deadline).await)
    }

    /// Samples up to `sample` keys matching a pattern and returns how many
    /// were sampled and the `top` largest, largest first.
    pub async fn largest_keys(
        &self,
        pattern: &str,
        sample: usize,
        top: usize,
        deadline: Deadline,
    ) -> Result<(u64, Vec<KeySize>)> {
        dispatch!(self, s => s.largest_keys(pattern, sample, top, deadline).await)
    }

    /// The backend's memory figures.
    pub async fn memory(&self, deadline: Deadline) -> Result<MemoryReport> {
        dispatch!(self, s => s.memory(deadline).await)
    }

    /// Pings the backend, bypassing the circuit breaker, and returns the round
    /// trip. A successful ping closes the breaker; a failed one counts against
    /// it only when it shows the backend down (not when `deadline` was short).
    pub async fn probe(&self, deadline: Deadline) -> Result<Duration> {
        dispatch!(self, s => s.probe(deadline).await)
    }

    /// The circuit breaker's state.
    pub fn circuit_state(&self) -> CircuitState {
        dispatch!(self, s => s.circuit_state())
    }

    /// A receiver that sees every circuit state change.
    pub fn watch_circuit(&self) -> tokio::sync::watch::Receiver<CircuitState> {
        dispatch!(self, s => s.watch_circuit())
    }

    /// The last backend error seen, if any.
    pub fn last_error(&self) -> Option<LastError> {
        dispatch!(self, s => s.last_error())
    }

    /// Publishes this instance's record (for figures summed across instances):
    /// stores `payload` under `key` for `ttl` and lists `member` in the
    /// `index` sorted set, scored by the current time.
    pub async fn publish_record(
        &self,
        index: &str,
        key: &str,
        member: &str,
        payload: Bytes,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        dispatch!(self, s => s.publish_record(index, key, member, payload, ttl, deadline).await)
    }

    /// Reads the records of every member of `index` published since `since`;
    /// `key_of` names a member's record key.
    pub async fn read_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: &(dyn Fn(&str) -> String + Sync),
        deadline: Deadline,
    ) -> Result<Vec<(String, Bytes)>> {
        dispatch!(self, s => s.read_records(index, since, key_of, deadline).await)
    }

    /// Removes the members of `index` (and their records) not published since
    /// `since`; returns how many.
    pub async fn remove_stale_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: &(dyn Fn(&str) -> String + Sync),
        deadline: Deadline,
    ) -> Result<u64> {
        dispatch!(self, s => s.remove_stale_records(index, since, key_of, deadline).await)
    }
}

/// FNV-1a: a 64-bit hash that is stable across processes and versions
/// (unlike std's), for page tokens and cursors.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Milliseconds since the Unix epoch, as Redis scores and records use them.
pub fn unix_millis(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}
