//! Hand-off: a task submitted through this process goes straight to one of
//! its idle workers (a built-in slot, a stream worker's session, a waiting
//! unary `LeaseTask`: all wait on the same board).
//!
//! Without it a lone task costs four trips to Redis in a row (the submit,
//! the woken slot's lease, the finish, the event's read), and every idle
//! slot of the queue is woken to race for it, each with a lease call of
//! its own. A slot that finds its queues empty puts itself on the board
//! ([`TaskEngine::wait_idle`]); a submit due now that finds a slot there
//! serving the task's name claims it and makes the submit and that slot's
//! lease in one round trip
//! ([`crate::store::tasks::TaskBackend::submit_and_lease`]), then gives
//! the slot what the lease found. The other idle slots are not woken when
//! the lease took the new task (nothing new waits); when it took an older
//! one, or nothing, one of each kind is told to look
//! ([`TaskEngine::made_ready`]), as for any task made ready without a
//! hand-off and for a wake from another process.
//!
//! The lease is the ordinary one, with all its rules (pause, limits, the
//! queue's order, the names the slot serves), made for the slot's worker
//! id: the store sees no difference from the slot's own call.
//!
//! Nothing is lost on the way. The store call runs on a task of its own,
//! so that a caller that stops waiting (a cancelled RPC) does not strand a
//! task leased for the slot; a task whose slot is gone (stopped, or it
//! left the board in the same instant) is handed back to its queue at once;
//! a failed submit gives back whatever its lease took.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::TaskEngine;
use crate::domain::task::{QueueName, Task, TaskId};
use crate::store::tasks::{LeaseAsk, Leased};
use crate::store::{Deadline, StoreError};
use crate::tasks::error::TaskError;

/// What a claimed slot is given.
#[derive(Debug)]
pub enum Handed {
    /// A submit of this process leased for the slot in its own round
    /// trip: the submit's queue and what the lease found there.
    Leased {
        /// The submit's queue.
        queue: QueueName,
        /// The lease's answer.
        leased: Leased,
    },
    /// A task of this queue became ready outside a hand-off (a wake from
    /// another process, see `wakes.rs`, or a submit, retry or hand-back of
    /// this one, see [`TaskEngine::made_ready`]): the slot looks at the
    /// queue now. One waiter of each kind is told, not all of them: the
    /// others would each make a lease call for the one task.
    Look(QueueName),
}

impl Handed {
    /// The task a submit leased for the slot, if any.
    pub fn task(self) -> Option<Task> {
        self.into_leased().and_then(Leased::task)
    }

    /// The lease's answer, if a submit leased for the slot.
    fn into_leased(self) -> Option<Leased> {
        match self {
            Self::Leased { leased, .. } => Some(leased),
            Self::Look(_) => None,
        }
    }
}

/// An idle slot on the board.
struct Waiter {
    worker: String,
    /// The task names it serves (`*`: any).
    names: Arc<[String]>,
    /// Taken by the submit that claims the slot, or by the slot leaving.
    give: Mutex<Option<oneshot::Sender<Handed>>>,
}

