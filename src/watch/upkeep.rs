//! Upkeep on request: submits one of the cache's built-in upkeep tasks
//! (`tasks::maintenance`) for a caller (CacheService's `Cleanup`, `Warm`
//! and `StartMaintenance`) and, if asked, waits for its end through the
//! watch hub, turning its stored result into a typed report and its stored
//! error into an [`UpkeepError`]. It lives with the watches rather than the
//! tasks because waiting for a task's end is what the hub does; the task
//! engine stays below it.

use std::time::Duration;

use serde_json::json;

use super::Hub;
use crate::cache::{CleanupReport, MaintenanceReport, WarmReport};
use crate::domain::task::{Category, Priority, State};
use crate::store::Deadline;
use crate::tasks::engine::{NewTask, TaskEngine, TaskError};
use crate::tasks::maintenance::{CACHE_CLEANUP, CACHE_MAINTENANCE, CACHE_WARM};

/// Submits the cache's upkeep tasks for callers (CacheService's `Cleanup`,
/// `Warm` and `StartMaintenance`) and waits for their ends: a cheap-to-clone
/// handle.
#[derive(Clone)]
pub struct CacheUpkeep {
    /// Where the tasks are submitted.
    engine: TaskEngine,
    /// Where their ends are followed.
    hub: Hub,
}

/// A submitted upkeep task.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted<R> {
    /// Its id.
    pub task_id: String,
    /// Its report, when the caller waited and it succeeded in time.
    pub report: Option<R>,
}

/// Why an upkeep call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpkeepError {
    /// The warm entries make a task koo refuses (its kwargs are too large).
    #[error("entries: {reason}")]
    InvalidEntries {
        /// Why.
        reason: String,
    },
    /// The task could not be submitted or followed.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The task ended otherwise than SUCCEEDED.
    #[error("task {id} ended {}: {message}", state.as_str())]
    Ended {
        /// The task.
        id: String,
        /// Its end state.
        state: State,
        /// Its error's message (empty when it stored none).
        message: String,
    },
    /// The task succeeded with a result that is not its report.
    #[error("the task's report does not parse: {0}")]
    Report(String),
    /// Waited for, the task stays queued and no worker serves it (only
    /// `koo serve`'s built-in workers do, and every koo serving the store
    /// has `KOO_WORKER_CONCURRENCY=0`): it runs when one starts.
    #[error(
        "task {id} is queued but no worker serves {name}: only the built-in workers of `koo serve` run it, and no koo serving this store runs any (KOO_WORKER_CONCURRENCY=0); it runs when one starts: follow it with GetTask or WatchTask"
    )]
    Unserved {
        /// The task.
        id: String,
        /// Its name.
        name: String,
    },
}

/// How often a wait checks that some worker serves the task it waits for.
const SERVED_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Checks in a row that find no worker (the task still queued) before a
/// wait gives up: a worker's presence record is written when it starts,
/// and again every third of a lease.
const UNSERVED_CHECKS: u32 = 3;

/// Time kept, before the caller's deadline, to answer after a wait.
const ANSWER_MARGIN: Duration = Duration::from_millis(100);

impl CacheUpkeep {
    /// Submits through `engine`, follows ends through `hub`.
    pub fn new(engine: TaskEngine, hub: Hub) -> Self {
        Self { engine, hub }
    }

    /// A [`CACHE_CLEANUP`] task.
    pub async fn cleanup(
        &self,
        wait: bool,
        deadline: Deadline,
    ) -> Result<Submitted<CleanupReport>, UpkeepError> {
        self.run(CACHE_CLEANUP, json!({}), wait, deadline).await
    }

    /// A [`CACHE_MAINTENANCE`] task.
    pub async fn maintenance(
        &self,
        wait: bool,
        deadline: Deadline,
    ) -> Result<Submitted<MaintenanceReport>, UpkeepError> {
        self.run(CACHE_MAINTENANCE, json!({}), wait, deadline).await
    }

    /// A [`CACHE_WARM`] task loading `entries` (warm-file lines, as
    /// [`warm::to_line`] writes them) and, unless `skip_file`, the warm file.
    pub async fn warm(
        &self,
        entries: Vec<serde_json::Value>,
        skip_file: bool,
        wait: bool,
        deadline: Deadline,
    ) -> Result<Submitted<WarmReport>, UpkeepError> {
        let kwargs = json!({ "entries": entries, "skip_file": skip_file });
        self.run(CACHE_WARM, kwargs, wait, deadline).await
    }

    /// Submits upkeep task `name` with `kwargs`; with `wait`, also waits
    /// (until shortly before `deadline`) for its end and reads its report.
    async fn run<R: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        kwargs: serde_json::Value,
        wait: bool,
        deadline: Deadline,
    ) -> Result<Submitted<R>, UpkeepError> {
        let mut new = NewTask::new(name, Category::Cache);
        new.priority = Priority::High;
        new.kwargs = kwargs.to_string();
        let task = self
            .engine
            .submit(new, deadline)
            .await
            .map_err(|e| match e {
                TaskError::InvalidArgument { reason, .. } => UpkeepError::InvalidEntries { reason },
                other => other.into(),
            })?;
        let task_id = task.id.to_string();
        if !wait {
            return Ok(Submitted {
                task_id,
                report: None,
            });
        }
        let until = Deadline::after(deadline.remaining().saturating_sub(ANSWER_MARGIN));
        let ended = tokio::select! {
            ended = self.hub.wait_final(&self.engine, &task.id, until) => ended?,
            () = self.unserved(name, &task.id) => {
                return Err(UpkeepError::Unserved { id: task_id, name: name.to_owned() });
            }
        };
        let report = match ended {
            None => None,
            Some(t) if t.state == State::Succeeded => {
                t.result.as_deref().map(parse_report).transpose()?
            }
            Some(t) => {
                return Err(UpkeepError::Ended {
                    message: error_message(t.error.as_deref()),
                    id: task_id,
                    state: t.state,
                });
            }
        };
        Ok(Submitted { task_id, report })
    }
}

