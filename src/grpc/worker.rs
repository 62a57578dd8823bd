//! `koo.worker.v1.WorkerService`: converts the worker protocol's messages
//! to and from the domain calls of [`crate::tasks::remote`]. (Who may call
//! is decided by `crate::auth`; a worker key's scope is checked here, where
//! the declaration is read.)

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use prost_types::value::Kind;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::deadline;
use super::json;
use super::status::invalid_argument;
use super::tasks::{timestamp as ms_timestamp, to_pb_state, to_pb_task};
use crate::auth::Caller;
use crate::auth::scope::{self, Declared};
use crate::cache::Cache;
use crate::domain::task::State;
use crate::domain::task::TaskId;
use crate::pb::worker::v1 as pb;
use crate::pb::worker::v1::work_request::Message as In;
use crate::pb::worker::v1::work_response::Message as Out;
use crate::store::Deadline;
use crate::tasks::engine::{TaskEngine, TaskError};
use crate::tasks::metrics::WorkerKind;
use crate::tasks::remote::holds::{Holds, Taken, Tally};
use crate::tasks::remote::{self, Failure, Inbound, Outbound, Progress, Proof, ReplyKind, Routing};

/// Outbound messages buffered per stream before koo waits for the worker.
const STREAM_BUFFER: usize = 64;
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
        let holds = Holds::new(crate::config::Limits::default().max_held_per_worker);
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
        }
    }

    /// Bounds what one worker may hold at once in this process
    /// (`KOO_MAX_HELD_PER_WORKER`; a key's `max_held` overrides it).
    pub fn max_held_per_worker(self, bound: u32) -> Self {
        self.holds.set_default_bound(bound);
        self
    }

    /// The tally of the worker making `request`: its authenticated
    /// principal (all its streams and leases), else its connection.
    fn tally<T>(&self, request: &Request<T>) -> std::sync::Arc<Tally> {
        let (identity, bound) = holder(request.extensions(), request.remote_addr());
        self.holds.tally(&identity, bound)
    }

    /// Forgets the unary holding of a lease that a report ended (or found
    /// ended).
    fn ended<T>(&self, id: &str, token: u32, outcome: &Result<T, TaskError>) {
        if matches!(outcome, Ok(_) | Err(TaskError::Fenced(_)))
            && let Ok(id) = TaskId::parse(id)
        {
            self.holds.end_unary(&id, token);
        }
    }

    fn deadline<T>(&self, r: &Request<T>) -> Deadline {
        deadline::from_metadata(r.metadata(), self.request_timeout)
    }

    /// Room for one more task of the caller of a unary lease;
    /// RESOURCE_EXHAUSTED at its bound (after giving back lapsed leases).
    fn take_room<T>(&self, request: &Request<T>) -> Result<Taken, Status> {
        let tally = self.tally(request);
        let mut taken = Taken::none(tally.clone());
        if !taken.take_one() {
            self.holds.sweep(tokio::time::Instant::now());
            if !taken.take_one() {
                let (held, bound) = (tally.held(), tally.bound());
                return Err(TaskError::TooManyHeld { held, bound }.into());
            }
        }
        Ok(taken)
    }
}

/// Who a request's worker is, for the hold bound, and its own bound if its
/// key sets one: the authenticated principal (all its streams and leases),
/// else the connection (as the transport numbers it, else its address).
fn holder(
    extensions: &http::Extensions,
    addr: Option<std::net::SocketAddr>,
) -> (String, Option<u32>) {
    let caller = crate::auth::Caller::of(extensions);
    let identity = if caller.role.is_some() {
        format!("principal:{}", caller.principal)
    } else if let Some(peer) = extensions.get::<crate::transport::Peer>() {
        format!("connection:{}", peer.connection)
    } else if let Some(addr) = addr {
        format!("address:{addr}")
    } else {
        "unknown".to_owned()
    };
    (identity, caller.max_held)
}

