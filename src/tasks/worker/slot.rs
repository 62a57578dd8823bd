//! One built-in worker slot: leases through the [`Poller`], runs the task,
//! reports it, and, when every other queue rests, takes the next task of
//! the same queue with the report.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::execute::{Ended, execute};
use super::registry::Registry;
use super::report::{cache_result, outcome_not_recorded, report, report_and_lease};
use crate::domain::task::{QueueName, Task};
use crate::store::Deadline;
use crate::tasks::engine::{CancelAsked, Handed, TaskEngine};
use crate::tasks::poller::{Poller, Rests};

/// How long each lease or hand-back call of a slot may take.
const CALL: Duration = Duration::from_secs(5);

/// What a lease round found. (Returned once per round and never kept:
/// boxing the task would cost an allocation per lease.)
#[allow(clippy::large_enum_variant)]
enum Round {
    /// A task to run.
    Leased(Task),
    /// Nothing (or the store failed and the slot has waited a moment):
    /// wait for work.
    Nothing,
    /// The slot is stopping.
    Stopped,
}

/// A slot's state between tasks.
pub(super) struct Slot {
    pub(super) engine: TaskEngine,
    pub(super) registry: Arc<Registry>,
    /// This slot's worker id (the pool's id and the slot number).
    pub(super) worker: String,
    /// Tasks running in the pool, for its presence record.
    pub(super) running: Arc<AtomicU32>,
    pub(super) poller: Poller,
    /// Cancels asked for through this process: one subscription per slot,
    /// not one per task (messages about other tasks are skipped).
    pub(super) cancels: tokio::sync::broadcast::Receiver<CancelAsked>,
}

impl Slot {
    /// A slot of `engine` serving `queues` with `registry`; slots start at
    /// different queues (`slot`) and rotate, so that no queue starves, and
    /// share their rests with the pool's other slots (`rests`).
    pub(super) fn new(
        engine: TaskEngine,
        registry: Arc<Registry>,
        queues: Vec<QueueName>,
        worker: String,
        (slot, running, rests): (usize, Arc<AtomicU32>, Arc<Rests>),
    ) -> Self {
        let poll = engine.config().poll_interval;
        let poller = Poller::pooled(queues, poll, slot, engine.submits(), rests);
        let cancels = engine.cancels();
        Self {
            engine,
            registry,
            worker,
            running,
            poller,
            cancels,
        }
    }

    /// Runs tasks until `stop`; a task leased by the last report is handed
    /// back at once.
    pub(super) async fn run(mut self, stop: CancellationToken) {
        let served: Arc<[String]> = self.registry.names().into();
        let names: Vec<&str> = served.iter().map(String::as_str).collect();
        // A task leased by the call that reported the previous one.
        let mut carried: Option<Task> = None;
        while !stop.is_cancelled() {
            self.poller.take_submits();
            let round = match carried.take() {
                Some(task) => {
                    // a carried task uses up the round (and its hint)
                    self.poller.order();
                    Round::Leased(task)
                }
                None => self.lease_round(&names, &stop).await,
            };
            match round {
                Round::Leased(task) => carried = self.run_task(task, &names, &stop).await,
                Round::Nothing => {
                    // until the first resting queue is worth a look, unless
                    // a submit comes or hands this slot a task
                    let mut idle =
                        self.engine
                            .wait_idle(self.poller.queues(), &self.worker, served.clone());
                    let handed = tokio::select! {
                        // (what a submit handed meanwhile is released below)
                        _ = stop.cancelled() => None,
                        () = self.poller.idle() => None,
                        handed = idle.handed() => Some(handed),
                    };
                    let handed = match handed {
                        Some(handed) => handed,
                        None => idle.leave().await,
                    };
                    carried = handed.and_then(|h| self.took_handed(h));
                }
                Round::Stopped => return,
            }
        }
        if let Some(task) = carried
            && let Err(e) = self
                .engine
                .release(&task, &self.worker, Deadline::after(CALL))
                .await
        {
            outcome_not_recorded(&task, e);
        }
    }

