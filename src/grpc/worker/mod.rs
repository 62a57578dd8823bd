//! `koo.worker.v1.WorkerService`: converts the worker protocol's messages
//! to and from the domain calls of [`crate::tasks::remote`]. (Who may call
//! is decided by `crate::auth`; a worker key's scope is checked here, where
//! the declaration is read.)

mod holds;
mod messages;
mod stream;

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use self::holds::sweep_holds;
use self::messages::{retry_delay, state, struct_json, timestamp, value_json};
use super::deadline;
use super::tasks::{timestamp as ms_timestamp, to_pb_task};
use crate::auth::Caller;
use crate::auth::scope::{self, Declared};
use crate::cache::Cache;
use crate::domain::task::TaskId;
use crate::pb::worker::v1 as pb;
use crate::store::Deadline;
use crate::store::tasks::WorkerRecord;
use crate::tasks::engine::TaskEngine;
use crate::tasks::metrics::WorkerKind;
use crate::tasks::remote::holds::Holds;
use crate::tasks::remote::{self, Failure, Progress, Proof, Routing};

/// Default and largest ListWorkers pages.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The WorkerService implementation.
pub struct WorkerApi {
    engine: TaskEngine,
    cache: Cache,
    request_timeout: Duration,
    shutdown: CancellationToken,
    /// The sessions' tasks, which koo waits for when it stops.
    sessions: tokio_util::task::TaskTracker,
    /// What each worker holds in this process.
    holds: Holds,
    /// The largest message koo reads (told to stream workers, who size
    /// their batches under it).
    max_message_size: usize,
}

impl WorkerApi {
    /// Serves `engine`'s tasks to external workers; streams end on
    /// `shutdown`, and their sessions run on `sessions` (so that the server
    /// can wait for them to hand their tasks back). Results that ask to be
    /// cached go to `cache`.
    pub fn new(
        engine: TaskEngine,
        cache: Cache,
        request_timeout: Duration,
        shutdown: CancellationToken,
        sessions: tokio_util::task::TaskTracker,
    ) -> Self {
        let holds = Holds::new(crate::tasks::remote::holds::DEFAULT_MAX_HELD);
        // unary leases nobody ended go back when they would have lapsed
        let every = (engine.config().lease / 4).max(Duration::from_millis(10));
        tokio::spawn(sweep_holds(holds.clone(), every, shutdown.clone()));
        // every process converges on the key stored in a shared store
        tokio::spawn(remote::keep_lease_key(engine.clone(), shutdown.clone()));
        Self {
            engine,
            cache,
            request_timeout,
            shutdown,
            sessions,
            holds,
            max_message_size: 4 * 1024 * 1024,
        }
    }

    /// The largest message koo reads from a worker (`KOO_MAX_MESSAGE_SIZE`;
    /// the service's decoding limit must be the same), told in the welcome.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Bounds what one worker may hold at once in this process
    /// (`KOO_MAX_HELD_PER_WORKER`; a key's `max_held` overrides it).
    pub fn max_held_per_worker(self, bound: u32) -> Self {
        self.holds.set_default_bound(bound);
        self
    }

    /// A worker key bound to some queues or task names reports only on
    /// tasks within them, as it leases only those: under
    /// `KOO_LEASE_SECRETS=optional` a guessed token would otherwise let a
    /// PDF worker's key end an AI task. (A malformed id is left to the
    /// call, which refuses it.)
    async fn within_scope(
        &self,
        caller: &Caller,
        id: &str,
        deadline: Deadline,
    ) -> Result<(), Status> {
        if !caller.is_scoped() {
            return Ok(());
        }
        let Ok(task_id) = crate::domain::task::TaskId::parse(id) else {
            return Ok(());
        };
        let name = if caller.scope.task_names.is_empty() {
            None
        } else {
            Some(
                self.engine
                    .get(id, deadline)
                    .await
                    .map_err(Status::from)?
                    .name,
            )
        };
        let queue = task_id.queue();
        scope::task_within(caller, "task_id", queue.as_str(), name.as_deref()).map_err(Status::from)
    }

    fn deadline<T>(&self, r: &Request<T>) -> Deadline {
        deadline::from_metadata(r.metadata(), self.request_timeout)
    }
}

/// A worker's declaration, for its key's scope.
fn declared(queues: Vec<String>, task_names: Vec<String>) -> Declared {
    Declared { queues, task_names }
}

