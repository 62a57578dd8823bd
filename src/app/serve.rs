//! `koo serve`'s composition: the cache's store, the task store (shared
//! with the cache when they are one), the engine and its loops, the watch
//! hub, the schedules and health publishing; and their stop, in order.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AppError;
use super::settings::{ScheduleSettings, Settings, StoreSettings};
use super::{registry, warn_if_tasks_can_be_evicted};
use crate::cache::Cache;
use crate::domain::flow::Limit;
use crate::health::{self, HealthPublisher};
use crate::pb::cache::v1::cache_service_server::SERVICE_NAME as CACHE_SERVICE;
use crate::pb::tasks::v1::task_service_server::SERVICE_NAME as TASK_SERVICE;
use crate::persist::{Embedded, EmbeddedParts, PersistError};
use crate::schedule::Schedules;
use crate::store::redis::redact;
use crate::store::schedules::ScheduleStore;
use crate::store::tasks::TaskStore;
use crate::store::{Deadline, MemoryStore, RedisConfig, RedisStore, Store, StoreError};
use crate::tasks::engine::TaskEngine;
use crate::tasks::worker::WorkerPool;
use crate::watch::{Hub, Watchers};

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
    /// The embedded parts and their data directory (for `/metrics`).
    pub fn embedded(&self) -> &Embedded {
        &self.embedded
    }

    /// Opens the stores (the embedded one loaded, and its data directory
    /// locked, before anything serves) and starts the background loops.
    pub fn build(settings: &Settings) -> Result<Self, AppError> {
        let embedded = Embedded::open(embedded_parts(settings), &settings.data)?;
        let store = open_store(settings, &embedded)?;
        let cache = Cache::new(store.clone(), settings.cache.clone());
        warn_if_warm_file_unreadable(settings.cache.warm_file.as_deref());
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

    /// Fails when a Redis answers but refuses its URL's database (the
    /// cache's, and the task store's when it is another Redis): see
    /// [`super::refuse_bad_database`].
    pub async fn refuse_bad_databases(&self, settings: &Settings) -> Result<(), AppError> {
        if let (StoreSettings::Redis(config), Some(redis)) =
            (&settings.store, self.store.as_redis())
        {
            super::refuse_bad_database(redis, config).await?;
        }
        if let (Some(config), false) = (&settings.tasks.redis, tasks_share_store(settings))
            && let Some((redis, _)) = self.engine.store().redis_parts()
        {
            super::refuse_bad_database(redis, config).await?;
        }
        Ok(())
    }

    /// Sets the configured limits (`KOO_RATE_LIMITS`,
    /// `KOO_CONCURRENCY_LIMITS`): once now, within a second, so that a koo
    /// that starts serving has them; while the task store cannot be
    /// reached, again in the background until it can (koo serves
    /// meanwhile, as it does when Redis is down at start-up).
    pub async fn apply_configured_limits(&mut self, limits: Vec<Limit>) {
        if limits.is_empty() {
            return;
        }
        let engine = self.engine.clone();
        let first = engine
            .apply_configured_limits(&limits, Deadline::after(Duration::from_secs(1)))
            .await;
        match first {
            Ok(()) => return tracing::info!(limits = limits.len(), "configured limits set"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot set the configured limits yet; trying again")
            }
        }
        let stop = self.stop.clone();
        self.background.spawn(async move {
            let mut wait = Duration::from_millis(250);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let deadline = Deadline::after(Duration::from_secs(5));
                match engine.apply_configured_limits(&limits, deadline).await {
                    Ok(()) => {
                        return tracing::info!(limits = limits.len(), "configured limits set");
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot set the configured limits yet"),
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
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
            engine,
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
        // what the workers ended during the grace
        engine.flush_times().await;
        let kept = engine.kept_leases();
        match tokio::task::spawn_blocking(move || embedded.shutdown(&kept)).await {
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
        (Some(r), StoreSettings::Redis(c)) if c.url == config.url => {
            tracing::info!(setting = config.setting, url = %redact(&config.url), "tasks on Redis, the cache's");
            r.clone()
        }
        _ => {
            // (TASK_BROKER_URL, else TASK_RESULT_BACKEND, else REDIS_URL)
            tracing::info!(setting = config.setting, url = %redact(&config.url), connections = config.max_connections, "tasks on Redis");
            RedisStore::connect(config)?
        }
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
        background.spawn(warn_if_tasks_can_be_evicted(redis.clone(), stop.clone()));
    }
    let engine = TaskEngine::new(tasks, settings.tasks.config.clone());
    let queues = settings.tasks.config.queues();
    background.spawn(engine.clone().run_recovery(queues.clone(), stop.clone()));
    background.spawn(engine.clone().run_times_flush(stop.clone()));
    background.spawn(engine.clone().run_wakes(queues.clone(), stop.clone()));
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

/// What of the embedded store `KOO_DATA_DIR` keeps: the cache when it is
/// embedded, the tasks (and schedules) when they are.
fn embedded_parts(settings: &Settings) -> EmbeddedParts {
    EmbeddedParts {
        cache: match &settings.store {
            StoreSettings::Memory(c) => Some(c.clone()),
            StoreSettings::Redis(_) => None,
        },
        cache_prefix: settings.cache.prefix.clone(),
        tasks: settings
            .tasks
            .redis
            .is_none()
            .then_some(settings.tasks.config.limits),
    }
}

/// A warm file koo cannot read fails every warm-up (each `Warm` call and
/// each `cache-warm` tick) as a task, which the log would not show: said
/// once at start-up instead. Not an error: the file may be mounted later.
fn warn_if_warm_file_unreadable(path: Option<&std::path::Path>) {
    if let Some(path) = path
        && let Err(e) = std::fs::File::open(path)
    {
        tracing::warn!(
            file = %path.display(),
            error = %e,
            "KOO_CACHE_WARM_FILE cannot be read: every warm-up will fail until it can"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::settings::TaskSettings;

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
