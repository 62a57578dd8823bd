//! `koo worker` and `koo scheduler`: built-in worker slots, or the
//! scheduler, on the task Redis, without gRPC.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::settings::ScheduleSettings;
use super::{registry, warn_if_tasks_can_be_evicted};
use crate::cache::{Cache, CacheConfig};
use crate::schedule::Schedules;
use crate::store::redis::redact;
use crate::store::schedules::ScheduleStore;
use crate::store::tasks::TaskStore;
use crate::store::{RedisConfig, RedisStore, Store, StoreError};
use crate::tasks::engine::{TaskConfig, TaskEngine};
use crate::tasks::worker::WorkerPool;

/// What `koo worker` needs: built-in worker slots on the task Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSettings {
    /// The Redis holding tasks.
    pub redis: RedisConfig,
    /// The cache's Redis (`REDIS_URL`), where results that ask for it are
    /// cached (`None`: such tasks fail).
    pub cache_redis: Option<RedisConfig>,
    /// The cache settings of `koo serve` (`CACHE_*`), so that a result
    /// this worker caches is written as `koo serve` would write it.
    pub cache: CacheConfig,
    /// The engine.
    pub tasks: TaskConfig,
    /// `KOO_DIAGNOSTICS_LEDGER`.
    pub ledger: Option<std::path::PathBuf>,
    /// Worker slots.
    pub concurrency: usize,
    /// How long, once signalled, the slots and loops get to stop.
    pub stop_grace: Duration,
    /// `KOO_HTTP_LISTEN`: where this process's `/metrics` is served
    /// (`None`: off, the default of `koo worker`).
    pub http_listen: Option<SocketAddr>,
}

/// `koo worker`: worker slots and lease recovery, no gRPC, until
/// `shutdown`; `started` is given the engine once built (the metrics
/// listener reads its figures).
pub async fn run_worker(
    settings: WorkerSettings,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(&TaskEngine),
) -> Result<(), StoreError> {
    let store = RedisStore::connect(&settings.redis)?;
    super::refuse_bad_database(&store, &settings.redis).await?;
    let engine = TaskEngine::new(
        TaskStore::redis(store.clone(), &settings.tasks.prefix),
        settings.tasks.clone(),
    );
    started(&engine);
    let queues = engine.config().queues();
    // Results that tasks ask to cache go to the cache's Redis (REDIS_URL),
    // which stores the encoding header with each value, so any koo reads them.
    let results = match &settings.cache_redis {
        Some(c) if c.url == settings.redis.url => Some(Store::from(store.clone())),
        Some(c) => {
            let cache = RedisStore::connect(c)?;
            super::refuse_bad_database(&cache, c).await?;
            Some(Store::from(cache))
        }
        None => None,
    }
    .map(|s| Cache::new(s, settings.cache.clone()));
    let ledger = settings.ledger.as_deref();
    let registry = registry(&engine, ledger, None, results);
    let pool = WorkerPool::new(
        engine.clone(),
        registry,
        queues.clone(),
        settings.concurrency,
    );
    tracing::info!(
        worker = pool.id(),
        slots = settings.concurrency,
        tasks = %format_args!("{} {}", settings.redis.setting, redact(&settings.redis.url)),
        "koo worker running"
    );
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(engine.clone().run_recovery(queues.clone(), stop.clone()));
    tasks.spawn(engine.clone().run_times_flush(stop.clone()));
    tasks.spawn(engine.clone().run_wakes(queues, stop.clone()));
    tasks.spawn(pool.run(stop.clone()));
    tasks.spawn(warn_if_tasks_can_be_evicted(store, stop.clone()));
    shutdown.await;
    tracing::info!(
        "stopping: running tasks get the shutdown grace to end, then go back to their queues"
    );
    stop.cancel();
    let drained = tokio::time::timeout(settings.stop_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("tasks still running go back to their queues when their leases lapse");
    }
    // what the workers ended during the grace
    engine.flush_times().await;
    tracing::info!("koo worker stopped");
    Ok(())
}

/// What `koo scheduler` needs: the schedules on the task Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerSettings {
    /// The Redis holding tasks and schedules.
    pub redis: RedisConfig,
    /// The engine the schedules submit through.
    pub tasks: TaskConfig,
    /// The default schedules and the reload pace.
    pub schedule: ScheduleSettings,
    /// How long, once signalled, the scheduler gets to stop.
    pub stop_grace: Duration,
    /// `KOO_HTTP_LISTEN`: where this process's `/metrics` is served
    /// (`None`: off, the default of `koo scheduler`).
    pub http_listen: Option<SocketAddr>,
}

/// `koo scheduler`: fires the periodic schedules (no gRPC, no workers)
/// until `shutdown`. Any number may run: each tick submits one task.
/// `started` is given the engine and the schedules once built.
pub async fn run_scheduler(
    settings: SchedulerSettings,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(&TaskEngine, &Schedules),
) -> Result<(), StoreError> {
    let store = RedisStore::connect(&settings.redis)?;
    super::refuse_bad_database(&store, &settings.redis).await?;
    let prefix = settings.tasks.prefix.clone();
    let engine = TaskEngine::new(TaskStore::redis(store.clone(), &prefix), settings.tasks);
    let schedules = Schedules::new(ScheduleStore::redis(store, &prefix), engine.clone());
    started(&engine, &schedules);
    tracing::info!(
        schedules = %format_args!("{} {}", settings.redis.setting, redact(&settings.redis.url)),
        "koo scheduler running"
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(crate::schedule::run(
        schedules,
        settings.schedule.defaults,
        settings.schedule.reload_interval,
        stop.clone(),
    ));
    shutdown.await;
    stop.cancel();
    if tokio::time::timeout(settings.stop_grace, run)
        .await
        .is_err()
    {
        tracing::warn!("the scheduler's tick did not end within its grace");
    }
    tracing::info!("koo scheduler stopped");
    Ok(())
}
