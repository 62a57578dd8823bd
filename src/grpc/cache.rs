//! `koo.cache.v1.CacheService`: converts requests, calls [`Cache`], converts
//! replies.

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::deadline;
use super::json;
use super::status::invalid_argument;
use super::time;
use crate::auth::audit;
use crate::cache::{
    Cache, CacheError, CleanupReport, HealthReport, Hit, Level, MetricsReport, NewEntry, Stored,
    Value,
    metrics::{Counters, Op},
    warm,
};
use crate::pb::cache::v1 as pb;
use crate::store::{BackendKind, CircuitState, Deadline};
use crate::tasks::engine::TaskEngine;
use crate::tasks::maintenance::{CacheUpkeep, Submitted};
use crate::watch::{Hub, Kind as WatchKind, Ticker, Watchers};

/// The CacheService implementation.
pub struct CacheApi {
    cache: Cache,
    /// Where `Cleanup`, `Warm` and `StartMaintenance` submit their tasks.
    upkeep: CacheUpkeep,
    /// This process's watch streams (`WatchMetrics` counts against them).
    watchers: Watchers,
    max_value_size: usize,
    request_timeout: Duration,
    bulk_timeout: Duration,
    /// `WatchMetrics` snapshots, taken once per interval and shared.
    metrics: Ticker<pb::WatchMetricsResponse>,
}

impl CacheApi {
    /// Serves `cache`; calls without a deadline get `request_timeout`
    /// (`bulk_timeout` for bulk calls); streams end on `shutdown`.
    pub fn new(
        cache: Cache,
        tasks: (TaskEngine, Hub),
        max_value_size: usize,
        request_timeout: Duration,
        bulk_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let source = cache.clone();
        let metrics = Ticker::new(shutdown.clone(), move |interval: Duration| {
            let cache = source.clone();
            let f: futures::future::BoxFuture<'static, _> = Box::pin(async move {
                let report = cache
                    .metrics(Deadline::after(request_timeout.min(interval)))
                    .await;
                pb::WatchMetricsResponse {
                    metrics: Some(metrics(report)),
                }
            });
            f
        });
        Self {
            cache,
            upkeep: CacheUpkeep::new(tasks.0, tasks.1.clone()),
            watchers: tasks.1.watchers().clone(),
            max_value_size,
            request_timeout,
            bulk_timeout,
            metrics,
        }
    }

    fn deadline<T>(&self, r: &Request<T>) -> Deadline {
        deadline::from_metadata(r.metadata(), self.request_timeout)
    }

    fn bulk_deadline<T>(&self, r: &Request<T>) -> Deadline {
        deadline::from_metadata(r.metadata(), self.bulk_timeout)
    }
}

pub(crate) fn level(field: &str, raw: i32) -> Result<Level, Status> {
    match pb::CacheLevel::try_from(raw) {
        Ok(pb::CacheLevel::Unspecified | pb::CacheLevel::App) => Ok(Level::App),
        Ok(pb::CacheLevel::Db) => Ok(Level::Db),
        Ok(pb::CacheLevel::Api) => Ok(Level::Api),
        Ok(pb::CacheLevel::Session) => Ok(Level::Session),
        Err(_) => Err(invalid_argument(
            field,
            &format!("{raw} is not a cache level"),
        )),
    }
}

pub(crate) fn to_pb_level(l: Level) -> pb::CacheLevel {
    match l {
        Level::App => pb::CacheLevel::App,
        Level::Db => pb::CacheLevel::Db,
        Level::Api => pb::CacheLevel::Api,
        Level::Session => pb::CacheLevel::Session,
    }
}

fn value(field: &str, v: Option<pb::CacheValue>, max_value_size: usize) -> Result<Value, Status> {
    match v.and_then(|v| v.kind) {
        None => Err(invalid_argument(
            field,
            "is required (one of raw, text or json)",
        )),
        Some(pb::cache_value::Kind::Raw(b)) => Ok(Value::Raw(b)),
        Some(pb::cache_value::Kind::Text(t)) => Ok(Value::Text(t)),
        Some(pb::cache_value::Kind::Json(j)) => {
            // JSON travels as a protobuf Value, which can be several times
            // larger than its text; the limit applies to the larger form so
            // that what is accepted can always be sent back.
            let encoded = prost::Message::encoded_len(&j);
            if encoded > max_value_size {
                return Err(invalid_argument(
                    &format!("{field}.json"),
                    &format!(
                        "encodes to {encoded} bytes of protobuf, over the limit of {max_value_size} bytes (CACHE_MAX_VALUE_SIZE)"
                    ),
                ));
            }
            json::to_json(&j)
                .map(Value::Json)
                .map_err(|e| invalid_argument(&format!("{field}.json"), &e))
        }
    }
}

