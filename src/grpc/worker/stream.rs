//! One `WorkerService.Work` stream: the hello, then a [`Session`] spawned on
//! the server's session tracker, its messages out as the response stream
//! and, when it ends on a protocol error, that error as the stream's status.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, Streaming};

use super::messages::{MAX_BATCH, inbound, outbound_each};
use super::{WorkStream, WorkerApi, declared};
use crate::auth::revocable::RECHECK_EVERY;
use crate::auth::scope;
use crate::auth::{Caller, Recheck};
use crate::grpc::status::{self, work};
use crate::pb::worker::v1 as pb;
use crate::pb::worker::v1::work_request::Message as In;
use crate::pb::worker::v1::work_response::Message as Out;
use crate::tasks::engine::TaskError;
use crate::tasks::remote::{self, Inbound, Outbound, Routing, Session};
use prost::Message as _;

/// Outbound messages buffered per stream before koo waits for the worker.
const STREAM_BUFFER: usize = 64;

/// Where a stream's input keeps the status of a message koo could not
/// read, for the stream's end. A std Mutex: held only to swap a value,
/// never across an await.
type Unread = Arc<Mutex<Option<Status>>>;

impl WorkerApi {
    /// Opens a Work stream: reads the hello, starts the worker's session.
    pub(super) async fn open_work(
        &self,
        request: Request<Streaming<pb::WorkRequest>>,
    ) -> Result<WorkStream, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let tally = self.tally(&request);
        let caller = Caller::of(request.extensions());
        let recheck = request.extensions().get::<Recheck>().cloned();
        let mut messages = request.into_inner();
        let hello = read_hello(&mut messages, self.request_timeout).await?;
        if self.shutdown.is_cancelled() {
            // a worker that reconnected to a koo on its way out goes on to
            // the next one (or this one, restarted)
            return Err(work::stopping());
        }
        let known = self.engine.config().queues();
        let declared = scope::narrow(&caller, "hello.", declared(hello.queues, hello.task_names))?;
        let routing = Routing::new(&declared.task_names, &declared.queues, &known)
            .map_err(|e| status::task_error_in("hello.", e))?;
        let concurrency = u32::try_from(hello.concurrency).unwrap_or(0);
        let mut session = Session::new(
            self.engine.clone(),
            Some(self.cache.clone()),
            &hello.name,
            routing,
            concurrency,
            peer,
            tally,
        )?;
        if hello.reattach {
            session.reattaching(self.shutdown.clone());
        }
        session.adopt(claims(hello.held)).await?;
        let welcome = welcome(
            session.id(),
            self.engine.config().lease,
            self.max_message_size,
            session.adopted_leases(),
        );
        tracing::info!(worker = session.id(), "external worker connected");
        Ok(self.serve(session, messages, welcome, hello.accept_batches, recheck))
    }

    /// Runs `session` over `messages`; the response stream: `welcome`, the
    /// session's messages, then its protocol error if it ended on one.
    fn serve(
        &self,
        session: Session,
        messages: Streaming<pb::WorkRequest>,
        welcome: pb::WorkResponse,
        batches: bool,
        recheck: Option<Recheck>,
    ) -> WorkStream {
        let (tx, rx) = mpsc::channel::<Outbound>(STREAM_BUFFER);
        let (errors_tx, errors_rx) = oneshot::channel::<Status>();
        let id = session.id().to_owned();
        let unread = Unread::default();
        let input = input(messages, unread.clone(), id.clone());
        // this session's own stop: koo's, or its key revoked
        let stop = self.shutdown.child_token();
        let revoked = recheck.map(|r| self.sessions.spawn(revocation(r, stop.clone(), id.clone())));
        self.sessions.spawn(async move {
            let ended = session.run(Box::pin(input), tx, stop.clone()).await;
            stop.cancel();
            let revoked = match revoked {
                Some(watch) => watch.await.ok().flatten(),
                None => None,
            };
            match (ended, revoked) {
                (_, Some(status)) => {
                    let _ = errors_tx.send(status);
                }
                (Ok(Some(kept)), None) => {
                    let _ = errors_tx.send(work::leases_kept(kept));
                }
                (Ok(None), None) => tracing::info!(worker = %id, "external worker disconnected"),
                (Err(e), None) => {
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
        let messages = if batches {
            batched(rx).map(Ok).boxed()
        } else {
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .flat_map(|m| futures::stream::iter(outbound_each(m).map(Ok)))
                .boxed()
        };
        let tail = futures::stream::once(async move { errors_rx.await.ok() })
            .filter_map(|e| std::future::ready(e.map(Err)));
        Box::pin(
            futures::stream::once(std::future::ready(Ok(welcome)))
                .chain(messages)
                .chain(tail),
        )
    }
}

/// Checks `recheck` every [`RECHECK_EVERY`] until `stop`; when the keys file
/// no longer admits the stream (its key removed), stops its session (its
/// tasks go back, their attempts given back, as at koo's shutdown) and
/// gives the refusal the stream ends with.
async fn revocation(recheck: Recheck, stop: CancellationToken, id: String) -> Option<Status> {
    let mut every = tokio::time::interval(RECHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = every.tick() => {}
        }
        if let Err(e) = recheck.still_admitted() {
            let status = Status::from(e);
            tracing::warn!(worker = %id, reason = status.message(), "external worker's credentials no longer admitted: its stream ends");
            stop.cancel();
            return Some(status);
        }
    }
}

/// Bytes of messages koo gathers into one batch: the message that would
/// pass the bound goes into the next one (alone if it is larger), so that
/// a batch stays far below a worker's receive limit (gRPC's default is
/// 4 MiB) whatever the tasks' sizes.
const BATCH_BYTES: usize = 256 * 1024;

/// A session's messages for a worker that accepts batches: the messages
/// ready at once (those the session made together, and any others already
/// waiting) go out as one `batch` of at most [`MAX_BATCH`] messages and
/// about [`BATCH_BYTES`]; a message alone goes out as itself. Nothing waits
/// for a batch to fill.
fn batched(rx: mpsc::Receiver<Outbound>) -> impl Stream<Item = pb::WorkResponse> + Send {
    let pending: VecDeque<pb::WorkResponse> = VecDeque::new();
    futures::stream::unfold((rx, pending), |(mut rx, mut pending)| async move {
        if pending.is_empty() {
            pending.extend(outbound_each(rx.recv().await?));
        }
        while pending.len() < MAX_BATCH {
            let Ok(m) = rx.try_recv() else { break };
            pending.extend(outbound_each(m));
        }
        let first = pending.pop_front().expect("not empty");
        let mut bytes = first.encoded_len();
        let alone = nests_deep(&first);
        let mut batch = vec![first];
        while let Some(next) = pending.front()
            && batch.len() < MAX_BATCH
            && !alone
            && !nests_deep(next)
        {
            bytes += next.encoded_len();
            if bytes > BATCH_BYTES {
                break;
            }
            batch.extend(pending.pop_front());
        }
        let message = if batch.len() == 1 {
            batch.pop().expect("one")
        } else {
            pb::WorkResponse {
                message: Some(Out::Batch(pb::WorkResponseBatch { responses: batch })),
            }
        };
        Some((message, (rx, pending)))
    })
}

/// Whether a message must go alone: a task whose last error kept details
/// (a JSON object up to 32 levels deep) sits one protobuf level deeper
/// than any other JSON koo sends, and the two levels a batch adds would
/// take it past protobuf's decoding limit of 100 nested messages.
fn nests_deep(m: &pb::WorkResponse) -> bool {
    matches!(&m.message, Some(Out::Task(t))
        if t.task.as_ref().and_then(|t| t.error.as_ref()).is_some_and(|e| e.details.is_some()))
}

/// The stream's hello: it comes first, and a worker that sends nothing
/// within `timeout` (the request timeout) is turned away.
async fn read_hello(
    messages: &mut Streaming<pb::WorkRequest>,
    timeout: Duration,
) -> Result<pb::Hello, Status> {
    let first = tokio::time::timeout(timeout, messages.next())
        .await
        .map_err(|_| work::no_hello(timeout))?;
    match first {
        Some(Ok(pb::WorkRequest {
            message: Some(In::Hello(h)),
        })) => Ok(h),
        Some(Ok(_)) => Err(work::hello_not_first()),
        Some(Err(e)) => Err(e),
        None => Err(work::closed_before_hello()),
    }
}

/// The first message koo sends: the worker's id, its lease terms, and
/// the leases it re-attached (under their new tokens).
fn welcome(
    worker_id: &str,
    lease: Duration,
    max_message_size: usize,
    adopted: &[remote::Claim],
) -> pb::WorkResponse {
    pb::WorkResponse {
        message: Some(Out::Welcome(pb::Welcome {
            worker_id: worker_id.to_owned(),
            lease: prost_types::Duration::try_from(lease).ok(),
            heartbeat_interval: prost_types::Duration::try_from(remote::heartbeat_interval(lease))
                .ok(),
            accepts_batches: true,
            accepts_release: true,
            accepts_started: true,
            max_message_size: i32::try_from(max_message_size).unwrap_or(i32::MAX),
            time: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            adopts_held: true,
            adopted: adopted
                .iter()
                .map(|c| pb::HeldTask {
                    task_id: c.id.clone(),
                    lease_token: c.token,
                    lease_secret: c.secret.clone(),
                    not_started: false,
                })
                .collect(),
        })),
    }
}

/// The hello's `held`, in the domain's terms.
fn claims(held: Vec<pb::HeldTask>) -> Vec<remote::Claim> {
    held.into_iter()
        .map(|h| remote::Claim {
            id: h.task_id,
            token: h.lease_token,
            secret: h.lease_secret,
            not_started: h.not_started,
        })
        .collect()
}

/// The session's input: the stream's messages until a read error. A read
/// error ends the input; one that is a message koo could not read is also
/// kept in `unread`, as the stream's final status.
fn input(
    messages: Streaming<pb::WorkRequest>,
    unread: Unread,
    id: String,
) -> impl Stream<Item = Inbound> + Send {
    messages
        .map(move |m| match m {
            Ok(m) => Some(inbound(m)),
            Err(status) if work::unreadable(&status) => {
                let reason = work::head_and_tail(status.message(), work::MAX_QUOTE);
                *unread.lock().expect("not poisoned") = Some(work::unreadable_status(&status));
                Some(Inbound::Invalid(TaskError::invalid("message", reason)))
            }
            Err(status) => {
                tracing::info!(worker = %id, code = ?status.code(), reason = status.message(), "external worker's connection broke");
                None
            }
        })
        .take_while(|m| std::future::ready(m.is_some()))
        .map(|m| m.expect("taken while some"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::{State, Task};
    use crate::tasks::remote::ReplyKind;

    fn task(error: Option<&str>) -> Outbound {
        let task = Task {
            error: error.map(str::to_owned),
            ..Task::sample(2, 2)
        };
        Outbound::Task {
            task: Box::new(task),
            secret: String::new(),
        }
    }

    fn reply() -> Outbound {
        Outbound::Reply {
            id: "t".into(),
            kind: ReplyKind::Complete,
            outcome: Ok(Some(State::Succeeded)),
        }
    }

    /// How many messages each batch `batched` sends holds (1: alone).
    async fn shapes(sent: Vec<Outbound>) -> Vec<usize> {
        let (tx, rx) = mpsc::channel(8);
        for m in sent {
            tx.send(m).await.unwrap();
        }
        drop(tx);
        batched(rx)
            .map(|m| match m.message {
                Some(Out::Batch(b)) => b.responses.len(),
                _ => 1,
            })
            .collect()
            .await
    }

    /// Messages ready together go out as one batch; a task whose last error
    /// kept details goes alone, before and after it the others batch.
    #[tokio::test]
    async fn a_task_with_error_details_is_never_batched() {
        let details = r#"{"message":"x","retryable":true,"details":{"a":1}}"#;
        let plain = r#"{"message":"x","retryable":true}"#;
        let together = vec![reply(), task(None), reply(), task(Some(plain))];
        assert_eq!(shapes(together).await, [4]);
        let split = vec![reply(), task(Some(details)), reply(), task(None)];
        assert_eq!(shapes(split).await, [1, 1, 2]);
        let batch = Outbound::Batch(vec![reply(), reply(), task(Some(details))]);
        assert_eq!(shapes(vec![batch]).await, [2, 1]);
    }
}
