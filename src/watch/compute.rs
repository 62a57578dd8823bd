//! GetOrCompute: a missing entry computed once by a koo task, for every
//! caller on every koo instance.
//!
//! The caller that takes the entry's lock (`Cache::get_or_lock`) submits
//! the task with `cache_result` naming the entry, so that the task's
//! success writes it even if this koo dies, and records the task's id in
//! the lock (waiters report it). The others wait for the entry. When the
//! lock lapses without an entry (the task failed, or was lost), the next
//! caller submits again. It lives with the watches, as `upkeep` does,
//! because waiting for a task's end is what the hub does.

use std::time::Duration;

use super::Hub;
use crate::cache::compute::{Lease, Locked};
use crate::cache::{Cache, CacheError, Hit, Level};
use crate::domain::task::{CacheTarget, Category, State, TaskId};
use crate::store::{Deadline, lock_task};
use crate::tasks::engine::{NewTask, TaskEngine, TaskError};

/// The least a compute task's idempotency key is kept: longer than any
/// retry of its submit within one call (a store call is bounded to half of
/// the engine's 15 s claim takeover), whatever the lock's TTL.
const COMPUTE_KEY_FLOOR: Duration = Duration::from_secs(60);

/// What computes a missing entry, and the entry it makes.
#[derive(Debug, Clone)]
pub struct ComputeRequest {
    /// The entry's level.
    pub level: Level,
    /// Its key.
    pub key: String,
    /// The task (name, args, kwargs, queue); its `cache_result` and
    /// idempotency key are set here.
    pub task: NewTask,
    /// The entry's TTL.
    pub ttl: Duration,
    /// The entry's tags.
    pub tags: Vec<String>,
    /// The entry's soft TTL.
    pub soft_ttl: Option<Duration>,
    /// How long the computing task holds the key before another caller
    /// submits again.
    pub lock_ttl: Duration,
}

/// The entry, and how it came.
#[derive(Debug, Clone, PartialEq)]
pub struct Computed {
    /// The entry.
    pub hit: Hit,
    /// Whether this call submitted the task that computed it.
    pub computed: bool,
    /// The task that computed it, when this call submitted or waited on it.
    pub task_id: Option<String>,
}

/// Why GetOrCompute failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ComputeError {
    /// The cache (or its lock) failed, or the call's deadline passed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The task could not be submitted or followed.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The task ended otherwise than SUCCEEDED.
    #[error("the compute task {id} ended {}: {message}", state.as_str())]
    Failed {
        /// The task.
        id: String,
        /// Its end state.
        state: State,
        /// Its error's message.
        message: String,
    },
    /// The call's deadline passed before the task it submitted ended (the
    /// task still runs, or waits to, and fills the entry when it succeeds).
    #[error(
        "the deadline passed before the compute task {id} that this call submitted ended (it fills the entry when it succeeds; GetTask {id} says where it is)"
    )]
    Unfinished {
        /// The task.
        id: String,
    },
    /// The task succeeded but its entry was gone when read (deleted or
    /// invalidated at once).
    #[error("the compute task {id} succeeded but its entry was removed before it could be read")]
    Vanished {
        /// The task.
        id: String,
    },
}

/// Computes missing entries with tasks: a cheap-to-clone handle.
#[derive(Clone)]
pub struct ComputeOnMiss {
    cache: Cache,
    engine: TaskEngine,
    hub: Hub,
}

impl ComputeOnMiss {
    /// Reads and fills `cache`, submits through `engine`, follows through `hub`.
    pub fn new(cache: Cache, engine: TaskEngine, hub: Hub) -> Self {
        Self { cache, engine, hub }
    }

    /// The entry of `req`, computed by its task if it is missing.
    pub async fn get_or_compute(
        &self,
        req: ComputeRequest,
        deadline: Deadline,
    ) -> Result<Computed, ComputeError> {
        self.check(&req)?;
        let locked = self
            .cache
            .get_or_lock(req.level, &req.key, req.lock_ttl, None, deadline)
            .await?;
        match locked {
            Locked::Value { hit, waited_on } => Ok(Computed {
                hit,
                computed: false,
                task_id: waited_on.as_deref().and_then(lock_task).map(str::to_owned),
            }),
            Locked::Refresh { hit, lease } => {
                // Everyone gets the stale value now; the task refreshes it.
                let this = self.clone();
                tokio::spawn(async move { this.refresh(req, lease).await });
                Ok(Computed {
                    hit,
                    computed: false,
                    task_id: None,
                })
            }
            Locked::Compute(lease) => self.compute(req, lease, deadline).await,
            Locked::TimedOut => Err(CacheError::DeadlineExceeded.into()),
        }
    }