type WorkStream = Pin<Box<dyn Stream<Item = Result<pb::WorkResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerApi {
    type WorkStream = WorkStream;

    async fn work(
        &self,
        request: Request<Streaming<pb::WorkRequest>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        Ok(Response::new(self.open_work(request).await?))
    }

    async fn lease_task(
        &self,
        request: Request<pb::LeaseTaskRequest>,
    ) -> Result<Response<pb::LeaseTaskResponse>, Status> {
        let deadline = self.deadline(&request);
        let taken = self.take_room(&request)?;
        let caller = Caller::of(request.extensions());
        let r = request.into_inner();
        let declared = scope::narrow(&caller, "", declared(r.queues, r.task_names))?;
        let routing = Routing::new(
            &declared.task_names,
            &declared.queues,
            &self.engine.config().queues(),
        )?;
        let wait =
            super::time::duration("wait", r.wait, super::time::LEASE_WAIT)?.unwrap_or_default();
        // read before the lease, so that a leased task always gets its secret
        let signer = self.engine.signer(deadline).await?;
        let task = remote::lease_once(&self.engine, &r.worker_name, &routing, wait, &self.shutdown)
            .await?;
        let lease = self.engine.config().lease;
        let Some(task) = task else {
            return Ok(Response::new(pb::LeaseTaskResponse::default()));
        };
        let lease_secret = signer.of_lease(&task);
        let until = tokio::time::Instant::now() + lease;
        self.holds
            .hold_unary(task.id.clone(), task.token, taken, until);
        Ok(Response::new(pb::LeaseTaskResponse {
            lease_token: task.token,
            lease_expire_time: Some(timestamp(SystemTime::now() + lease)),
            task: Some(to_pb_task(task)),
            lease_secret,
        }))
    }

    async fn heartbeat_task(
        &self,
        request: Request<pb::HeartbeatTaskRequest>,
    ) -> Result<Response<pb::HeartbeatTaskResponse>, Status> {
        let deadline = self.deadline(&request);
        let caller = Caller::of(request.extensions());
        let r = request.into_inner();
        self.within_scope(&caller, &r.task_id, deadline).await?;
        let proof = Proof::given(&r.lease_secret);
        let beat =
            remote::heartbeat(&self.engine, &r.task_id, r.lease_token, proof, deadline).await?;
        if let Ok(id) = TaskId::parse(&r.task_id) {
            let until = tokio::time::Instant::now() + self.engine.config().lease;
            self.holds.extend_unary(&id, r.lease_token, until);
        }
        Ok(Response::new(pb::HeartbeatTaskResponse {
            cancel_requested: beat.cancel_requested,
            soft_time_limit_exceeded: beat.soft_limit_exceeded,
            lease_expire_time: Some(timestamp(beat.lease_until)),
            cancel_reason: beat.cancel_reason,
        }))
    }

    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let deadline = self.deadline(&request);
        let caller = Caller::of(request.extensions());
        let r = request.into_inner();
        self.within_scope(&caller, &r.task_id, deadline).await?;
        let progress = Progress {
            percent: r.percent,
            message: r.message,
            metadata: struct_json("metadata", r.metadata)?,
        };
        let proof = Proof::given(&r.lease_secret);
        remote::progress_task(
            &self.engine,
            &r.task_id,
            r.lease_token,
            &progress,
            proof,
            deadline,
        )
        .await?;
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let deadline = self.deadline(&request);
        let caller = Caller::of(request.extensions());
        let r = request.into_inner();
        self.within_scope(&caller, &r.task_id, deadline).await?;
        let result = value_json("result", r.result)?;
        let s = remote::complete(
            &self.engine,
            Some(&self.cache),
            &r.task_id,
            r.lease_token,
            result,
            Proof::given(&r.lease_secret),
            deadline,
        )
        .await;
        self.ended(&r.task_id, r.lease_token, &s);
        Ok(Response::new(pb::CompleteTaskResponse { state: state(s?) }))
    }

    async fn fail_task(
        &self,
        request: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        let deadline = self.deadline(&request);
        let caller = Caller::of(request.extensions());
        let r = request.into_inner();
        self.within_scope(&caller, &r.task_id, deadline).await?;
        let details = match r.details {
            Some(d) => Some(struct_json("details", Some(d))?),
            None => None,
        };
        let failure = Failure {
            message: r.message,
            retryable: r.retryable,
            details,
            retry_delay: r.retry_delay.map(retry_delay),
            key_retry_after: r.key_retry_after.map(retry_delay),
        };
        let proof = Proof::given(&r.lease_secret);
        let s = remote::fail(
            &self.engine,
            &r.task_id,
            r.lease_token,
            failure,
            proof,
            deadline,
        )
        .await;
        self.ended(&r.task_id, r.lease_token, &s);
        Ok(Response::new(pb::FailTaskResponse { state: state(s?) }))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let deadline = self.deadline(&request);
        let caller = Caller::of(request.extensions());
        let r = request.into_inner();
        let size = super::page_size(r.page_size, DEFAULT_PAGE, MAX_PAGE)?;
        let mut records = self
            .engine
            .store()
            .list_workers(deadline)
            .await
            .map_err(Status::from)?;
        records.sort_by(|a, b| a.id.cmp(&b.id));
        // the token names the last id of the previous page
        let after = super::page_after("ListWorkers", &r.page_token)?;
        let start = if after.is_empty() {
            0
        } else {
            records.partition_point(|w| w.id.as_str() <= after)
        };
        let page: Vec<_> = records.iter().skip(start).take(size).cloned().collect();
        let next_page_token = if start + page.len() < records.len() {
            page.last()
                .map(|w| super::page_token(&w.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let workers = page
            .into_iter()
            .map(|w| scoped_view(&caller, w))
            .map(|w| pb::Worker {
                kind: match WorkerKind::parse(&w.kind) {
                    WorkerKind::Stream => pb::WorkerKind::Stream,
                    WorkerKind::Unary => pb::WorkerKind::Unary,
                    WorkerKind::Builtin => pb::WorkerKind::Builtin,
                } as i32,
                id: w.id,
                name: w.name,
                task_names: w.names,
                queues: w.queues,
                concurrency: w.slots as i32,
                running: w.running as i32,
                task_ids: w.held,
                peer: w.peer,
                start_time: ms_timestamp(Some(w.started_ms).filter(|ms| *ms > 0)),
                last_seen_time: ms_timestamp(Some(w.seen_ms).filter(|ms| *ms > 0)),
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse {
            workers,
            next_page_token,
        }))
    }
}

/// What a worker key bound to some queues or names sees of a worker: the
/// tasks it holds in those queues only (none when the key is bound by task
/// name: an id does not say its name), and no network address. Other
/// callers see it whole.
fn scoped_view(caller: &Caller, mut w: WorkerRecord) -> WorkerRecord {
    if caller.is_scoped() {
        w.held.retain(|id| {
            caller.scope.task_names.is_empty()
                && crate::domain::task::TaskId::parse(id)
                    .is_ok_and(|t| caller.scope.queues.iter().any(|q| q == t.queue().as_str()))
        });
        w.peer.clear();
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Role, Scope};

    fn worker_key(queues: &[&str], task_names: &[&str]) -> Caller {
        Caller {
            principal: "w".into(),
            role: Some(Role::Worker),
            scope: Scope {
                queues: queues.iter().map(|q| q.to_string()).collect(),
                task_names: task_names.iter().map(|n| n.to_string()).collect(),
            },
            max_held: None,
        }
    }

    /// A scoped worker key sees the held tasks of its queues only (none
    /// when scoped by name) and no addresses; others see the record whole.
    #[test]
    fn scoped_keys_see_their_own_queues_of_a_worker() {
        let ai = "ai_service~01a24685096e70e4a7c999d21f9a08ae".to_owned();
        let pdf = "pdf_processing~01a24685096e70e4a7c999d21f9a08af".to_owned();
        let record = WorkerRecord {
            held: vec![ai.clone(), pdf.clone()],
            peer: "10.0.0.7:41234".into(),
            ..Default::default()
        };
        let seen = scoped_view(&worker_key(&["pdf_processing"], &[]), record.clone());
        assert_eq!((seen.held, seen.peer.as_str()), (vec![pdf.clone()], ""));
        let seen = scoped_view(&worker_key(&[], &["pdf.render"]), record.clone());
        assert!(seen.held.is_empty() && seen.peer.is_empty());
        let whole = scoped_view(&worker_key(&[], &[]), record.clone());
        assert_eq!(whole.held, vec![ai, pdf]);
        assert_eq!(
            scoped_view(&Caller::anonymous(), record).peer,
            "10.0.0.7:41234"
        );
    }
}