impl Waiter {
    fn serves(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == "*" || n == name)
    }

    fn take(&self) -> Option<oneshot::Sender<Handed>> {
        self.give.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The idle slots of this process, by queue.
pub(super) struct Board {
    queues: Mutex<HashMap<QueueName, Vec<Arc<Waiter>>>>,
    /// Told of every slot that comes or goes, for
    /// [`TaskEngine::until_idle_slots`].
    pub(super) changed: watch::Sender<()>,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            queues: Mutex::default(),
            changed: watch::Sender::new(()),
        }
    }
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<QueueName, Vec<Arc<Waiter>>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently idle slot of `queue` that serves `name`, claimed.
    /// A slot serving several queues waits in each one's list: one claimed
    /// through another queue is dropped from this list on the way.
    fn claim(&self, queue: &QueueName, name: &str) -> Option<Claim> {
        let mut queues = self.lock();
        let waiters = queues.get_mut(queue)?;
        loop {
            let at = waiters.iter().rposition(|w| w.serves(name))?;
            let waiter = waiters.remove(at);
            if let Some(give) = waiter.take() {
                return Some(Claim {
                    queue: queue.clone(),
                    worker: waiter.worker.clone(),
                    names: waiter.names.clone(),
                    give,
                });
            }
        }
    }

    /// Tells one idle waiter of each kind (the same task names served:
    /// a pool's slots, identical stream workers) on `queue`'s board that
    /// serves `name` (`None`: any waiter) to look at it, each claimed as a
    /// submit claims one; how many were told.
    fn nudge(&self, queue: &QueueName, name: Option<&str>) -> usize {
        let mut told: Vec<Arc<[String]>> = Vec::new();
        let mut queues = self.lock();
        let Some(waiters) = queues.get_mut(queue) else {
            return 0;
        };
        // the most recently idle of each kind, as a claim takes; one that
        // left in this instant is passed over for the next of its kind
        let mut at = waiters.len();
        while at > 0 {
            at -= 1;
            let serves = name.is_none_or(|n| waiters[at].serves(n));
            if !serves || told.iter().any(|k| *k == waiters[at].names) {
                continue;
            }
            let waiter = waiters.remove(at);
            let sent = waiter
                .take()
                .is_some_and(|give| give.send(Handed::Look(queue.clone())).is_ok());
            if sent {
                told.push(waiter.names.clone());
            }
        }
        told.len()
    }

    /// Whether no slot waits on any queue (a burst skips its claims).
    fn is_empty(&self) -> bool {
        self.lock().values().all(Vec::is_empty)
    }

    /// Takes `waiter` off the board.
    fn remove(&self, queues: &[QueueName], waiter: &Arc<Waiter>) {
        let mut board = self.lock();
        for q in queues {
            if let Some(waiters) = board.get_mut(q) {
                waiters.retain(|w| !Arc::ptr_eq(w, waiter));
            }
        }
        drop(board);
        self.changed.send_replace(());
    }
}

/// A slot claimed by a submit.
pub(super) struct Claim {
    /// The queue the claim was made for.
    queue: QueueName,
    worker: String,
    names: Arc<[String]>,
    give: oneshot::Sender<Handed>,
}

/// A slot's place on the board while it waits for work.
pub struct IdleSlot {
    engine: TaskEngine,
    queues: Vec<QueueName>,
    waiter: Arc<Waiter>,
    handed: oneshot::Receiver<Handed>,
    on_board: bool,
}

impl IdleSlot {
    /// What a submit handed this slot; `None` when the submit that
    /// claimed it failed before its lease answered (the slot looks for
    /// itself). Cancel-safe: pending until a submit claims the slot.
    pub async fn handed(&mut self) -> Option<Handed> {
        (&mut self.handed).await.ok()
    }

    /// Leaves the board: `None` when no submit claimed the slot; else
    /// what the claiming submit hands it (waited for: it is on its way).
    pub async fn leave(mut self) -> Option<Handed> {
        self.off_board();
        match self.waiter.take() {
            Some(_) => None,
            None => (&mut self.handed).await.ok(),
        }
    }

    /// Stops taking hand-offs while staying on the board, as a slot that
    /// stops in the instant a submit claims it does (for tests: a submit
    /// that claims it then finds nobody to give the task to).
    #[doc(hidden)]
    pub fn close(&mut self) {
        self.handed.close();
    }

    fn off_board(&mut self) {
        if std::mem::take(&mut self.on_board) {
            self.engine.inner.board.remove(&self.queues, &self.waiter);
        }
    }
}

impl Drop for IdleSlot {
    fn drop(&mut self) {
        // a slot that stops while on the board: a submit that claims it
        // now finds its receiver gone and hands the task back
        self.off_board();
        // One already claimed may have been given its task in the instant
        // its holder stopped (a stream that closed, koo stopping, a session
        // whose future was dropped): closed first, so that a give still on
        // its way fails and the submit hands back; what arrived before goes
        // back from here, not at its lease's lapse.
        self.handed.close();
        let leased = match self.handed.try_recv() {
            Ok(Handed::Leased {
                leased: leased @ Leased::Task(_),
                ..
            }) => leased,
            // told to look and gone before it did: another is told
            Ok(Handed::Look(queue)) => return self.engine.made_ready(queue, None),
            _ => return,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "a task handed to a slot that stopped outside the runtime; its lease lapses"
            );
            return;
        };
        let engine = self.engine.clone();
        let worker = self.waiter.worker.clone();
        runtime.spawn(async move {
            let deadline = Deadline::after(HAND_BACK);
            engine
                .hand_back(Some(leased), Some(&worker), deadline)
                .await;
        });
    }
}