impl CacheUpkeep {
    /// Resolves when the queued task `id` has waited [`UNSERVED_CHECKS`]
    /// checks in a row with no live worker serving `name` on the cache
    /// queue; pending for ever while it is served (or no longer queued).
    async fn unserved(&self, name: &str, id: &crate::domain::task::TaskId) {
        let mut unserved = 0;
        let mut every = tokio::time::interval(SERVED_CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // the first check a second after the submit, not at once
        every.tick().await;
        loop {
            every.tick().await;
            let deadline = Deadline::after(SERVED_CHECK_EVERY);
            let served = match self.engine.store().list_workers(deadline).await {
                // no names: an external worker serving every name
                Ok(workers) => workers.iter().any(|w| {
                    w.queues.iter().any(|q| q == Category::Cache.as_str())
                        && (w.names.is_empty() || w.names.iter().any(|n| n == name))
                }),
                // a store that does not answer says nothing about workers
                Err(_) => true,
            };
            if served {
                unserved = 0;
                continue;
            }
            // read only when no worker serves it: is it still waiting?
            let queued = match self.engine.get(id.as_str(), deadline).await {
                Ok(task) => task.state == State::Queued,
                Err(_) => false,
            };
            unserved = if queued { unserved + 1 } else { 0 };
            if unserved >= UNSERVED_CHECKS {
                return;
            }
        }
    }
}

/// A task's JSON result as its report.
fn parse_report<R: serde::de::DeserializeOwned>(result: &str) -> Result<R, UpkeepError> {
    serde_json::from_str(result).map_err(|e| UpkeepError::Report(e.to_string()))
}

/// The message of a task's stored error (JSON with a `message`), or `""`.
fn error_message(stored: Option<&str>) -> String {
    stored
        .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .and_then(|e| e["message"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tasks::TaskStore;
    use crate::tasks::engine::TaskConfig;
    use crate::watch::Watchers;
    use tokio_util::sync::CancellationToken;

    /// A stored error's message is read from its JSON; anything else is
    /// an empty message, not a failure.
    #[test]
    fn stored_errors_give_their_message() {
        let stored = r#"{"message":"warm file unreadable","retryable":false}"#;
        assert_eq!(error_message(Some(stored)), "warm file unreadable");
        assert_eq!(error_message(Some("not json")), "");
        assert_eq!(error_message(None), "");
        let e = UpkeepError::Ended {
            id: "cache~1".into(),
            state: State::Failed,
            message: "warm file unreadable".into(),
        };
        assert_eq!(
            e.to_string(),
            "task cache~1 ended failed: warm file unreadable"
        );
        let r: Result<CleanupReport, _> = parse_report("[1]");
        assert!(matches!(r, Err(UpkeepError::Report(_))));
    }

    /// An upkeep task that fails is a typed error naming its end state and
    /// its stored message; one not waited for is only its id.
    #[tokio::test]
    async fn a_failed_upkeep_task_is_a_typed_error() {
        let stop = CancellationToken::new();
        let engine = TaskEngine::new(TaskStore::memory(), TaskConfig::default());
        let hub = Hub::new(engine.clone(), Watchers::new(8), 64, stop.clone());
        let upkeep = CacheUpkeep::new(engine.clone(), hub);
        let deadline = || Deadline::after(Duration::from_secs(5));
        let queued = upkeep.cleanup(false, deadline()).await.unwrap();
        assert_eq!(queued.report, None);
        // a worker that fails whatever it leases
        let failing = {
            let engine = engine.clone();
            tokio::spawn(async move {
                loop {
                    if let Some(t) = lease_one(&engine).await {
                        fail(&engine, t).await;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let e = upkeep.cleanup(true, deadline()).await.unwrap_err();
        failing.abort();
        stop.cancel();
        match e {
            UpkeepError::Ended { state, message, .. } => {
                assert_eq!(state, State::Failed);
                assert_eq!(message, "no cleanup here");
            }
            other => panic!("{other:?}"),
        }
    }

    async fn lease_one(engine: &TaskEngine) -> Option<crate::domain::task::Task> {
        let queue = Category::Cache.default_queue();
        let deadline = Deadline::after(Duration::from_secs(1));
        engine.lease(&queue, "test", &["*"], deadline).await.ok()?
    }

    async fn fail(engine: &TaskEngine, task: crate::domain::task::Task) {
        let finish = crate::tasks::engine::Finish::failed("no cleanup here", false);
        let deadline = Deadline::after(Duration::from_secs(1));
        engine
            .finish(&task, task.token, "test", finish, deadline)
            .await
            .unwrap();
    }
}