    /// Checks the entry's tags and soft TTL and the task (with the
    /// `cache_result` it would carry) before the entry is read: a request
    /// that could never fill its entry fails on a hit too, not first when
    /// the key goes missing in production. The task's fields are named
    /// `task.*`, as in the request.
    fn check(&self, req: &ComputeRequest) -> Result<(), ComputeError> {
        // the key first, named as the request names it (the task's
        // cache_result would name it `task.cache_result.key`)
        self.cache.check_key(|| "key".into(), &req.key)?;
        crate::cache::tags::check("", &req.tags, req.soft_ttl, req.ttl)?;
        let mut task = req.task.clone();
        task.cache_result = Some(target(req));
        self.engine.check(task, "task")?;
        Ok(())
    }

    /// Submits the task under `lease` and records its id in the lock.
    async fn submit(
        &self,
        req: &ComputeRequest,
        lease: &Lease,
        deadline: Deadline,
    ) -> Result<TaskId, ComputeError> {
        let mut new = req.task.clone();
        new.cache_result = Some(target(req));
        // A retried submit (outcome unknown) must not run it twice.
        new.idempotency_key = Some(format!(
            "koo.cache.compute:{}:{:016x}:{}",
            req.level.as_str(),
            crate::store::fnv1a(req.key.as_bytes()),
            lease.token
        ));
        // The token is this lock's alone: no submit repeats the key once
        // the lock has lapsed, so the key need not outlive it (by default
        // it would be kept a day, one per computed entry).
        new.idempotency_ttl = Some(req.lock_ttl.max(COMPUTE_KEY_FLOOR));
        let submitted = self.engine.submit_keyed(new, deadline).await;
        let task = match submitted {
            Ok((task, _)) => task,
            Err(e) => {
                let _ = self.release(req, lease).await;
                return Err(e.into());
            }
        };
        self.cache
            .tag_lock(
                req.level,
                &req.key,
                &lease.token,
                task.id.as_str(),
                deadline,
            )
            .await?;
        Ok(task.id)
    }

    /// The lock winner's path: submit, wait for the task, read its entry.
    async fn compute(
        &self,
        req: ComputeRequest,
        lease: Lease,
        deadline: Deadline,
    ) -> Result<Computed, ComputeError> {
        let task_id = self.submit(&req, &lease, deadline).await?;
        let id = task_id.to_string();
        // Past the deadline the task still runs and fills the entry; the
        // lock stays, so that nobody submits it again meanwhile.
        let Some(ended) = self
            .hub
            .wait_final(&self.engine, &task_id, deadline)
            .await?
        else {
            return Err(ComputeError::Unfinished { id });
        };
        if ended.state != State::Succeeded {
            // Give the key up, so that a waiter takes over at once.
            let _ = self.release(&req, &lease).await;
            return Err(ComputeError::Failed {
                message: error_message(ended.error.as_deref()),
                id,
                state: ended.state,
            });
        }
        // counted already: GetOrLock's miss is this call's read
        let hit = self.cache.read(req.level, &req.key, deadline).await;
        let _ = self.release(&req, &lease).await;
        match hit? {
            Some(hit) => Ok(Computed {
                hit,
                computed: true,
                task_id: Some(id),
            }),
            None => Err(ComputeError::Vanished { id }),
        }
    }

    /// Refreshes a stale entry in the background: submit, wait (at most the
    /// lease), release.
    async fn refresh(self, req: ComputeRequest, lease: Lease) {
        let deadline = Deadline::after(req.lock_ttl);
        let Ok(task_id) = self.submit(&req, &lease, deadline).await else {
            return;
        };
        let _ = self.hub.wait_final(&self.engine, &task_id, deadline).await;
        let _ = self.release(&req, &lease).await;
    }

    async fn release(&self, req: &ComputeRequest, lease: &Lease) -> Result<(), CacheError> {
        let deadline = Deadline::after(Duration::from_secs(5));
        self.cache
            .release_lock(req.level, &req.key, &lease.token, deadline)
            .await
    }
}

/// The entry the compute task of `req` writes when it succeeds.
fn target(req: &ComputeRequest) -> CacheTarget {
    CacheTarget {
        level: req.level,
        key: req.key.clone(),
        ttl_ms: u64::try_from(req.ttl.as_millis()).unwrap_or(u64::MAX),
        tags: req.tags.clone(),
        soft_ttl_ms: req
            .soft_ttl
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }
}

/// The message of a task's stored error (JSON with a `message`), or `""`.
fn error_message(stored: Option<&str>) -> String {
    stored
        .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .and_then(|e| e["message"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A compute task as the engine takes it: in the cache's category (so its
/// default queue is `cache`'s) unless a queue is named.
pub fn compute_task(name: &str, args: String, kwargs: String) -> NewTask {
    let mut new = NewTask::new(name, Category::Cache);
    new.args = args;
    new.kwargs = kwargs;
    new
}
