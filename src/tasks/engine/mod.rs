//! The task engine: validates submits and drives the store's transitions.
//!
//! A cheap-to-clone handle over a [`TaskStore`]: Redis (shared by any
//! number of koo processes) or the embedded store (one `koo serve`).
//! Workers ([`super::worker`]) and the gRPC service are its clients; the recovery loop ([`TaskEngine::run_recovery`])
//! runs on every koo instance, so a dead worker's task comes back within the
//! lease time plus one sweep wherever it ran.
//!
//! One room per concern, each an `impl TaskEngine` block: `submit`
//! (validation and submits), `dependencies` (PENDING tasks and their
//! release), `idempotency` (keyed submits), `lease` (lease, heartbeat,
//! progress, finish, hand-back, abandon), `control` (cancel, retry, dead
//! letters, cleanup), `recovery` (the sweep), `config` (the settings),
//! `batch` (ends of attempts grouped into one call per queue), `handoff`
//! (a new task given to an idle slot of this process in the submit's call).
//! Errors are [`crate::tasks::error`]'s, re-exported here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::QueueStats;
use crate::domain::task::{QueueName, Task, TaskId};
use crate::store::Deadline;
use crate::store::tasks::TaskStore;
use crate::tasks::counters::TaskCounters;
use crate::tasks::remote::secret::SignerCell;

mod batch;
mod config;
mod control;
mod debounce;
mod dependencies;
mod flow;
mod handoff;
mod idempotency;
mod lease;
mod queues;
mod recovery;
mod submit;
mod times;
mod wakes;

pub use self::config::TaskConfig;
pub use self::debounce::{Debounce, MAX_DEBOUNCE_KEY, MAX_DEBOUNCE_WINDOW};
pub use self::flow::MAX_BACKOFF;
pub use self::handoff::{Handed, IdleSlot};
pub use self::lease::Finish;
pub use self::submit::{Expiry, MAX_ARGUMENTS, NewTask};
pub use crate::tasks::error::TaskError;

/// A cancel asked for through this process: the task, and the reason its
/// caller gave (or `cancelled by request`), which a worker passes on to the
/// handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelAsked {
    /// The task to stop.
    pub id: TaskId,
    /// Why (shared: every subscriber gets a clone).
    pub reason: Arc<str>,
}

/// A handle to the task engine.
#[derive(Clone)]
pub struct TaskEngine {
    inner: Arc<Inner>,
}

struct Inner {
    store: TaskStore,
    config: TaskConfig,
    /// Wakes this process's idle workers when it submits, naming the queue
    /// (a watch channel: a wake-up is never lost between a worker's empty
    /// lease and its wait).
    submitted: watch::Sender<Option<QueueName>>,
    /// Cancels asked for through this process, for its running handlers.
    cancels: tokio::sync::broadcast::Sender<CancelAsked>,
    /// The lease secrets' signer, read from the store once (a failed read
    /// is tried again by the next caller) and re-checked by
    /// [`TaskEngine::refresh_signer`].
    signer: SignerCell,
    /// This process's figures per queue, for `/metrics`.
    counters: TaskCounters,
    /// What this process knows of the limits (see `flow`).
    flow: flow::FlowState,
    /// Each queue's group commit of attempt ends (see `batch`).
    batchers: batch::Batchers,
    /// Idle built-in slots a submit may hand its task to (see `handoff`).
    board: handoff::Board,
    /// The rests identical stream workers share (see `crate::tasks::poller`).
    rests: crate::tasks::poller::SharedRests,
    /// Tasks whose leases koo's stop left in place for re-attaching
    /// workers: the embedded store's save at shutdown keeps them running
    /// rather than handing them back. A std Mutex: held only to insert or
    /// copy, never across an await.
    kept_leases: std::sync::Mutex<std::collections::HashSet<TaskId>>,
}

impl TaskEngine {
    /// An engine over `store`.
    pub fn new(store: TaskStore, config: TaskConfig) -> Self {
        let limits = &config.limits;
        store.wait_claims_for(limits.submit_wait_replicas, limits.submit_wait_timeout);
        Self {
            inner: Arc::new(Inner {
                store,
                submitted: watch::Sender::new(None),
                cancels: tokio::sync::broadcast::Sender::new(256),
                signer: SignerCell::default(),
                counters: TaskCounters::new(&config.queues()),
                flow: flow::FlowState::default(),
                batchers: batch::Batchers::default(),
                board: handoff::Board::default(),
                rests: Default::default(),
                kept_leases: Default::default(),
                config,
            }),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &TaskConfig {
        &self.inner.config
    }

    /// Records tasks whose leases koo's stop leaves in place (their
    /// workers re-attach them to the next koo).
    pub fn keep_leases<'a>(&self, ids: impl IntoIterator<Item = &'a TaskId>) {
        let mut kept = self.inner.kept_leases.lock().expect("not poisoned");
        kept.extend(ids.into_iter().cloned());
    }

    /// The tasks [`Self::keep_leases`] recorded.
    pub fn kept_leases(&self) -> std::collections::HashSet<TaskId> {
        self.inner.kept_leases.lock().expect("not poisoned").clone()
    }

    /// This process's own task figures.
    pub fn counters(&self) -> &TaskCounters {
        &self.inner.counters
    }

    /// Where tasks are kept.
    pub fn store(&self) -> &TaskStore {
        &self.inner.store
    }

    /// Reads a task.
    pub async fn get(&self, id: &str, deadline: Deadline) -> Result<Task, TaskError> {
        let id = TaskId::parse(id).map_err(|e| TaskError::invalid("task_id", e.to_string()))?;
        self.inner
            .store
            .get(&id, deadline)
            .await?
            .ok_or(TaskError::NotFound(id))
    }

    /// A subscription to cancels asked for through this process, so that a
    /// running handler here is told at once.
    pub fn cancels(&self) -> tokio::sync::broadcast::Receiver<CancelAsked> {
        self.inner.cancels.subscribe()
    }

    /// Depths and counters of `queues`.
    pub async fn queue_stats(
        &self,
        queues: &[QueueName],
        deadline: Deadline,
    ) -> Result<Vec<(QueueName, QueueStats)>, TaskError> {
        let stats = queues.iter().map(|q| async move {
            self.inner
                .store
                .queue_stats(q, deadline)
                .await
                .map(|s| (q.clone(), s))
        });
        Ok(futures::future::try_join_all(stats).await?)
    }

    /// Pings the task store and returns the round trip.
    pub async fn ping(&self, deadline: Deadline) -> Result<Duration, TaskError> {
        Ok(self.inner.store.ping(deadline).await?)
    }

    /// A worker's subscription to this process's submits.
    pub fn submits(&self) -> watch::Receiver<Option<QueueName>> {
        self.inner.submitted.subscribe()
    }

    /// The rests shared by this process's stream workers that serve
    /// `names` of `queues` (see `crate::tasks::poller`).
    pub fn shared_rests(
        &self,
        queues: &[QueueName],
        names: &[String],
    ) -> std::sync::Arc<crate::tasks::poller::Rests> {
        self.inner.rests.of(queues, names)
    }
}