/// How long the hand-back of a task given to a slot that stopped may take.
const HAND_BACK: Duration = Duration::from_secs(5);

impl TaskEngine {
    /// Puts a built-in slot (`worker`, serving `names` of `queues`) on the
    /// board of idle slots, until [`IdleSlot::leave`] or a submit claims it.
    pub fn wait_idle(&self, queues: &[QueueName], worker: &str, names: Arc<[String]>) -> IdleSlot {
        let (give, handed) = oneshot::channel();
        let waiter = Arc::new(Waiter {
            worker: worker.to_owned(),
            names,
            give: Mutex::new(Some(give)),
        });
        let mut board = self.inner.board.lock();
        for q in queues {
            board.entry(q.clone()).or_default().push(waiter.clone());
        }
        drop(board);
        self.inner.board.changed.send_replace(());
        IdleSlot {
            engine: self.clone(),
            queues: queues.to_vec(),
            waiter,
            handed,
            on_board: true,
        }
    }

    /// An idle slot of this process that serves `task`, claimed; `None`
    /// when none waits or when the submit must be the plain one (with
    /// `KOO_TASK_SUBMIT_WAIT_REPLICAS`, whose `WAIT` the pipeline lacks).
    pub(super) fn claim_slot(&self, task: &Task) -> Option<Claim> {
        if !self.hands_off() {
            return None;
        }
        self.inner.board.claim(&task.id.queue(), &task.name)
    }

    /// Whether submits may hand tasks off: not with
    /// `KOO_TASK_SUBMIT_WAIT_REPLICAS`, whose `WAIT` must follow the
    /// submit alone.
    fn hands_off(&self) -> bool {
        self.inner.config.limits.submit_wait_replicas == 0
    }

    /// A task of `queue` (named `name`, when known) became ready outside
    /// a hand-off (a submit no idle slot took, a retry, a hand-back, a
    /// released dependent; or a wake: another process made one ready): one
    /// idle worker of each kind on the board that serves the name looks at
    /// it now ([`Handed::Look`]: every idle worker looking would cost a
    /// lease call each for the one task; a batch tells one per task). With
    /// none idle, the busy ones look there first when they next look.
    pub(super) fn made_ready(&self, queue: QueueName, name: Option<&str>) {
        if self.inner.board.nudge(&queue, name) == 0 {
            self.inner.submitted.send_replace(Some(queue));
        }
    }

