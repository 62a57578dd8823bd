//! The composition root: builds, in one place, what `koo serve`, `koo
//! worker` and `koo scheduler` run on: the cache store and the task store
//! (and whether they are one), the task engine, the built-in handlers, the
//! schedules, the watch hub, health publishing and the background loops.
//!
//! [`crate::server`] adds the listener, the router and the shutdown order
//! on top of a [`Serve`]; the binary parses its command line and calls
//! [`Serve::build`] (through [`crate::server::run`]), [`run_worker`] or
//! [`run_scheduler`].

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{Cache, CacheConfig};
use crate::health::{self, HealthPublisher};
use crate::pb::cache::v1::cache_service_server::SERVICE_NAME as CACHE_SERVICE;
use crate::pb::tasks::v1::task_service_server::SERVICE_NAME as TASK_SERVICE;
use crate::persist::{Embedded, PersistError};
use crate::schedule::Schedules;
use crate::schedule::store::ScheduleStore;
use crate::server::{ScheduleSettings, ServerError, Settings, StoreSettings};
use crate::store::redis::redact;
use crate::store::tasks::TaskStore;
use crate::store::{MemoryReport, MemoryStore, RedisConfig, RedisStore, Store, StoreError};
use crate::tasks::engine::{TaskConfig, TaskEngine};
use crate::tasks::worker::{Registry, WorkerPool};
use crate::tasks::{handlers, maintenance};
use crate::watch::{Hub, Watchers};

/// How long `koo worker` waits, once signalled, for its slots and loops to
/// stop: its slots give a running task `KOO_WORKER_SHUTDOWN_GRACE` (10 s by
/// default) and then hand it back, so 30 s (the default of `koo serve`'s
/// `KOO_SHUTDOWN_GRACE`) leaves room for the hand-backs on a slow store.
pub const WORKER_STOP_GRACE: Duration = Duration::from_secs(30);

/// How long `koo scheduler` waits, once signalled, for the tick it may be
/// firing: one submit per due schedule, each bounded by a store deadline of
/// a few seconds.
pub const SCHEDULER_STOP_GRACE: Duration = Duration::from_secs(10);

/// What `koo serve` runs on: built by [`Serve::build`], served by
/// [`crate::server::run`], stopped by [`Serve::shut_down`].
pub struct Serve {
    /// The cache's store.
    pub store: Store,
    /// The cache.
    pub cache: Cache,
    /// The task engine.
    pub engine: TaskEngine,
    /// Live task events, read through connections of their own.
    pub hub: Hub,
    /// The schedules.
    pub schedules: Schedules,
    /// Health of CacheService and TaskService, as the probes see them.
    pub publisher: HealthPublisher,
    /// The background loops; each ends on `stop`.
    pub background: JoinSet<()>,
    /// External workers' sessions: on shutdown, each hands its tasks back
    /// before koo exits.
    pub sessions: TaskTracker,
    /// Fires when koo stops.
    pub stop: CancellationToken,
    embedded: Embedded,
}

impl Serve {
    /// Opens the stores (the embedded one loaded, and its data directory
    /// locked, before anything serves) and starts the background loops.
    pub fn build(settings: &Settings) -> Result<Self, ServerError> {
        let embedded = Embedded::open(settings)?;
        let store = open_store(settings, &embedded)?;
        let cache = Cache::new(store.clone(), settings.cache.clone());
        let stop = CancellationToken::new();
        // NOT_SERVING until the first probe says otherwise. TaskService
        // follows the cache's store when its tasks live there, else a
        // monitor of its own (see `watch_task_store`).
        let publisher = HealthPublisher::new(vec![CACHE_SERVICE, TASK_SERVICE]);
        let mut background = JoinSet::new();
        let share = tasks_share_store(settings);
        background.spawn(health::monitor(
            store.clone(),
            publisher.clone(),
            if share {
                vec![CACHE_SERVICE, TASK_SERVICE]
            } else {
                vec![CACHE_SERVICE]
            },
            settings.health_check_interval,
            stop.clone(),
        ));
        background.spawn(cache.clone().run_metrics_publisher(stop.clone()));
        if let Some(memory) = store.as_memory() {
            let every = settings.memory_sweep_interval;
            background.spawn(sweep_expired(memory.clone(), every, stop.clone()));
        }
        if embedded.is_kept() {
            let every = settings.data.snapshot_interval;
            background.spawn(embedded.clone().run_snapshots(every, stop.clone()));
        }
        let engine = start_tasks(settings, &store, &embedded, &cache, &mut background, &stop)?;
        let hub = watch_hub(settings, &engine, &stop)?;
        if !share {
            watch_task_store(settings, &engine, &publisher, &mut background, &stop);
        }
        let schedules = start_scheduler(
            &settings.schedule,
            &engine,
            &embedded,
            &mut background,
            &stop,
        );
        Ok(Self {
            store,
            cache,
            engine,
            hub,
            schedules,
            publisher,
            background,
            sessions: TaskTracker::new(),
            stop,
            embedded,
        })
    }

