//! `koo.cache.v1.CacheService`: converts requests, calls [`Cache`], converts
//! replies.

mod compute;
mod entries;
mod invalidations;
mod reports;
mod tags;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub(crate) use self::entries::level;
pub(crate) use self::entries::to_pb_level;
use self::entries::{entry, get_response, set_response};
use super::deadline;
use super::time;
use crate::auth::audit;
use crate::cache::{Cache, warm};
use crate::pb::cache::v1 as pb;
use crate::store::Deadline;
use crate::tasks::engine::TaskEngine;
use crate::watch::compute::ComputeOnMiss;
use crate::watch::upkeep::{CacheUpkeep, Submitted};
use crate::watch::{Hub, Kind as WatchKind, Ticker, Watchers};

/// The CacheService implementation.
pub struct CacheApi {
    cache: Cache,
    /// Where `Cleanup`, `Warm` and `StartMaintenance` submit their tasks.
    upkeep: CacheUpkeep,
    /// Where `GetOrCompute` submits its tasks.
    compute: ComputeOnMiss,
    /// This process's watch streams (`WatchMetrics` counts against them).
    watchers: Watchers,
    max_value_size: usize,
    request_timeout: Duration,
    bulk_timeout: Duration,
    /// `WatchMetrics` snapshots, taken once per interval and shared.
    metrics: Ticker<pb::WatchMetricsResponse>,
    /// Ends `WatchInvalidations` streams.
    shutdown: CancellationToken,
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
        let stop = shutdown.clone();
        let metrics = Ticker::new(shutdown.clone(), move |interval: Duration| {
            let cache = source.clone();
            let f: futures::future::BoxFuture<'static, _> = Box::pin(async move {
                let report = cache
                    .metrics(Deadline::after(request_timeout.min(interval)))
                    .await;
                pb::WatchMetricsResponse {
                    metrics: Some(reports::metrics(report)),
                }
            });
            f
        });
        Self {
            compute: ComputeOnMiss::new(cache.clone(), tasks.0.clone(), tasks.1.clone()),
            cache,
            upkeep: CacheUpkeep::new(tasks.0, tasks.1.clone()),
            watchers: tasks.1.watchers().clone(),
            max_value_size,
            request_timeout,
            bulk_timeout,
            metrics,
            shutdown: stop,
        }
    }

    fn deadline<T>(&self, r: &Request<T>) -> Deadline {
        deadline::from_metadata(r.metadata(), self.request_timeout)
    }

    fn bulk_deadline<T>(&self, r: &Request<T>) -> Deadline {
        deadline::from_metadata(r.metadata(), self.bulk_timeout)
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
                tags: r.tags,
                soft_ttl: r.soft_ttl,
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
        Ok(Response::new(reports::health(
            self.cache.health(deadline).await,
        )))
    }

    async fn get_metrics(
        &self,
        request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        let deadline = self.deadline(&request);
        let report = self.cache.metrics(deadline).await;
        Ok(Response::new(pb::GetMetricsResponse {
            metrics: Some(reports::metrics(report)),
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
        let report = report.map(reports::maintenance_report);
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
                let at = format!("entries[{i}].");
                let e = entry(&at, e, self.max_value_size)?;
                // refused here as SetMany refuses it, not reported by the
                // warm-up as a failure of a call that succeeded
                self.cache.check_entry(|| at.clone(), &e)?;
                Ok::<_, Status>(warm::to_line(&e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Submitted { task_id, report } = self
            .upkeep
            .warm(entries, r.skip_file, r.wait, deadline)
            .await?;
        let report = report.map(reports::warm_report);
        Ok(Response::new(pb::WarmResponse { task_id, report }))
    }

    async fn cleanup(
        &self,
        request: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupResponse>, Status> {
        let deadline = self.bulk_deadline(&request);
        let wait = request.into_inner().wait;
        let Submitted { task_id, report } = self.upkeep.cleanup(wait, deadline).await?;
        let report = report.map(reports::cleanup_report);
        Ok(Response::new(pb::CleanupResponse { task_id, report }))
    }

    async fn invalidate_tags(
        &self,
        request: Request<pb::InvalidateTagsRequest>,
    ) -> Result<Response<pb::InvalidateTagsResponse>, Status> {
        self.invalidate_tags_rpc(request).await
    }

    async fn get_or_lock(
        &self,
        request: Request<pb::GetOrLockRequest>,
    ) -> Result<Response<pb::GetOrLockResponse>, Status> {
        self.get_or_lock_rpc(request).await
    }

    async fn fill(
        &self,
        request: Request<pb::FillRequest>,
    ) -> Result<Response<pb::FillResponse>, Status> {
        self.fill_rpc(request).await
    }

    async fn get_or_compute(
        &self,
        request: Request<pb::GetOrComputeRequest>,
    ) -> Result<Response<pb::GetOrComputeResponse>, Status> {
        self.get_or_compute_rpc(request).await
    }

    type WatchInvalidationsStream = invalidations::InvalidationStream;

    async fn watch_invalidations(
        &self,
        request: Request<pb::WatchInvalidationsRequest>,
    ) -> Result<Response<Self::WatchInvalidationsStream>, Status> {
        self.watch_invalidations_rpc(request).await
    }
}