    /// The task names the idle workers waiting on `queue`'s board serve
    /// (`*`: any), each once; none when no worker waits there.
    pub(super) fn idle_names(&self, queue: &QueueName) -> Vec<String> {
        let board = self.inner.board.lock();
        let mut names: Vec<String> = Vec::new();
        let live = board
            .get(queue)
            .into_iter()
            .flatten()
            .filter(|w| w.give.lock().is_ok_and(|g| g.is_some()));
        for waiter in live {
            for n in waiter.names.iter() {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
    }

    /// How many slots of this process wait on the board for a task of
    /// `queue`.
    pub fn idle_slots(&self, queue: &QueueName) -> usize {
        let board = self.inner.board.lock();
        board.get(queue).map_or(0, |waiters| {
            let live = |w: &&Arc<Waiter>| w.give.lock().is_ok_and(|g| g.is_some());
            waiters.iter().filter(live).count()
        })
    }

    /// Waits until `n` slots of this process wait on the board for a task
    /// of `queue` (for tests and tools: an event, not a poll).
    pub async fn until_idle_slots(&self, queue: &QueueName, n: usize) {
        let mut changed = self.inner.board.changed.subscribe();
        while self.idle_slots(queue) != n {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stores `task` (due now) and leases for the `claim`ed slot in the
    /// same round trip. Dependents, counters and the wake-up of other
    /// workers are the caller's, as after a plain submit: `true` in the
    /// answer when they should be woken (the lease did not take the new
    /// task).
    pub(super) async fn submit_handing(
        &self,
        task: Task,
        claim: Claim,
        deadline: Deadline,
    ) -> Result<(Task, bool), TaskError> {
        // on a task of its own: a caller that stops waiting must not strand
        // a task leased for the slot
        let engine = self.clone();
        let call = tokio::spawn(async move {
            let answer = engine.hand_over(&task, claim, deadline).await;
            answer.map(|wake| (task, wake))
        });
        call.await.unwrap_or_else(|e| {
            Err(TaskError::Store(StoreError::Unavailable(format!(
                "the submit stopped before it answered (it may or may not have been stored): {e}"
            ))))
        })
    }

    /// The store call of [`Self::submit_handing`] and the hand-over.
    async fn hand_over(
        &self,
        task: &Task,
        claim: Claim,
        deadline: Deadline,
    ) -> Result<bool, TaskError> {
        let c = &self.inner.config;
        let names: Vec<&str> = claim.names.iter().map(String::as_str).collect();
        let ask = LeaseAsk {
            worker: &claim.worker,
            lease: c.lease,
            names: &names,
        };
        let (submitted, leased) = self
            .inner
            .store
            .submit_and_lease(task, c.limits, &ask, self.lease_limits(), deadline)
            .await;
        if let Err(e) = submitted {
            // the slot looks for itself; a task its lease took goes back
            let worker = Some(claim.worker.as_str());
            self.hand_back(leased, worker, deadline).await;
            return Err(e.into());
        }
        let took = self.deliver(claim, task.id.queue(), leased, deadline).await;
        Ok(took.as_ref() != Some(&task.id))
    }

    /// Gives `claim`'s slot what its lease found (`None`: the lease did
    /// not run; the slot, let go, looks for itself), or hands the task
    /// back when the slot is gone. The id of the task it took, if any.
    async fn deliver(
        &self,
        claim: Claim,
        queue: QueueName,
        leased: Option<Leased>,
        deadline: Deadline,
    ) -> Option<TaskId> {
        let leased = leased?;
        let counters = &self.inner.counters;
        let id = match &leased {
            Leased::Task(t) => {
                counters.leased(t); // its wait, as any lease's
                Some(t.id.clone())
            }
            _ => None,
        };
        match claim.give.send(Handed::Leased { queue, leased }) {
            Ok(()) => {
                if let Some(id) = &id {
                    counters.handed(&id.queue());
                }
                id
            }
            Err(handed) => {
                // the slot left in the same instant, or stopped
                let worker = Some(claim.worker.as_str());
                self.hand_back(handed.into_leased(), worker, deadline).await;
                None
            }
        }
    }

    /// Idle slots of this process for the tasks of `batch` due now, at
    /// most one per task (none with `KOO_TASK_SUBMIT_WAIT_REPLICAS`).
    pub(super) fn claim_slots(&self, batch: &[(Task, Duration)]) -> Vec<Claim> {
        let mut claims = Vec::new();
        let board = &self.inner.board;
        if !self.hands_off() || board.is_empty() {
            return claims;
        }
        // a queue and name that found no slot find none for the rest
        let mut dry: Vec<(QueueName, &str)> = Vec::new();
        for (task, delay) in batch {
            let queue = task.id.queue();
            if !delay.is_zero() || dry.iter().any(|(q, n)| *q == queue && *n == task.name) {
                continue;
            }
            match board.claim(&queue, &task.name) {
                Some(claim) => claims.push(claim),
                None => dry.push((queue, &task.name)),
            }
        }
        claims
    }

    /// Stores `batch` and leases for each of `claims` (its queue's next
    /// task) in the same round trip, on a task of its own (see
    /// [`Self::submit_handing`]): the batch back, each task's outcome, and
    /// the ids of the batch's tasks the leases took (their queues need not
    /// be woken for them).
    pub(super) async fn submit_many_handing(
        &self,
        batch: Vec<(Task, Duration)>,
        claims: Vec<Claim>,
        deadline: Deadline,
    ) -> Result<
        (
            Vec<(Task, Duration)>,
            Vec<Result<(), TaskError>>,
            Vec<TaskId>,
        ),
        TaskError,
    > {
        let engine = self.clone();
        let call = tokio::spawn(async move {
            let c = &engine.inner.config;
            let names: Vec<Vec<&str>> = claims
                .iter()
                .map(|cl| cl.names.iter().map(String::as_str).collect())
                .collect();
            let asks: Vec<(QueueName, LeaseAsk<'_>)> = claims
                .iter()
                .zip(&names)
                .map(|(cl, names)| {
                    let ask = LeaseAsk {
                        worker: &cl.worker,
                        lease: c.lease,
                        names,
                    };
                    (cl.queue.clone(), ask)
                })
                .collect();
            let (stored, leased) = engine
                .inner
                .store
                .submit_many_and_lease(&batch, c.limits, &asks, engine.lease_limits(), deadline)
                .await;
            drop(asks);
            let mut took = Vec::new();
            for (claim, leased) in claims.into_iter().zip(leased) {
                let queue = claim.queue.clone();
                match &stored {
                    Ok(_) => took.extend(engine.deliver(claim, queue, leased, deadline).await),
                    Err(_) => {
                        let worker = Some(claim.worker.as_str());
                        engine.hand_back(leased, worker, deadline).await;
                    }
                }
            }
            let stored = stored.map_err(TaskError::from)?;
            let stored = stored
                .into_iter()
                .map(|r| r.map_err(TaskError::from))
                .collect();
            Ok((batch, stored, took))
        });
        call.await.unwrap_or_else(|e| {
            Err(TaskError::Store(StoreError::Unavailable(format!(
                "the submit stopped before it answered (some tasks may have been stored): {e}"
            ))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::Category;
    use crate::store::tasks::TaskStore;
    use crate::tasks::engine::TaskConfig;

    fn names(of: &[&str]) -> Arc<[String]> {
        of.iter().map(|n| (*n).to_owned()).collect()
    }

    /// A task made ready tells the most recently idle waiter of each kind
    /// (the same names served) to look, and no other.
    #[tokio::test]
    async fn made_ready_tells_one_waiter_of_each_kind() {
        let engine = TaskEngine::new(TaskStore::memory(), TaskConfig::default());
        let q = Category::Research.default_queue();
        let queues = [q.clone()];
        let mut pool: Vec<IdleSlot> = (0..3)
            .map(|i| engine.wait_idle(&queues, &format!("slot-{i}"), names(&["*"])))
            .collect();
        let mut stream = engine.wait_idle(&queues, "stream", names(&["pdf.render"]));
        assert_eq!(engine.idle_slots(&q), 4);
        engine.made_ready(q.clone(), None);
        assert_eq!(engine.idle_slots(&q), 2, "one slot and the stream told");
        let told = pool.pop().unwrap().handed().await;
        assert!(
            matches!(told, Some(Handed::Look(ref at)) if *at == q),
            "{told:?}"
        );
        assert!(matches!(stream.handed().await, Some(Handed::Look(_))));
        // the others stay on the board, untold
        for slot in pool {
            assert!(slot.leave().await.is_none());
        }
        // a name: only the waiters that serve it
        let a = engine.wait_idle(&queues, "slot-a", names(&["a"]));
        let mut b = engine.wait_idle(&queues, "slot-b", names(&["b"]));
        engine.made_ready(q.clone(), Some("b"));
        assert!(matches!(b.handed().await, Some(Handed::Look(_))));
        assert_eq!(engine.idle_names(&q), vec!["a".to_owned()]);
        assert!(a.leave().await.is_none());
        // none idle: nobody told, the busy ones hear of the queue
        let mut submits = engine.submits();
        engine.made_ready(q.clone(), None);
        assert!(submits.has_changed().unwrap());
        assert_eq!(*submits.borrow_and_update(), Some(q));
    }
}
