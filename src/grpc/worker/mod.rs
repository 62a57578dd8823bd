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
        let r = request.into_inner();
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
        let r = request.into_inner();
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
        let r = request.into_inner();
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
        let r = request.into_inner();
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