fn entry(at: &str, e: pb::CacheEntry, max_value_size: usize) -> Result<NewEntry, Status> {
    Ok(NewEntry {
        level: level(&format!("{at}level"), e.level)?,
        value: value(&format!("{at}value"), e.value, max_value_size)?,
        ttl: time::duration(&format!("{at}ttl"), e.ttl, time::CACHE_TTL)?,
        key: e.key,
    })
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

fn pb_time(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn pb_value(key: &str, v: Value) -> Result<pb::CacheValue, Status> {
    let kind = match v {
        Value::Raw(b) => pb::cache_value::Kind::Raw(b),
        Value::Text(t) => pb::cache_value::Kind::Text(t),
        Value::Json(j) => {
            pb::cache_value::Kind::Json(json::from_json(&j).map_err(|e| CacheError::Corrupt {
                key: key.to_owned(),
                reason: format!("stored JSON does not parse: {e}"),
            })?)
        }
    };
    Ok(pb::CacheValue { kind: Some(kind) })
}

fn get_response(key: &str, hit: Option<Hit>) -> Result<pb::GetResponse, Status> {
    let Some(hit) = hit else {
        return Ok(pb::GetResponse::default());
    };
    Ok(pb::GetResponse {
        found: true,
        value: Some(pb_value(key, hit.value)?),
        ttl: hit.ttl.map(pb_duration),
        size_bytes: hit.size as i64,
        stored_size_bytes: hit.stored_size as i64,
        compressed: hit.compressed,
    })
}

fn set_response(s: Stored) -> pb::SetResponse {
    pb::SetResponse {
        ttl: Some(pb_duration(s.ttl)),
        size_bytes: s.size as i64,
        stored_size_bytes: s.stored_size as i64,
        compressed: s.compressed,
    }
}

fn cleanup_report(r: CleanupReport) -> pb::CleanupReport {
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

fn metrics(m: MetricsReport) -> pb::CacheMetrics {
    let s = &m.snapshot;
    pb::CacheMetrics {
        total: Some(counters(m.total(), m.keys.iter().sum())),
        levels: Level::ALL
            .iter()
            .map(|l| pb::LevelMetrics {
                level: to_pb_level(*l) as i32,
                counters: Some(counters(s.levels[l.index()], m.keys[l.index()])),
            })
            .collect(),
        latencies: Op::ALL
            .iter()
            .map(|op| {
                let h = &s.latencies[*op as usize];
                pb::OperationLatency {
                    operation: op.as_str().to_owned(),
                    count: h.count() as i64,
                    p50: Some(pb_duration(h.percentile(0.50))),
                    p95: Some(pb_duration(h.percentile(0.95))),
                    p99: Some(pb_duration(h.percentile(0.99))),
                }
            })
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

fn health(h: HealthReport) -> pb::GetHealthResponse {
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

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchMetricsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::cache_service_server::CacheService for CacheApi {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let hit = self
            .cache
            .get(level("level", r.level)?, &r.key, deadline)
            .await?;
        Ok(Response::new(get_response(&r.key, hit)?))
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let entry = entry(
            "",
            pb::CacheEntry {
                level: r.level,
                key: r.key,
                value: r.value,
                ttl: r.ttl,
            },
            self.max_value_size,
        )?;
        let stored = self.cache.set(entry, deadline).await?;
        Ok(Response::new(set_response(stored)))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let deleted = self
            .cache
            .delete(level("level", r.level)?, &r.key, deadline)
            .await?;
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let hits = self
            .cache
            .get_many(level("level", r.level)?, &r.keys, deadline)
            .await?;
        let results = r
            .keys
            .into_iter()
            .zip(hits)
            .map(|(key, hit)| {
                Ok(pb::GetManyResult {
                    entry: Some(get_response(&key, hit)?),
                    key,
                })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(pb::GetManyResponse { results }))
    }

    async fn set_many(
        &self,
        request: Request<pb::SetManyRequest>,
    ) -> Result<Response<pb::SetManyResponse>, Status> {
        let deadline = self.deadline(&request);
        let entries = request
            .into_inner()
            .entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| entry(&format!("entries[{i}]."), e, self.max_value_size))
            .collect::<Result<Vec<_>, _>>()?;
        let stored = self.cache.set_many(&entries, deadline).await?;
        Ok(Response::new(pb::SetManyResponse {
            results: stored.into_iter().map(set_response).collect(),
        }))
    }

    async fn delete_many(
        &self,
        request: Request<pb::DeleteManyRequest>,
    ) -> Result<Response<pb::DeleteManyResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let deleted = self
            .cache
            .delete_many(level("level", r.level)?, &r.keys, deadline)
            .await?;
        Ok(Response::new(pb::DeleteManyResponse {
            deleted_count: deleted as i64,
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let page = self
            .cache
            .list_keys(
                level("level", r.level)?,
                &r.pattern,
                r.page_size,
                &r.page_token,
                deadline,
            )
            .await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: page.keys,
            next_page_token: page.next_page_token,
        }))
    }

    async fn clear_level(
        &self,
        request: Request<pb::ClearLevelRequest>,
    ) -> Result<Response<pb::ClearLevelResponse>, Status> {
        let deadline = self.bulk_deadline(&request);
        let raw = request.get_ref().level;
        audit::target(request.extensions(), || format!("level {raw}"));
        let level = level("level", request.into_inner().level)?;
        let deleted = self.cache.clear_level(level, deadline).await?;
        Ok(Response::new(pb::ClearLevelResponse {
            deleted_count: deleted as i64,
        }))
    }

    async fn get_health(
        &self,
        request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::GetHealthResponse>, Status> {
        let deadline = self.deadline(&request);
        Ok(Response::new(health(self.cache.health(deadline).await)))
    }

    async fn get_metrics(
        &self,
        request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        let deadline = self.deadline(&request);
        let report = self.cache.metrics(deadline).await;
        Ok(Response::new(pb::GetMetricsResponse {
            metrics: Some(metrics(report)),
        }))
    }

    type WatchMetricsStream = WatchStream;

    async fn watch_metrics(
        &self,
        request: Request<pb::WatchMetricsRequest>,
    ) -> Result<Response<Self::WatchMetricsStream>, Status> {
        let interval = time::duration(
            "interval",
            request.into_inner().interval,
            time::WATCH_INTERVAL,
        )?
        .unwrap_or(Duration::from_secs(1));
        let permit = self.watchers.admit(WatchKind::CacheMetrics)?;
        // Every watcher of one interval shares one snapshot per tick.
        let stream = futures::stream::unfold(
            (self.metrics.follow(interval), permit),
            |(mut follower, permit)| async move {
                let snapshot = follower.next().await?;
                Some((Ok(snapshot.value.clone()), (follower, permit)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn start_maintenance(
        &self,
        request: Request<pb::StartMaintenanceRequest>,
    ) -> Result<Response<pb::StartMaintenanceResponse>, Status> {
        let deadline = self.bulk_deadline(&request);
        let wait = request.into_inner().wait;
        let Submitted { task_id, report } = self.upkeep.maintenance(wait, deadline).await?;
        let report = report.map(|r| pb::MaintenanceReport {
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
        });
        Ok(Response::new(pb::StartMaintenanceResponse {
            task_id,
            report,
        }))
    }

    async fn warm(
        &self,
        request: Request<pb::WarmRequest>,
    ) -> Result<Response<pb::WarmResponse>, Status> {
        let deadline = self.bulk_deadline(&request);
        let r = request.into_inner();
        let entries = r
            .entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                entry(&format!("entries[{i}]."), e, self.max_value_size).map(|e| warm::to_line(&e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Submitted { task_id, report } = self
            .upkeep
            .warm(entries, r.skip_file, r.wait, deadline)
            .await?;
        let report = report.map(|report| pb::WarmReport {
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
        });
        Ok(Response::new(pb::WarmResponse { task_id, report }))
    }

    async fn cleanup(
        &self,
        request: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupResponse>, Status> {
        let deadline = self.bulk_deadline(&request);
        let wait = request.into_inner().wait;
        let Submitted { task_id, report } = self.upkeep.cleanup(wait, deadline).await?;
        let report = report.map(cleanup_report);
        Ok(Response::new(pb::CleanupResponse { task_id, report }))
    }
}