    /// Stops the background loops and the worker sessions, waiting up to
    /// `grace` (past it, a task still running is left to its lease and
    /// another worker takes it over), then saves the embedded store: what
    /// it holds is final once the workers have stopped and the server has
    /// drained.
    pub async fn shut_down(self, grace: Duration) -> Result<(), PersistError> {
        let Self {
            mut background,
            sessions,
            stop,
            embedded,
            ..
        } = self;
        stop.cancel();
        sessions.close();
        let drained = tokio::time::timeout(grace, async {
            while background.join_next().await.is_some() {}
            sessions.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "background work did not stop within the shutdown grace; running tasks go back to their queues when their leases lapse"
            );
        }
        drop(background);
        match tokio::task::spawn_blocking(move || embedded.shutdown()).await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::error!(error = %e, "saving the embedded store failed");
                Ok(())
            }
        }
    }
}

/// Whether the tasks live in the cache's store (one Redis, or both
/// embedded): TaskService's health then follows the cache's probe, and
/// the two share one connection pool.
pub fn tasks_share_store(settings: &Settings) -> bool {
    match (&settings.store, &settings.tasks.redis) {
        (StoreSettings::Redis(cache), Some(tasks)) => cache.url == tasks.url,
        (StoreSettings::Memory(_), None) => true,
        _ => false,
    }
}

/// The cache's store: the embedded one (as loaded from the data
/// directory, if kept) or Redis.
fn open_store(settings: &Settings, embedded: &Embedded) -> Result<Store, StoreError> {
    Ok(match &settings.store {
        StoreSettings::Memory(config) => {
            tracing::info!(
                capacity_bytes = config.max_bytes,
                kept = embedded.is_kept(),
                "using the embedded in-process store (set REDIS_URL to use Redis): not shared between koo instances, kept across restarts only with KOO_DATA_DIR"
            );
            Store::from(
                embedded
                    .cache
                    .clone()
                    .unwrap_or_else(|| MemoryStore::new(config.clone())),
            )
        }
        StoreSettings::Redis(config) => {
            tracing::info!(url = %redact(&config.url), connections = config.max_connections, "using Redis");
            Store::from(RedisStore::connect(config)?)
        }
    })
}

/// The task store: on the task Redis (sharing the cache's pool when it is
/// the same Redis), or embedded when there is none.
fn task_store(
    settings: &Settings,
    store: &Store,
    embedded: &Embedded,
) -> Result<TaskStore, StoreError> {
    let Some(config) = &settings.tasks.redis else {
        tracing::info!(
            kept = embedded.is_kept(),
            "tasks live in this process (set REDIS_URL to use Redis): not shared with other koo processes, kept across restarts only with KOO_DATA_DIR"
        );
        return Ok(TaskStore::from_memory(
            embedded.tasks.clone().unwrap_or_default(),
        ));
    };
    let redis = match (store.as_redis(), &settings.store) {
        (Some(r), StoreSettings::Redis(c)) if c.url == config.url => r.clone(),
        _ => RedisStore::connect(config)?,
    };
    Ok(TaskStore::redis(redis, &settings.tasks.config.prefix))
}