/// Gives back, every `every`, the room of unary leases that lapsed.
async fn sweep_holds(holds: Holds, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => holds.sweep(tokio::time::Instant::now()),
        }
    }
}

/// A worker's declaration, for its key's scope.
fn declared(queues: Vec<String>, task_names: Vec<String>) -> Declared {
    Declared { queues, task_names }
}

fn state(s: State) -> i32 {
    to_pb_state(s) as i32
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// A protobuf Struct as a JSON object (`{}` when absent).
fn struct_json(field: &str, s: Option<prost_types::Struct>) -> Result<serde_json::Value, Status> {
    let value = prost_types::Value {
        kind: Some(Kind::StructValue(s.unwrap_or_default())),
    };
    json::to_serde(&value).map_err(|e| invalid_argument(field, &e))
}

/// A protobuf Value as JSON (`null` when absent).
fn value_json(field: &str, v: Option<prost_types::Value>) -> Result<serde_json::Value, Status> {
    match v {
        None | Some(prost_types::Value { kind: None }) => Ok(serde_json::Value::Null),
        Some(v) => json::to_serde(&v).map_err(|e| invalid_argument(field, &e)),
    }
}

/// Longest quote of a read error in the status that ends a stream.
const MAX_QUOTE: usize = 300;

/// Whether a read error of a Work stream is a message koo could not read
/// (over the size limit, not valid protobuf, nested too deep: tonic's
/// OUT_OF_RANGE, koo's codec's INVALID_ARGUMENT, a decompression
/// RESOURCE_EXHAUSTED) rather than a connection that broke. The worker was
/// talking, so the stream ends with that status, and its tasks count.
fn unreadable(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
    )
}

/// `text`, or its head and tail around an ellipsis when longer than
/// `max` bytes (a decode error ends with its reason, after a field path
/// that can be long).
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let floor = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let head = floor(max / 3);
    let mut tail = text.len() - (max - head);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}…{}", &text[..head], &text[tail..])
}

/// The status that ends a stream whose worker sent a message koo could
/// not read: the read error's code, and its reason quoted.
fn unreadable_status(status: &Status) -> Status {
    Status::new(
        status.code(),
        format!(
            "a message on this Work stream could not be read, so the stream ends (tasks it held go back to their queues): {}",
            bounded(status.message(), MAX_QUOTE)
        ),
    )
}

/// A protocol message as the session's input.
fn inbound(msg: pb::WorkRequest) -> Inbound {
    let bad = |e: Status| {
        Inbound::Invalid(TaskError::InvalidArgument {
            field: "message".to_owned(),
            reason: e.message().to_owned(),
        })
    };
    match msg.message {
        None => bad(Status::invalid_argument("a message with nothing set")),
        Some(In::Hello(_)) => bad(Status::invalid_argument(
            "hello may only be the stream's first message",
        )),
        Some(In::Heartbeat(_)) => Inbound::Heartbeat,
        Some(In::Progress(p)) => match struct_json("progress.metadata", p.metadata) {
            Ok(metadata) => Inbound::Progress {
                id: p.task_id,
                token: p.lease_token,
                secret: p.lease_secret,
                progress: Progress {
                    percent: p.percent,
                    message: p.message,
                    metadata,
                },
            },
            Err(e) => bad(e),
        },
        Some(In::Complete(c)) => match value_json("complete.result", c.result) {
            Ok(result) => Inbound::Complete {
                id: c.task_id,
                token: c.lease_token,
                secret: c.lease_secret,
                result,
            },
            Err(e) => bad(e),
        },
        Some(In::Fail(f)) => {
            let details = match f.details {
                Some(d) => match struct_json("fail.details", Some(d)) {
                    Ok(d) => Some(d),
                    Err(e) => return bad(e),
                },
                None => None,
            };
            Inbound::Fail {
                id: f.task_id,
                token: f.lease_token,
                secret: f.lease_secret,
                failure: Failure {
                    message: f.message,
                    retryable: f.retryable,
                    details,
                },
            }
        }
    }
}

