//! The composition root: builds, in one place, what `koo serve`, `koo
//! worker` and `koo scheduler` run on: the cache store and the task store
//! (and whether they are one), the task engine, the built-in handlers, the
//! schedules, the watch hub, health publishing and the background loops.
//!
//! [`crate::server`] adds the listener, the router and the shutdown order
//! on top of a [`Serve`]; the binary parses its command line and calls
//! [`Serve::build`] (through [`crate::server::run`]), [`run_worker`] or
//! [`run_scheduler`].
//!
//! Rooms: `serve` (what `koo serve` runs on, and its stop), `commands`
//! (`koo worker` and `koo scheduler`); here, what they share: the built-in
//! handler registry and the check that a task Redis cannot evict.

use std::path::Path;
use std::time::Duration;

use crate::cache::Cache;
use crate::store::{MemoryReport, RedisStore, Store};
use crate::tasks::engine::TaskEngine;
use crate::tasks::worker::Registry;
use crate::tasks::{handlers, maintenance};

mod commands;
mod serve;
pub mod settings;

pub use self::commands::{SchedulerSettings, WorkerSettings, run_scheduler, run_worker};
pub use self::serve::{Serve, tasks_share_store};
pub use self::settings::{Limits, ScheduleSettings, Settings, StoreSettings, TaskSettings};

/// Why the stores, the engine or the loops could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The backend configuration is unusable.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The data directory cannot be used, or the embedded store not saved.
    #[error(transparent)]
    Persist(#[from] crate::persist::PersistError),
}

/// How long `koo worker` waits at least, once signalled, for its slots and
/// loops to stop: its slots give a running task `KOO_WORKER_SHUTDOWN_GRACE`
/// (10 s by default) and then hand it back, so 30 s (the default of `koo
/// serve`'s `KOO_SHUTDOWN_GRACE`) leaves room for the hand-backs on a slow
/// store; a longer task grace gets 20 s more than itself.
pub const WORKER_STOP_GRACE: Duration = Duration::from_secs(30);

/// How long `koo scheduler` waits, once signalled, for the tick it may be
/// firing: one submit per due schedule, each bounded by a store deadline of
/// a few seconds.
pub const SCHEDULER_STOP_GRACE: Duration = Duration::from_secs(10);

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
/// Fails start-up when the Redis of `config` answers but refuses the
/// URL's database: koo would otherwise report NOT_SERVING for ever over a
/// mistake in its configuration. A Redis that does not answer within two
/// seconds is waited for, as ever (koo starts while Redis is down).
pub async fn refuse_bad_database(
    redis: &RedisStore,
    config: &crate::store::RedisConfig,
) -> Result<(), crate::store::StoreError> {
    let deadline = crate::store::Deadline::after(Duration::from_secs(2));
    match redis.database_refused(deadline).await {
        None => Ok(()),
        Some(said) => Err(crate::store::StoreError::InvalidConfig(format!(
            "{}: {}: Redis refuses its database ({said}); a Redis has databases 0 to N - 1, N being its `databases` setting (16 by default)",
            config.setting,
            crate::store::redis::redact(&config.url)
        ))),
    }
}

/// A task Redis must never evict: warn when its policy could. Tries for
/// about a minute while Redis cannot be reached, and stops with `stop`
/// (a shutdown must not wait for a Redis that is down).
pub async fn warn_if_tasks_can_be_evicted(
    redis: RedisStore,
    stop: tokio_util::sync::CancellationToken,
) {
    let store = Store::from(redis);
    for _ in 0..30 {
        let deadline = crate::store::Deadline::after(Duration::from_secs(2));
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = store.memory(deadline) => read,
        };
        match read {
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
            Err(_) => tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use crate::store::MemoryStore;
    use crate::store::tasks::TaskStore;
    use crate::tasks::engine::TaskConfig;

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
}
