//! The built-in worker pool: leases tasks, runs their handlers under soft and
//! hard time limits, heartbeats while they run, and reports how they ended.
//!
//! Each handler runs in a task of its own, so that the slot can abandon it:
//! at the soft limit the handler's cancellation token fires; at the hard
//! limit the task is aborted (a handler busy on `spawn_blocking` keeps its
//! thread, but the slot moves on and the task ends TIMED_OUT). If a heartbeat
//! is refused, the lease is someone else's: the handler is aborted and
//! nothing is reported, since the new holder owns the outcome.
//!
//! Rooms: [`registry`] (handlers and what they get), `slot` (one slot's
//! loop over the shared [`crate::tasks::poller::Poller`]), `execute` (one
//! run under its limits), `report` (how an attempt's end is recorded).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::domain::task::QueueName;
use crate::store::Deadline;
use crate::store::tasks::WorkerRecord;
use crate::tasks::engine::TaskEngine;

mod execute;
pub mod registry;
mod report;
mod slot;

pub use self::registry::{Handler, HandlerError, HandlerFuture, Registry, TaskContext};
pub(crate) use self::report::cache_result;

/// A pool of worker slots.
pub struct WorkerPool {
    engine: TaskEngine,
    registry: Arc<Registry>,
    queues: Vec<QueueName>,
    concurrency: usize,
    id: String,
}

impl WorkerPool {
    /// `concurrency` slots serving `queues` with `registry`'s handlers.
    pub fn new(
        engine: TaskEngine,
        registry: Registry,
        queues: Vec<QueueName>,
        concurrency: usize,
    ) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "koo".to_owned());
        Self {
            engine,
            registry: Arc::new(registry),
            queues,
            concurrency: concurrency.max(1),
            id: format!(
                "{host}:{}:{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }

    /// This pool's worker id (slots append their number).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs every slot until `stop`; a slot lets its current task finish
    /// within the shutdown grace, or hands it back to its queue at once.
    pub async fn run(self, stop: CancellationToken) {
        let running = Arc::new(AtomicU32::new(0));
        // one look per queue per poll interval for the whole pool
        let rests = crate::tasks::poller::Rests::new(self.queues.len());
        let mut slots = tokio::task::JoinSet::new();
        for slot in 0..self.concurrency {
            let worker = format!("{}/{slot}", self.id);
            let engine = self.engine.clone();
            let registry = self.registry.clone();
            let queues = self.queues.clone();
            let stop = stop.clone();
            let running = running.clone();
            let shared = (slot, running, rests.clone());
            let slot = slot::Slot::new(engine, registry, queues, worker, shared);
            slots.spawn(slot.run(stop));
        }
        let presence = tokio::spawn(self.announce(running, stop.clone()));
        while slots.join_next().await.is_some() {}
        let _ = presence.await;
        let deadline = Deadline::after(Duration::from_secs(2));
        if let Err(e) = self.engine.store().retire_worker(&self.id, deadline).await {
            tracing::debug!(error = %e, "cannot remove this worker's presence record; it expires");
        }
    }

    /// Says this pool is alive every third of a lease (the record lives a
    /// lease), so that health checks see live workers and lose dead ones
    /// within a lease.
    fn announce(
        &self,
        running: Arc<AtomicU32>,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let engine = self.engine.clone();
        let lease = engine.config().lease;
        let mut record = WorkerRecord {
            id: self.id.clone(),
            slots: self.concurrency as u32,
            running: 0,
            queues: self.queues.iter().map(|q| q.to_string()).collect(),
            names: self.registry.names(),
            started_ms: crate::store::unix_millis(std::time::SystemTime::now()),
            seen_ms: 0,
            kind: "builtin".to_owned(),
            name: String::new(),
            held: Vec::new(),
            peer: String::new(),
        };
        async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                record.running = running.load(Ordering::Relaxed);
                record.seen_ms = crate::store::unix_millis(std::time::SystemTime::now());
                let deadline = Deadline::after(lease / 3);
                if let Err(e) = engine
                    .store()
                    .announce_worker(&record, lease, deadline)
                    .await
                {
                    tracing::debug!(error = %e, "cannot announce this worker");
                }
            }
        }
    }
}
