//! Cache metrics: counters per level, latency histograms per operation, and
//! compression byte counts.
//!
//! Recording is lock-free (relaxed atomics): it sits on every request. A
//! [`Snapshot`] is plain data that serialises to JSON, so that each koo
//! instance can publish its own to the shared backend and any instance can sum
//! them all: counters add, and histograms merge bucket by bucket, which is why
//! percentiles come from fixed-bucket histograms rather than per-process
//! estimators that cannot be combined.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::histogram::{Histogram, HistogramSnapshot};
use crate::domain::level::Level;

/// The timed cache operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `Get`.
    Get,
    /// `Set`.
    Set,
    /// `Delete`.
    Delete,
    /// `GetMany`.
    GetMany,
    /// `SetMany`.
    SetMany,
    /// `DeleteMany`.
    DeleteMany,
    /// `ListKeys`.
    ListKeys,
    /// `ClearLevel`.
    ClearLevel,
}

impl Op {
    /// Every operation, in a fixed order.
    pub const ALL: [Op; 8] = [
        Op::Get,
        Op::Set,
        Op::Delete,
        Op::GetMany,
        Op::SetMany,
        Op::DeleteMany,
        Op::ListKeys,
        Op::ClearLevel,
    ];

    /// The name reported in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Delete => "delete",
            Op::GetMany => "get_many",
            Op::SetMany => "set_many",
            Op::DeleteMany => "delete_many",
            Op::ListKeys => "list_keys",
            Op::ClearLevel => "clear_level",
        }
    }
}

#[derive(Default)]
struct LevelCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    sets: AtomicU64,
    deletes: AtomicU64,
    errors: AtomicU64,
    operations: AtomicU64,
}

/// Live counters of one koo instance.
pub struct Metrics {
    levels: [LevelCounters; 4],
    latencies: [Histogram; 8],
    /// Per level, the latency of the operations that name that one level.
    level_latencies: [Histogram; 4],
    bytes_raw: AtomicU64,
    bytes_stored: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            levels: Default::default(),
            latencies: std::array::from_fn(|_| Histogram::new()),
            level_latencies: std::array::from_fn(|_| Histogram::new()),
            bytes_raw: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one operation (RPC) on a level.
    pub fn operation(&self, level: Level) {
        self.levels[level.index()].operations.fetch_add(1, Relaxed);
    }

    /// Records how long an operation took.
    pub fn latency(&self, op: Op, elapsed: Duration) {
        self.latencies[op as usize].record(elapsed);
    }

    /// Records how long an operation on one `level` took, per operation
    /// and per level.
    pub fn level_latency(&self, level: Level, op: Op, elapsed: Duration) {
        self.latencies[op as usize].record(elapsed);
        self.level_latencies[level.index()].record(elapsed);
    }

    /// Counts reads.
    pub fn reads(&self, level: Level, hits: u64, misses: u64) {
        let c = &self.levels[level.index()];
        c.hits.fetch_add(hits, Relaxed);
        c.misses.fetch_add(misses, Relaxed);
    }

    /// Counts one write of `raw` bytes stored as `stored` bytes.
    pub fn write(&self, level: Level, raw: u64, stored: u64) {
        self.levels[level.index()].sets.fetch_add(1, Relaxed);
        self.bytes_raw.fetch_add(raw, Relaxed);
        self.bytes_stored.fetch_add(stored, Relaxed);
    }

    /// Counts removed keys.
    pub fn deletes(&self, level: Level, n: u64) {
        self.levels[level.index()].deletes.fetch_add(n, Relaxed);
    }

    /// Counts a backend failure.
    pub fn error(&self, level: Level) {
        self.levels[level.index()].errors.fetch_add(1, Relaxed);
    }

    /// A copy of the figures so far.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            levels: std::array::from_fn(|i| {
                let c = &self.levels[i];
                Counters {
                    hits: c.hits.load(Relaxed),
                    misses: c.misses.load(Relaxed),
                    sets: c.sets.load(Relaxed),
                    deletes: c.deletes.load(Relaxed),
                    errors: c.errors.load(Relaxed),
                    operations: c.operations.load(Relaxed),
                }
            }),
            latencies: std::array::from_fn(|i| self.latencies[i].snapshot()),
            level_latencies: std::array::from_fn(|i| self.level_latencies[i].snapshot()),
            bytes_raw: self.bytes_raw.load(Relaxed),
            bytes_stored: self.bytes_stored.load(Relaxed),
        }
    }
}