/// A session's output as a protocol message.
fn outbound(msg: Outbound) -> pb::WorkResponse {
    let message = match msg {
        Outbound::Task { task, secret } => {
            let lease_token = task.token;
            Out::Task(pb::TaskAssignment {
                task: Some(to_pb_task(*task)),
                lease_token,
                lease_secret: secret,
            })
        }
        Outbound::Cancel { id, reason } => Out::Cancel(pb::CancelRequested {
            task_id: id.to_string(),
            reason,
        }),
        Outbound::SoftLimit(id) => Out::SoftTimeLimit(pb::SoftTimeLimitReached {
            task_id: id.to_string(),
        }),
        Outbound::Revoked { id, reason } => Out::Revoked(pb::LeaseRevoked {
            task_id: id.to_string(),
            reason,
        }),
        Outbound::Reply { id, kind, outcome } => {
            let kind = match kind {
                ReplyKind::Progress => pb::ReplyKind::Progress,
                ReplyKind::Complete => pb::ReplyKind::Complete,
                ReplyKind::Fail => pb::ReplyKind::Fail,
            } as i32;
            let reply = match outcome {
                Ok(s) => pb::Reply {
                    task_id: id,
                    kind,
                    code: 0,
                    message: String::new(),
                    state: s.map_or(0, state),
                },
                Err(e) => {
                    let status = Status::from(e);
                    pb::Reply {
                        task_id: id,
                        kind,
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                        state: 0,
                    }
                }
            };
            Out::Reply(reply)
        }
    };
    pb::WorkResponse {
        message: Some(message),
    }
}

