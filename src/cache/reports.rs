//! What the cache's probes, metrics and upkeep report. The upkeep reports
//! are also the results of the upkeep tasks (JSON, kept with the task), so
//! their serde shape is part of the data format.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::Level;
use super::metrics::{Counters, Snapshot};
use crate::store::{BackendKind, CircuitState, LastError};

/// The backend's health as seen by one probe.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// Whether the probe got an answer.
    pub healthy: bool,
    /// Which backend.
    pub backend: BackendKind,
    /// The probe's round trip.
    pub ping_latency: Option<Duration>,
    /// The circuit breaker's state.
    pub circuit: CircuitState,
    /// Backend memory figures, when reachable.
    pub memory: Option<crate::store::MemoryReport>,
    /// The last backend error.
    pub last_error: Option<LastError>,
    /// This instance's uptime.
    pub uptime: Duration,
}

/// Metrics of all instances together.
#[derive(Debug, Clone)]
pub struct MetricsReport {
    /// Summed figures.
    pub snapshot: Snapshot,
    /// Keys per level, in [`Level::ALL`] order.
    pub keys: [u64; 4],
    /// When the key counts were taken.
    pub keys_counted_at: Option<SystemTime>,
    /// Backend memory in use.
    pub backend_used_memory: u64,
    /// This instance's uptime.
    pub uptime: Duration,
    /// Instances summed.
    pub instances: u32,
    /// When this report was made.
    pub sampled_at: SystemTime,
    /// Why some figures are missing, if they are.
    pub partial: Option<String>,
}

impl MetricsReport {
    /// Counters of all levels.
    pub fn total(&self) -> Counters {
        self.snapshot.total()
    }
}

/// What a cleanup removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CleanupReport {
    /// Keys examined.
    pub scanned: u64,
    /// Keys without a TTL removed.
    pub removed_without_ttl: u64,
    /// Expired entries removed.
    pub removed_expired: u64,
    /// Stale instance records removed.
    pub removed_stale_instances: u64,
}

/// What a maintenance run did and found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MaintenanceReport {
    /// The cleanup.
    pub cleanup: CleanupReport,
    /// Backend memory.
    pub memory: crate::store::MemoryReport,
    /// Keys sampled for sizes.
    pub sampled_keys: u64,
    /// Largest keys of the sample, largest first.
    pub largest: Vec<LargeKey>,
}

/// A key of the maintenance sample and its size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LargeKey {
    /// Its level.
    pub level: Level,
    /// The user key.
    pub key: String,
    /// Bytes used by key and value.
    pub bytes: u64,
}

/// One entry a warm-up could not load.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarmFailure {
    /// `request` or the file's path.
    pub source: String,
    /// Line (file, 1-based) or index (request, 0-based).
    pub line: u64,
    /// What was wrong.
    pub reason: String,
}

/// What a warm-up loaded.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WarmReport {
    /// Entries written.
    pub loaded: u64,
    /// Entries refused.
    pub failures: Vec<WarmFailure>,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// Entries whose value a task computes (the warm file's `task` lines):
    /// [`Cache::warm`] lists them, the warm task submits them.
    #[serde(default)]
    pub computed: Vec<WarmCompute>,
}

/// An entry whose value a task computes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WarmCompute {
    /// The warm file's path.
    pub source: String,
    /// Its line (1-based).
    pub line: u64,
    /// The entry's level.
    pub level: Level,
    /// The entry's key.
    pub key: String,
    /// The entry's TTL (ms); absent means the level's default.
    pub ttl_ms: Option<u64>,
    /// The task, as the line gave it.
    pub task: serde_json::Map<String, serde_json::Value>,
    /// The submitted task, once submitted.
    pub task_id: Option<String>,
}