    /// Asks the queues in the poller's order for a task, skipping resting
    /// ones. A store failure waits a second (or until the store answers
    /// again) before the slot waits for work.
    async fn lease_round(&mut self, names: &[&str], stop: &CancellationToken) -> Round {
        let told = self.poller.take_told();
        for (q, hinted) in self.poller.order() {
            if stop.is_cancelled() {
                break;
            }
            // (a look of its own, not a submit's hint nor a told look: one
            // slot of the pool at a time; see the poller's module doc)
            if !hinted && (self.poller.is_resting(q) || !self.poller.claim(q)) {
                continue;
            }
            let queue = &self.poller.queues()[q];
            match self
                .engine
                .lease_or_hold(queue, &self.worker, names, Deadline::after(CALL))
                .await
            {
                Ok(leased) => {
                    let failed = LEASE.succeeded(queue.as_str());
                    if failed > 0 {
                        tracing::info!(%queue, failed, "leasing works again");
                    }
                    if let Some(task) = self.poller.took(q, leased) {
                        if !hinted || told {
                            self.poller.found(q);
                        }
                        self.poller.leased(q, hinted);
                        return Round::Leased(task);
                    }
                }
                Err(e) => {
                    crate::repeats::warn_once_per_run!(LEASE, queue.as_str(), queue = %queue, error = %e, "cannot lease; retrying in a second (repeats are logged at debug until it works again)");
                    // or as soon as the store answers again after an outage
                    tokio::select! {
                        _ = stop.cancelled() => return Round::Stopped,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.engine.store().recovered() => {}
                    }
                    break;
                }
            }
        }
        Round::Nothing
    }

    /// What a submit's lease found for this slot, taken as its own lease
    /// of the queue would be; a wake's look turns the slot to its queue.
    fn took_handed(&mut self, handed: Handed) -> Option<Task> {
        let (queue, leased) = match handed {
            Handed::Leased { queue, leased } => (queue, leased),
            Handed::Look(queue) => {
                if let Some(q) = self.poller.position(&queue) {
                    self.poller.look_at(q);
                }
                return None;
            }
        };
        let Some(q) = self.poller.position(&queue) else {
            return leased.task();
        };
        let task = self.poller.took(q, leased)?;
        self.poller.leased(q, true);
        Some(task)
    }

    /// Runs a leased task and reports how it ended; the next task of its
    /// queue when the report took one.
    async fn run_task(
        &mut self,
        task: Task,
        names: &[&str],
        stop: &CancellationToken,
    ) -> Option<Task> {
        let engine = &self.engine;
        self.running.fetch_add(1, Ordering::Relaxed);
        let ended = execute(engine, &self.registry, &task, &mut self.cancels, stop).await;
        self.running.fetch_sub(1, Ordering::Relaxed);
        let finish = match ended {
            Ended::Finished(finish) => {
                cache_result(self.registry.cache.as_ref(), &task, finish).await
            }
            Ended::Lost => return None,
            Ended::HandBack => {
                match engine
                    .release(&task, &self.worker, Deadline::after(CALL))
                    .await
                {
                    Ok(()) => {
                        tracing::info!(task = %task.id, "stopping: task handed back to its queue")
                    }
                    Err(e) => outcome_not_recorded(&task, e),
                }
                return None;
            }
        };
        // When every other queue was just found empty and no local submit
        // names one, this slot would come back to this queue anyway: report
        // and take its next task in one call.
        let q = self.poller.position(&task.id.queue());
        let chain = q.is_some_and(|q| self.poller.others_resting(q))
            && !self.poller.submitted_since()
            && !stop.is_cancelled();
        if !chain {
            report(engine, &task, &self.worker, finish).await;
            return None;
        }
        let next = report_and_lease(engine, &task, &self.worker, finish, names).await;
        match q {
            Some(q) => self.poller.took(q, next),
            None => next.task(),
        }
    }
}

/// The slots' run of lease failures (see [`crate::repeats`]): one warning
/// for an outage, not one per slot per second.
static LEASE: crate::repeats::Repeats = crate::repeats::Repeats::new();