type WorkStream = Pin<Box<dyn Stream<Item = Result<pb::WorkResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerApi {
    type WorkStream = WorkStream;

    async fn work(
        &self,
        request: Request<Streaming<pb::WorkRequest>>,
    ) -> Result<Response<Self::WorkStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let tally = self.tally(&request);
        let caller = Caller::of(request.extensions());
        let mut messages = request.into_inner();
        // The hello comes first; a worker that sends nothing within the
        // request timeout is turned away.
        let first = tokio::time::timeout(self.request_timeout, messages.next())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no hello within {}",
                    humantime::format_duration(self.request_timeout)
                ))
            })?;
        let hello = match first {
            Some(Ok(pb::WorkRequest {
                message: Some(In::Hello(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(invalid_argument(
                    "hello",
                    "the first message of a Work stream must be hello",
                ));
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(Status::cancelled(
                    "the worker closed the stream before hello",
                ));
            }
        };
        let known = self.engine.config().queues();
        let declared = scope::narrow(&caller, "hello.", declared(hello.queues, hello.task_names))?;
        let routing =
            Routing::new(&declared.task_names, &declared.queues, &known).map_err(|e| match e {
                TaskError::InvalidArgument { field, reason } => {
                    invalid_argument(&format!("hello.{field}"), &reason)
                }
                e => e.into(),
            })?;
        let concurrency = u32::try_from(hello.concurrency).unwrap_or(0);
        let session = remote::Session::new(
            self.engine.clone(),
            Some(self.cache.clone()),
            &hello.name,
            routing,
            concurrency,
            peer,
            tally,
        )?;
        let lease = self.engine.config().lease;
        let welcome = pb::WorkResponse {
            message: Some(Out::Welcome(pb::Welcome {
                worker_id: session.id().to_owned(),
                lease: prost_types::Duration::try_from(lease).ok(),
                heartbeat_interval: prost_types::Duration::try_from(remote::heartbeat_interval(
                    lease,
                ))
                .ok(),
            })),
        };
        tracing::info!(worker = session.id(), "external worker connected");
        let (tx, rx) = mpsc::channel::<Outbound>(STREAM_BUFFER);
        let (errors_tx, errors_rx) = tokio::sync::oneshot::channel::<Status>();
        let id = session.id().to_owned();
        // A read error ends the session's input; one that is a message koo
        // could not read is also the stream's final status.
        let unread = std::sync::Arc::new(std::sync::Mutex::new(None::<Status>));
        let input = {
            let (unread, id) = (unread.clone(), id.clone());
            messages
                .map(move |m| match m {
                    Ok(m) => Some(inbound(m)),
                    Err(status) if unreadable(&status) => {
                        let reason = bounded(status.message(), MAX_QUOTE);
                        // std Mutex: held only to swap a value, never across an await
                        *unread.lock().expect("not poisoned") = Some(unreadable_status(&status));
                        Some(Inbound::Invalid(TaskError::invalid("message", reason)))
                    }
                    Err(status) => {
                        tracing::info!(worker = %id, code = ?status.code(), reason = status.message(), "external worker's connection broke");
                        None
                    }
                })
                .take_while(|m| std::future::ready(m.is_some()))
                .map(|m| m.expect("taken while some"))
        };
        let stop = self.shutdown.clone();
        self.sessions.spawn(async move {
            let ended = session.run(Box::pin(input), tx, stop).await;
            match ended {
                Ok(()) => tracing::info!(worker = %id, "external worker disconnected"),
                Err(e) => {
                    let status = unread
                        .lock()
                        .expect("not poisoned")
                        .take()
                        .unwrap_or_else(|| e.into());
                    tracing::warn!(worker = %id, code = ?status.code(), reason = status.message(), "external worker's stream ended with an error");
                    let _ = errors_tx.send(status);
                }
            }
        });
        // The session's messages, then (when it ended on a protocol error)
        // that error as the stream's status.
        let messages = tokio_stream::wrappers::ReceiverStream::new(rx).map(|m| Ok(outbound(m)));
        let tail = futures::stream::once(async move { errors_rx.await.ok() })
            .filter_map(|e| std::future::ready(e.map(Err)));
        let stream = futures::stream::once(std::future::ready(Ok(welcome)))
            .chain(messages)
            .chain(tail);
        Ok(Response::new(Box::pin(stream)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker is its principal when authenticated (whatever its
    /// connection, with its key's bound), else its connection.
    #[test]
    fn holders() {
        use crate::auth::{Caller, Role};
        use crate::transport::Peer;
        let a: std::net::SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let b: std::net::SocketAddr = "10.0.0.1:4001".parse().unwrap();
        let mut open = http::Extensions::new();
        assert_eq!(
            holder(&open, Some(a)),
            ("address:10.0.0.1:4000".into(), None)
        );
        assert_ne!(holder(&open, Some(a)), holder(&open, Some(b)));
        open.insert(Peer {
            addr: Some(a),
            identity: None,
            connection: 7,
        });
        assert_eq!(holder(&open, Some(a)).0, "connection:7");
        let mut keyed = open.clone();
        keyed.insert(Caller {
            role: Some(Role::Worker),
            max_held: Some(3),
            ..Caller::anonymous()
        });
        let mut other_conn = http::Extensions::new();
        other_conn.insert(keyed.get::<Caller>().unwrap().clone());
        assert_eq!(
            holder(&keyed, Some(a)),
            ("principal:anonymous".into(), Some(3))
        );
        assert_eq!(holder(&keyed, Some(a)), holder(&other_conn, Some(b)));
    }

    /// A long read error is quoted by its head and its tail (where a
    /// decode error says why), within the bound, on character boundaries.
    #[test]
    fn quotes_are_bounded() {
        assert_eq!(bounded("short", 10), "short");
        let long = format!(
            "{}é{}recursion limit reached",
            "a".repeat(99),
            "b".repeat(500)
        );
        let q = bounded(&long, MAX_QUOTE);
        assert!(q.len() <= MAX_QUOTE + '…'.len_utf8() + 1, "{}", q.len());
        assert!(
            q.starts_with("aaa") && q.ends_with("recursion limit reached"),
            "{q}"
        );
        assert!(unreadable(&Status::out_of_range("too large")));
        assert!(!unreadable(&Status::unknown("h2 protocol error")));
        assert!(!unreadable(&Status::cancelled("gone")));
    }
}
