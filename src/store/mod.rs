//! Storage backends: Redis for production, an embedded in-process store as the
//! zero-setup default.
//!
//! Both backends speak in full key names (built by [`crate::keys`]) and opaque
//! byte values; they know nothing of cache levels, value encodings or protobuf.
//! Each store is a trait implemented by both backends: [`CacheBackend`] for
//! the cache's keys (held as a [`Store`]), [`schedules::ScheduleBackend`]
//! for schedules, [`tasks`] for the task queues.

pub mod clock;
#[cfg(test)]
mod contract;
pub mod lock;
pub mod memory;
pub mod redis;
pub mod schedules;
pub mod task_fields;
pub mod tasks;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;

pub use self::lock::{LockState, held_by, lock_task};
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

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Names a record's key from its member (see [`CacheBackend::read_records`]).
pub type KeyOf<'a> = &'a (dyn Fn(&str) -> String + Sync + 'a);

/// The cache's key-value store: what [`crate::cache`], health, metrics
/// records and maintenance ask of a backend, in full key names and opaque
/// bytes.
///
/// Implemented by [`MemoryStore`] and [`RedisStore`]; callers hold a
/// [`Store`]. Every call is bounded by its [`Deadline`] (the embedded store
/// answers at once and ignores it).
///
/// Why a trait object rather than generics: the backend is chosen from the
/// configuration at start-up, and a generic `Cache<S>` would make the cache,
/// its gRPC service, health, the data directory and every test generic (or
/// monomorphised twice) for no gain. The cost is the one boxed future per
/// call that `async_trait` makes, tens of nanoseconds against a call that
/// takes at least a lock (embedded) or a network round trip (Redis); the
/// handle adds no other allocation (it derefs to the backend in its `Arc`).
/// (`tonic::async_trait` is the `async-trait` crate re-exported; the store
/// takes nothing else from tonic.)
///
/// Spans: the implementations open a `debug` span per call, except on the
/// per-key hot path (`get`, `get_many`, `set`, `set_many`).
#[tonic::async_trait]
pub trait CacheBackend: Any + Send + Sync {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Reads one key.
    async fn get(&self, key: &str, deadline: Deadline) -> Result<Option<Entry>>;

    /// Reads several keys in one round trip, answers in order.
    async fn get_many(&self, keys: &[String], deadline: Deadline) -> Result<Vec<Option<Entry>>>;

    /// Writes one key with a TTL.
    async fn set(&self, key: &str, value: Bytes, ttl: Duration, deadline: Deadline) -> Result<()>;

    /// Writes several keys, all or nothing (on a Redis Cluster, all or
    /// nothing per hash slot: see `redis::slots`).
    async fn set_many(&self, writes: Vec<Write>, deadline: Deadline) -> Result<()>;

    /// The stored size of each key (0 when absent), in one round trip.
    async fn sizes(&self, keys: &[String], deadline: Deadline) -> Result<Vec<u64>>;

    /// Removes keys; returns how many existed.
    async fn delete(&self, keys: &[String], deadline: Deadline) -> Result<u64>;

    /// Lists up to `page_size` keys matching a (validated) glob pattern,
    /// starting at `cursor`.
    async fn scan(
        &self,
        pattern: &str,
        cursor: Option<&str>,
        page_size: usize,
        deadline: Deadline,
    ) -> Result<ScanPage>;

    /// Removes every key matching a pattern; returns how many.
    async fn clear(&self, pattern: &str, deadline: Deadline) -> Result<u64>;

    /// Counts the keys matching `pattern` by which of `prefixes` they start
    /// with, in one walk.
    async fn count_by_prefix(
        &self,
        pattern: &str,
        prefixes: &[String],
        deadline: Deadline,
    ) -> Result<Vec<u64>>;

    /// Removes keys matching a pattern that have no TTL, and (embedded store)
    /// expired entries.
    async fn cleanup(&self, pattern: &str, deadline: Deadline) -> Result<CleanupCounts>;

    /// Samples up to `sample` keys matching a pattern and returns how many
    /// were sampled and the `top` largest, largest first.
    async fn largest_keys(
        &self,
        pattern: &str,
        sample: usize,
        top: usize,
        deadline: Deadline,
    ) -> Result<(u64, Vec<KeySize>)>;

    /// The backend's memory figures.
    async fn memory(&self, deadline: Deadline) -> Result<MemoryReport>;

    /// Pings the backend, bypassing the circuit breaker, and returns the round
    /// trip. A successful ping closes the breaker; a failed one counts against
    /// it only when it shows the backend down (not when `deadline` was short).
    async fn probe(&self, deadline: Deadline) -> Result<Duration>;

    /// The circuit breaker's state.
    fn circuit_state(&self) -> CircuitState;

    /// A receiver that sees every circuit state change.
    fn watch_circuit(&self) -> tokio::sync::watch::Receiver<CircuitState>;

    /// The last backend error seen, if any.
    fn last_error(&self) -> Option<LastError>;

    /// Publishes this instance's record (for figures summed across instances):
    /// stores `payload` under `key` for `ttl` and lists `member` in the
    /// `index` sorted set, scored by the current time.
    async fn publish_record(
        &self,
        index: &str,
        key: &str,
        member: &str,
        payload: Bytes,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()>;

    /// Reads the records of every member of `index` published since `since`;
    /// `key_of` names a member's record key.
    async fn read_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: KeyOf<'_>,
        deadline: Deadline,
    ) -> Result<Vec<(String, Bytes)>>;

    /// Removes the members of `index` (and their records) not published since
    /// `since`; returns how many.
    async fn remove_stale_records(
        &self,
        index: &str,
        since: SystemTime,
        key_of: KeyOf<'_>,
        deadline: Deadline,
    ) -> Result<u64>;

    // --- compute: the locks of GetOrLock and GetOrCompute (see [`lock`])

    /// Takes `lock` under `token` for `ttl` unless someone holds it.
    async fn lock_acquire(
        &self,
        lock: &str,
        token: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<LockState>;

    /// The value of `lock` and its time left, if it is held.
    async fn lock_read(&self, lock: &str, deadline: Deadline)
    -> Result<Option<(String, Duration)>>;

    /// Replaces the value of `lock`, keeping its expiry, if `token` holds
    /// it; whether it did.
    async fn lock_update(
        &self,
        lock: &str,
        token: &str,
        value: &str,
        deadline: Deadline,
    ) -> Result<bool>;

    /// Deletes `lock` if `token` holds it; whether it did.
    async fn lock_release(&self, lock: &str, token: &str, deadline: Deadline) -> Result<bool>;

    // --- tags (issue 19: versioned tags, see `crate::cache::tags`)

    /// For a tagged write, in one round trip: each tag key's version (a
    /// random one created where the key is absent), with the key's TTL
    /// extended to at least the duration paired with it.
    async fn tag_versions_for_write(
        &self,
        tags: &[(String, Duration)],
        deadline: Deadline,
    ) -> Result<Vec<u64>>;

    /// The current version of each tag key (`None`: absent or unreadable),
    /// in one round trip.
    async fn tag_versions(&self, keys: &[String], deadline: Deadline) -> Result<Vec<Option<u64>>>;

    /// Gives each existing tag key a new random version, keeping its TTL;
    /// how many existed. Absent keys stay absent.
    async fn bump_tags(&self, keys: &[String], deadline: Deadline) -> Result<u64>;
}

/// The cache's store: a cheap-to-clone handle on one [`CacheBackend`].
///
/// It derefs to the backend, so callers write `store.get(key, deadline)`;
/// the composition root reaches a backend's own API (the embedded store's
/// purge and image, the Redis pool for the task store) through
/// [`Store::as_memory`] and [`Store::as_redis`] rather than matching.
#[derive(Clone)]
pub struct Store(Arc<dyn CacheBackend>);

impl std::ops::Deref for Store {
    type Target = dyn CacheBackend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl From<MemoryStore> for Store {
    fn from(m: MemoryStore) -> Self {
        Self(Arc::new(m))
    }
}

impl From<RedisStore> for Store {
    fn from(r: RedisStore) -> Self {
        Self(Arc::new(r))
    }
}

impl Store {
    /// The embedded store, when this is one.
    pub fn as_memory(&self) -> Option<&MemoryStore> {
        let any: &dyn Any = &*self.0;
        any.downcast_ref()
    }

    /// The Redis pool, when this is Redis.
    pub fn as_redis(&self) -> Option<&RedisStore> {
        let any: &dyn Any = &*self.0;
        any.downcast_ref()
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
