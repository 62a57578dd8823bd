//! What `CacheService` reports, as protobuf: health, metrics summed over
//! the instances, and the upkeep tasks' reports.

use std::time::{Duration, SystemTime};

use super::entries::to_pb_level;
use crate::cache::histogram::HistogramSnapshot;
use crate::cache::metrics::{Counters, Op};
use crate::cache::{
    CleanupReport, HealthReport, Level, MaintenanceReport, MetricsReport, WarmReport,
};
use crate::pb::cache::v1 as pb;
use crate::store::{BackendKind, CircuitState};

pub(super) fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

fn pb_time(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub(super) fn cleanup_report(r: CleanupReport) -> pb::CleanupReport {
    pb::CleanupReport {
        scanned_keys: r.scanned as i64,
        removed_without_ttl: r.removed_without_ttl as i64,
        removed_expired: r.removed_expired as i64,
        removed_stale_instances: r.removed_stale_instances as i64,
    }
}

fn counters(c: Counters, keys: u64) -> pb::CacheCounters {
    pb::CacheCounters {
        hits: c.hits as i64,
        misses: c.misses as i64,
        hit_ratio: c.hit_ratio(),
        sets: c.sets as i64,
        deletes: c.deletes as i64,
        errors: c.errors as i64,
        error_rate: c.error_rate(),
        keys: keys as i64,
    }
}

/// A histogram's count and percentiles, named `operation`.
fn latency(operation: &str, h: &HistogramSnapshot) -> pb::OperationLatency {
    pb::OperationLatency {
        operation: operation.to_owned(),
        count: h.count() as i64,
        p50: Some(pb_duration(h.percentile(0.50))),
        p95: Some(pb_duration(h.percentile(0.95))),
        p99: Some(pb_duration(h.percentile(0.99))),
    }
}

pub(super) fn metrics(m: MetricsReport) -> pb::CacheMetrics {
    let s = &m.snapshot;
    pb::CacheMetrics {
        total: Some(counters(m.total(), m.keys.iter().sum())),
        levels: Level::ALL
            .iter()
            .map(|l| pb::LevelMetrics {
                level: to_pb_level(*l) as i32,
                counters: Some(counters(s.levels[l.index()], m.keys[l.index()])),
                latency: Some(latency("all", &s.level_latencies[l.index()])),
            })
            .collect(),
        latencies: Op::ALL
            .iter()
            .map(|op| latency(op.as_str(), &s.latencies[*op as usize]))
            .collect(),
        bytes_written_raw: s.bytes_raw as i64,
        bytes_written_stored: s.bytes_stored as i64,
        bytes_saved: s.bytes_raw as i64 - s.bytes_stored as i64,
        backend_used_memory_bytes: m.backend_used_memory as i64,
        uptime: Some(pb_duration(m.uptime)),
        instance_count: m.instances as i32,
        keys_counted_at: m.keys_counted_at.map(pb_time),
        sample_time: Some(pb_time(m.sampled_at)),
        partial: m.partial.is_some(),
        partial_reason: m.partial.unwrap_or_default(),
    }
}

pub(super) fn health(h: HealthReport) -> pb::GetHealthResponse {
    let memory = h.memory.unwrap_or_default();
    pb::GetHealthResponse {
        healthy: h.healthy,
        backend: match h.backend {
            BackendKind::Memory => pb::BackendKind::Memory,
            BackendKind::Redis => pb::BackendKind::Redis,
        } as i32,
        ping_latency: h.ping_latency.map(pb_duration),
        circuit_state: match h.circuit {
            CircuitState::Closed => pb::CircuitState::Closed,
            CircuitState::Open => pb::CircuitState::Open,
            CircuitState::HalfOpen => pb::CircuitState::HalfOpen,
        } as i32,
        used_memory_bytes: memory.used as i64,
        max_memory_bytes: memory.max as i64,
        eviction_policy: memory.policy,
        last_error: h
            .last_error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default(),
        last_error_time: h.last_error.map(|e| pb_time(e.at)),
        uptime: Some(pb_duration(h.uptime)),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

pub(super) fn maintenance_report(r: MaintenanceReport) -> pb::MaintenanceReport {
    pb::MaintenanceReport {
        cleanup: Some(cleanup_report(r.cleanup)),
        used_memory_bytes: r.memory.used as i64,
        peak_memory_bytes: r.memory.peak as i64,
        fragmentation_ratio: r.memory.fragmentation,
        max_memory_bytes: r.memory.max as i64,
        eviction_policy: r.memory.policy,
        sampled_keys: r.sampled_keys as i64,
        largest_keys: r
            .largest
            .into_iter()
            .map(|k| pb::KeySize {
                level: to_pb_level(k.level) as i32,
                key: k.key,
                size_bytes: k.bytes as i64,
            })
            .collect(),
    }
}

pub(super) fn warm_report(report: WarmReport) -> pb::WarmReport {
    pb::WarmReport {
        loaded: report.loaded as i64,
        failures: report
            .failures
            .into_iter()
            .map(|f| pb::WarmFailure {
                source: f.source,
                line: f.line as i64,
                reason: f.reason,
            })
            .collect(),
        file: report
            .file
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        computed: report
            .computed
            .into_iter()
            .map(|c| pb::WarmComputed {
                source: c.source,
                line: c.line as i64,
                level: to_pb_level(c.level) as i32,
                key: c.key,
                task_id: c.task_id.unwrap_or_default(),
            })
            .collect(),
    }
}