/// Counters of one level (or of all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Reads that found a value.
    pub hits: u64,
    /// Reads that found nothing.
    pub misses: u64,
    /// Values written.
    pub sets: u64,
    /// Keys removed.
    pub deletes: u64,
    /// Backend failures.
    pub errors: u64,
    /// Operations (RPCs) on the level.
    pub operations: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.sets += o.sets;
        self.deletes += o.deletes;
        self.errors += o.errors;
        self.operations += o.operations;
    }

    /// hits / reads, 0 without reads.
    pub fn hit_ratio(&self) -> f64 {
        ratio(self.hits, self.hits + self.misses)
    }

    /// errors / operations, 0 without operations.
    pub fn error_rate(&self) -> f64 {
        ratio(self.errors, self.operations)
    }
}

fn ratio(n: u64, d: u64) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

/// Figures of one instance, or the sum of several. This is also the record an
/// instance publishes to the backend, so its serialised form is versioned by
/// the key it is stored under.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Per level, in [`Level::ALL`] order.
    pub levels: [Counters; 4],
    /// Per operation, in [`Op::ALL`] order.
    pub latencies: [HistogramSnapshot; 8],
    /// Per level, in [`Level::ALL`] order: the operations that name one
    /// level (absent from the records of older instances).
    #[serde(default)]
    pub level_latencies: [HistogramSnapshot; 4],
    /// Bytes written before compression.
    pub bytes_raw: u64,
    /// Bytes written as stored.
    pub bytes_stored: u64,
}

impl Snapshot {
    /// Adds another instance's figures.
    pub fn merge(&mut self, other: &Snapshot) {
        for (a, b) in self.levels.iter_mut().zip(&other.levels) {
            a.add(b);
        }
        for (a, b) in self.latencies.iter_mut().zip(&other.latencies) {
            a.merge(b);
        }
        for (a, b) in self.level_latencies.iter_mut().zip(&other.level_latencies) {
            a.merge(b);
        }
        self.bytes_raw += other.bytes_raw;
        self.bytes_stored += other.bytes_stored;
    }

    /// All levels together.
    pub fn total(&self) -> Counters {
        let mut t = Counters::default();
        for c in &self.levels {
            t.add(c);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Snapshots merge counter by counter and survive a JSON round trip.
    #[test]
    fn merge_and_serialise() {
        let m = Metrics::default();
        m.reads(Level::Api, 3, 1);
        m.write(Level::Api, 100, 40);
        m.error(Level::Db);
        m.operation(Level::Api);
        m.latency(Op::Get, Duration::from_micros(250));
        m.operation(Level::Db);
        m.latency(Op::Set, Duration::from_micros(500));
        let one = m.snapshot();
        let json = serde_json::to_string(&one).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, one);
        let mut sum = one.clone();
        sum.merge(&back);
        let t = sum.total();
        assert_eq!(
            (t.hits, t.misses, t.sets, t.errors, t.operations),
            (6, 2, 2, 2, 4)
        );
        assert_eq!(sum.bytes_raw - sum.bytes_stored, 120);
        assert_eq!(sum.latencies[Op::Get as usize].count(), 2);
        assert_eq!(sum.level_latencies[Level::Api.index()].count(), 0);
        assert!((sum.levels[Level::Api.index()].hit_ratio() - 0.75).abs() < 1e-9);
        assert!((sum.levels[Level::Db.index()].error_rate() - 1.0).abs() < 1e-9);
    }

    /// A level's latency counts the operations that named it (and each one
    /// also counts per operation); an older instance's record, without
    /// level latencies, still reads and merges.
    #[test]
    fn level_latencies_count_and_merge_with_older_records() {
        let m = Metrics::default();
        m.level_latency(Level::Session, Op::Get, Duration::from_micros(100));
        m.level_latency(Level::Session, Op::Set, Duration::from_micros(300));
        m.level_latency(Level::Db, Op::Get, Duration::from_micros(200));
        let mut s = m.snapshot();
        assert_eq!(s.level_latencies[Level::Session.index()].count(), 2);
        assert_eq!(s.level_latencies[Level::Db.index()].count(), 1);
        assert_eq!(s.latencies[Op::Get as usize].count(), 2);
        let mut old = serde_json::to_value(&s).unwrap();
        old.as_object_mut().unwrap().remove("level_latencies");
        let old: Snapshot = serde_json::from_value(old).unwrap();
        assert_eq!(old.level_latencies[Level::Session.index()].count(), 0);
        s.merge(&old);
        assert_eq!(s.level_latencies[Level::Session.index()].count(), 2);
        assert_eq!(s.latencies[Op::Get as usize].count(), 4);
    }
}