/// The task engine, its recovery sweep and the built-in worker pool.
fn start_tasks(
    settings: &Settings,
    store: &Store,
    embedded: &Embedded,
    cache: &Cache,
    background: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> Result<TaskEngine, StoreError> {
    let tasks = task_store(settings, store, embedded)?;
    if let Some((redis, _)) = tasks.redis_parts() {
        background.spawn(warn_if_tasks_can_be_evicted(redis.clone()));
    }
    let engine = TaskEngine::new(tasks, settings.tasks.config.clone());
    let queues = settings.tasks.config.queues();
    background.spawn(engine.clone().run_recovery(queues.clone(), stop.clone()));
    if settings.tasks.workers > 0 {
        let ledger = settings.tasks.ledger.as_deref();
        let registry = registry(&engine, ledger, Some(cache), Some(cache.clone()));
        let pool = WorkerPool::new(engine.clone(), registry, queues, settings.tasks.workers);
        tracing::info!(
            worker = pool.id(),
            slots = settings.tasks.workers,
            "built-in workers running"
        );
        background.spawn(pool.run(stop.clone()));
    }
    Ok(engine)
}

/// TaskService's health when its tasks do not live in the cache's store:
/// a monitor of the task Redis, or serving for embedded tasks.
fn watch_task_store(
    settings: &Settings,
    engine: &TaskEngine,
    publisher: &HealthPublisher,
    background: &mut JoinSet<()>,
    stop: &CancellationToken,
) {
    match engine.store().redis_parts() {
        Some((store, _)) => {
            background.spawn(health::monitor(
                Store::from(store.clone()),
                publisher.clone(),
                vec![TASK_SERVICE],
                settings.health_check_interval,
                stop.clone(),
            ));
        }
        None => publisher.set_services(&[TASK_SERVICE], true),
    }
}

/// The schedules, kept with the tasks; the scheduler runs here unless
/// switched off.
fn start_scheduler(
    settings: &ScheduleSettings,
    engine: &TaskEngine,
    embedded: &Embedded,
    background: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> Schedules {
    let store = match engine.store().redis_parts() {
        Some((store, prefix)) => ScheduleStore::redis(store.clone(), prefix),
        None => embedded
            .schedules
            .clone()
            .unwrap_or_else(ScheduleStore::memory),
    };
    let schedules = Schedules::new(store, engine.clone());
    if settings.enabled {
        background.spawn(crate::schedule::run(
            schedules.clone(),
            settings.defaults.clone(),
            settings.reload_interval,
            stop.clone(),
        ));
    } else {
        tracing::info!("scheduler off in this process (--no-scheduler)");
    }
    schedules
}

/// The watch hub. Watchers read through connections of their own (see
/// [`crate::watch`]): one more to the task Redis; embedded tasks are
/// watched in the engine's own store.
fn watch_hub(
    settings: &Settings,
    engine: &TaskEngine,
    stop: &CancellationToken,
) -> Result<Hub, StoreError> {
    let tasks = match &settings.tasks.redis {
        None => engine.store().clone(),
        Some(config) => {
            let watch = RedisStore::connect(&RedisConfig {
                max_connections: 1,
                ..config.clone()
            })?;
            TaskStore::redis(watch, &settings.tasks.config.prefix)
        }
    };
    Ok(Hub::new(
        TaskEngine::new(tasks, settings.tasks.config.clone()),
        Watchers::new(settings.limits.max_watchers),
        settings.limits.watch_buffer,
        stop.clone(),
    ))
}

/// The built-in handlers: diagnostics (and the ledger, when a file is
/// named), the health check and database maintenance everywhere; cache
/// upkeep where the process serves the cache (`upkeep`); results that ask
/// for it cached in `results`.
pub fn registry(
    engine: &TaskEngine,
    ledger: Option<&Path>,
    upkeep: Option<&Cache>,
    results: Option<Cache>,
) -> Registry {
    let mut registry = Registry::default();
    handlers::register_diagnostics(&mut registry);
    if let Some(path) = ledger {
        handlers::register_ledger(&mut registry, path.to_owned());
    }
    handlers::register_health_check(&mut registry, engine.clone());
    if let Some(cache) = upkeep {
        maintenance::register_cache(&mut registry, cache.clone(), engine.clone());
    }
    if let Some(cache) = results {
        registry.set_cache(cache);
    }
    maintenance::register_database(&mut registry, engine.clone());
    registry
}

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
}

/// `koo worker`: worker slots and lease recovery, no gRPC, until
/// `shutdown`.
pub async fn run_worker(
    settings: WorkerSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let store = RedisStore::connect(&settings.redis)?;
    let engine = TaskEngine::new(
        TaskStore::redis(store.clone(), &settings.tasks.prefix),
        settings.tasks.clone(),
    );
    let queues = engine.config().queues();
    // Results that tasks ask to cache go to the cache's Redis (REDIS_URL),
    // which stores the encoding header with each value, so any koo reads them.
    let results = match &settings.cache_redis {
        Some(c) if c.url == settings.redis.url => Some(Store::from(store.clone())),
        Some(c) => Some(Store::from(RedisStore::connect(c)?)),
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
        "koo worker running"
    );
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(engine.run_recovery(queues, stop.clone()));
    tasks.spawn(pool.run(stop.clone()));
    tasks.spawn(warn_if_tasks_can_be_evicted(store));
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
}

/// `koo scheduler`: fires the periodic schedules (no gRPC, no workers)
/// until `shutdown`. Any number may run: each tick submits one task.
pub async fn run_scheduler(
    settings: SchedulerSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let store = RedisStore::connect(&settings.redis)?;
    let prefix = settings.tasks.prefix.clone();
    let engine = TaskEngine::new(TaskStore::redis(store.clone(), &prefix), settings.tasks);
    let schedules = Schedules::new(ScheduleStore::redis(store, &prefix), engine);
    let stop = CancellationToken::new();
    let run = tokio::spawn(crate::schedule::run(
        schedules,
        settings.schedule.defaults,
        settings.schedule.reload_interval,
        stop.clone(),
    ));
    shutdown.await;
    stop.cancel();
    let _ = tokio::time::timeout(settings.stop_grace, run).await;
    Ok(())
}

/// A task Redis must never evict: warn when its policy could.
pub async fn warn_if_tasks_can_be_evicted(redis: RedisStore) {
    let store = Store::from(redis);
    for _ in 0..30 {
        match store
            .memory(crate::store::Deadline::after(Duration::from_secs(2)))
            .await
        {
            Ok(MemoryReport {
                unavailable: Some(why),
                ..
            }) => {
                tracing::info!(reason = %why, "cannot check that the Redis holding tasks has maxmemory-policy noeviction (any other policy may evict task keys and lose tasks)");
                return;
            }
            Ok(m) if m.policy != "noeviction" => {
                tracing::warn!(policy = %m.policy, "the Redis holding tasks has a maxmemory-policy other than noeviction: it may evict task keys when full and lose tasks");
                return;
            }
            Ok(_) => return,
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// Purges the embedded store's expired entries every `every` until `stop`.
async fn sweep_expired(store: MemoryStore, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let purged = store.purge_expired();
                if purged > 0 {
                    tracing::debug!(purged, "purged expired entries");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::TaskSettings;

    fn redis(url: &str) -> RedisConfig {
        RedisConfig::new(url)
    }

    /// Tasks share the cache's store on one Redis, or when both are
    /// embedded; not on two Redis servers, nor with one embedded.
    #[test]
    fn which_store_the_tasks_share() {
        let with = |store: StoreSettings, tasks: Option<RedisConfig>| Settings {
            store,
            tasks: TaskSettings {
                redis: tasks,
                ..TaskSettings::default()
            },
            ..Settings::default()
        };
        let memory = || StoreSettings::Memory(crate::store::MemoryConfig::default());
        let a = "redis://127.0.0.1:1/0";
        let b = "redis://127.0.0.1:2/0";
        assert!(tasks_share_store(&with(memory(), None)));
        assert!(tasks_share_store(&with(
            StoreSettings::Redis(redis(a)),
            Some(redis(a))
        )));
        assert!(!tasks_share_store(&with(
            StoreSettings::Redis(redis(a)),
            Some(redis(b))
        )));
        assert!(!tasks_share_store(&with(memory(), Some(redis(a)))));
        assert!(!tasks_share_store(&with(
            StoreSettings::Redis(redis(a)),
            None
        )));
    }

    /// `koo serve` runs cache upkeep and caches results; `koo worker`
    /// without the cache's Redis runs neither; both run the rest.
    #[tokio::test]
    async fn builtin_handlers() {
        let engine = TaskEngine::new(
            TaskStore::from_memory(Default::default()),
            TaskConfig::default(),
        );
        let cache = Cache::new(
            Store::from(MemoryStore::new(Default::default())),
            CacheConfig::default(),
        );
        let serve = registry(&engine, None, Some(&cache), Some(cache.clone())).names();
        let worker = registry(&engine, None, None, None).names();
        assert!(
            worker.iter().all(|n| serve.contains(n)),
            "{worker:?} {serve:?}"
        );
        assert!(serve.len() > worker.len(), "{serve:?}");
        assert!(!worker.is_empty());
        let ledger = registry(&engine, Some(Path::new("/nonexistent")), None, None).names();
        assert_eq!(ledger.len(), worker.len() + 1, "{ledger:?}");
    }

    /// Embedded, the engine, the watch hub and the schedules share one
    /// task store: a task submitted through the engine is seen by the hub's
    /// reader; TaskService is serving without a probe of its own.
    #[tokio::test]
    async fn embedded_serve_shares_one_task_store() {
        use crate::domain::task::Category;
        use crate::store::Deadline;
        use crate::tasks::engine::NewTask;
        let settings = Settings {
            tasks: TaskSettings {
                workers: 0,
                ..TaskSettings::default()
            },
            schedule: ScheduleSettings {
                enabled: false,
                ..ScheduleSettings::default()
            },
            ..Settings::default()
        };
        let app = Serve::build(&settings).unwrap();
        let deadline = Deadline::after(Duration::from_secs(5));
        let new = NewTask::new("koo.examples.job", Category::Research);
        let task = app.engine.submit(new, deadline).await.unwrap();
        let seen = app
            .hub
            .engine()
            .get(task.id.as_str(), deadline)
            .await
            .unwrap();
        assert_eq!(seen.id, task.id);
        assert!(!app.engine.store().is_shared());
        app.shut_down(Duration::from_secs(5)).await.unwrap();
    }
}
