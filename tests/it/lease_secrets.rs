//! Leases that cannot be forged, and workers that cannot take everything
//! (issue 13), over real gRPC on both stores: a report must prove it comes
//! from the lease's holder (its stream, or the lease secret), and one
//! worker holds at most `KOO_MAX_HELD_PER_WORKER` tasks in a koo process.

use crate::common;

use std::time::Duration;

use common::tasks::*;
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1::{
    self as wpb, work_request::Message as In, work_response::Message as Out,
    worker_service_client::WorkerServiceClient,
};
use koo::tasks::remote::secret::LeasePolicy;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

on_both!(
    a_stranger_cannot_end_a_stream_workers_task,
    required_secrets_gate_unary_reports,
    optional_secrets_keep_old_unary_scripts_working,
    a_stream_needs_the_secret_for_a_task_it_does_not_hold,
    a_greedy_worker_holds_at_most_its_bound,
);

// the scenarios that apply on a Redis Cluster too
crate::on_cluster_too!(a_stranger_cannot_end_a_stream_workers_task,);

const NAME: &str = "koo.examples.job";

fn msg(m: In) -> wpb::WorkRequest {
    wpb::WorkRequest { message: Some(m) }
}

fn job() -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        name: NAME.into(),
        category: pb::TaskCategory::Research as i32,
        ..Default::default()
    }
}

/// A Work stream serving [`NAME`].
struct Stream {
    tx: mpsc::Sender<wpb::WorkRequest>,
    rx: tonic::Streaming<wpb::WorkResponse>,
}

impl Stream {
    async fn open(w: &mut WorkerServiceClient<Channel>, concurrency: i32) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tx.send(msg(In::Hello(wpb::Hello {
            name: "holder".into(),
            task_names: vec![NAME.into()],
            queues: vec![],
            concurrency,
            accept_batches: false,
            ..Default::default()
        })))
        .await
        .unwrap();
        let mut rx = w
            .work(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        match rx.message().await.unwrap().and_then(|m| m.message) {
            Some(Out::Welcome(_)) => {}
            other => panic!("expected welcome, got {other:?}"),
        }
        Self { tx, rx }
    }

    async fn next(&mut self) -> Out {
        match tokio::time::timeout(common::EVENT_TIMEOUT, self.rx.message()).await {
            Ok(Ok(Some(m))) => m.message.expect("a message"),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    async fn task(&mut self) -> wpb::TaskAssignment {
        match self.next().await {
            Out::Task(t) => t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    async fn reply(&mut self) -> wpb::Reply {
        match self.next().await {
            Out::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    async fn complete(&self, id: &str, token: u32, secret: &str, by: &str) {
        self.tx
            .send(msg(In::Complete(wpb::Complete {
                task_id: id.into(),
                lease_token: token,
                lease_secret: secret.into(),
                result: Some(koo_json(serde_json::json!({ "by": by }))),
            })))
            .await
            .unwrap();
    }
}

fn complete(id: &str, token: u32, secret: &str, by: &str) -> wpb::CompleteTaskRequest {
    wpb::CompleteTaskRequest {
        task_id: id.into(),
        lease_token: token,
        lease_secret: secret.into(),
        result: Some(koo_json(serde_json::json!({ "by": by }))),
    }
}

fn result_of(t: &pb::Task) -> String {
    koo::grpc::json::to_json(t.result.as_ref().expect("a result")).unwrap()
}

/// A fresh connection to the test server (a worker of its own when
/// unauthenticated: holdings are counted per connection).
async fn connection(koo: &Koo) -> WorkerServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", koo.server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    WorkerServiceClient::new(channel)
}

async fn lease_one(w: &mut WorkerServiceClient<Channel>) -> wpb::LeaseTaskResponse {
    w.lease_task(wpb::LeaseTaskRequest {
        worker_name: "script".into(),
        task_names: vec![NAME.into()],
        wait: Some(millis(5000)),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// The issue's scenario, under the default policy: a stream worker holds
/// a task; a stranger's unary CompleteTask with token 1 and no secret is
/// refused, and so is one with a wrong secret; the holder then completes
/// it and the result is the holder's. A unary caller cannot take the
/// shape of a stream worker's id.
async fn a_stranger_cannot_end_a_stream_workers_task(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = connection(&koo).await;
    let mut holder = Stream::open(&mut w, 1).await;
    let task = submit_ok(&mut c, job()).await;
    let assigned = holder.task().await;
    assert_eq!(assigned.lease_token, 1);
    assert_eq!(assigned.lease_secret.len(), 22, "{assigned:?}");

    let mut stranger = connection(&koo).await;
    let err = stranger
        .complete_task(complete(&task.id, 1, "", "stranger"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("lease_secret"), "{err:?}");
    let wrong = "AAAAAAAAAAAAAAAAAAAAAA";
    let err = stranger
        .complete_task(complete(&task.id, 1, wrong, "stranger"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not the secret"), "{err:?}");
    assert!(!err.message().contains(&assigned.lease_secret), "{err:?}");
    // nor may a unary caller pose as a stream worker
    let err = stranger
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "holder/0123456789ab".into(),
            task_names: vec![NAME.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("worker_name"), "{err:?}");

    holder.complete(&task.id, 1, "", "holder").await;
    let reply = holder.reply().await;
    assert_eq!(reply.code, 0, "{reply:?}");
    assert_eq!(reply.state, pb::TaskState::Succeeded as i32);
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(result_of(&t), r#"{"by":"holder"}"#);
}

/// Under `required`, a unary lease hands out a secret and every report
/// must quote it: without it progress and heartbeats are refused; with it
/// they, and the completion, work.
async fn required_secrets_gate_unary_reports(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| {
        s.tasks.config.lease_secrets = LeasePolicy::Required;
    })
    .await;
    let mut c = client(&koo.server);
    let mut w = connection(&koo).await;
    let task = submit_ok(&mut c, job()).await;
    let leased = lease_one(&mut w).await;
    assert_eq!(leased.task.as_ref().unwrap().id, task.id);
    let secret = leased.lease_secret.clone();
    assert_eq!(secret.len(), 22, "{leased:?}");
    let token = leased.lease_token;
    let progress = |secret: &str| wpb::ReportProgressRequest {
        task_id: task.id.clone(),
        lease_token: token,
        lease_secret: secret.into(),
        percent: 10.0,
        ..Default::default()
    };
    let beat = |secret: &str| wpb::HeartbeatTaskRequest {
        task_id: task.id.clone(),
        lease_token: token,
        lease_secret: secret.into(),
    };
    let err = w.report_progress(progress("")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("KOO_LEASE_SECRETS"), "{err:?}");
    let err = w.heartbeat_task(beat("")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = w
        .complete_task(complete(&task.id, token, "", "nobody"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    w.report_progress(progress(&secret)).await.unwrap();
    w.heartbeat_task(beat(&secret)).await.unwrap();
    let done = w
        .complete_task(complete(&task.id, token, &secret, "script"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(result_of(&t), r#"{"by":"script"}"#);
}

/// Under `optional` (the default without authentication), an old unary
/// script that knows nothing of secrets still reports on its own lease;
/// a secret it does send must be the right one.
async fn optional_secrets_keep_old_unary_scripts_working(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = connection(&koo).await;
    let task = submit_ok(&mut c, job()).await;
    let leased = lease_one(&mut w).await;
    let token = leased.lease_token;
    w.heartbeat_task(wpb::HeartbeatTaskRequest {
        task_id: task.id.clone(),
        lease_token: token,
        lease_secret: String::new(),
    })
    .await
    .unwrap();
    let err = w
        .complete_task(complete(&task.id, token, "AAAAAAAAAAAAAAAAAAAAAA", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let done = w
        .complete_task(complete(&task.id, token, "", "script"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
}

/// A stream's report on a task another stream holds is refused without
/// that lease's secret (it used to end the task by id and token alone),
/// and accepted with it.
async fn a_stream_needs_the_secret_for_a_task_it_does_not_hold(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = connection(&koo).await;
    let mut holder = Stream::open(&mut w, 1).await;
    let task = submit_ok(&mut c, job()).await;
    let assigned = holder.task().await;
    let mut other_conn = connection(&koo).await;
    let mut other = Stream::open(&mut other_conn, 1).await;
    let token = assigned.lease_token;
    other.complete(&task.id, token, "", "other").await;
    let reply = other.reply().await;
    assert_eq!(reply.code, Code::PermissionDenied as i32, "{reply:?}");
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(t.state, pb::TaskState::Running as i32);
    other
        .complete(&task.id, token, &assigned.lease_secret, "other")
        .await;
    let reply = other.reply().await;
    assert_eq!(reply.code, 0, "{reply:?}");
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(result_of(&t), r#"{"by":"other"}"#);
    drop(holder);
}

/// A greedy worker (20 streams of concurrency 100 over one connection)
/// holds at most the bound (50) of 300 queued tasks, while a second worker
/// on another connection gets tasks; when the greedy one completes one,
/// it gets another. A unary lease at the bound is RESOURCE_EXHAUSTED.
async fn a_greedy_worker_holds_at_most_its_bound(backend: Backend) {
    const BOUND: usize = 50;
    let koo = start_on_with(backend, 0, |s| {
        s.limits.max_held_per_worker = BOUND as u32;
        // no heartbeats needed while the test runs
        s.tasks.config.lease = Duration::from_secs(60);
    })
    .await;
    let mut c = client(&koo.server);
    for _ in 0..3 {
        let batch = pb::SubmitTasksRequest {
            tasks: (0..100).map(|_| job()).collect(),
        };
        c.submit_tasks(batch).await.unwrap();
    }
    let mut greedy = connection(&koo).await;
    let (got_tx, mut got) = mpsc::unbounded_channel();
    let mut senders = Vec::new();
    for i in 0..20 {
        let mut s = Stream::open(&mut greedy, 100).await;
        senders.push(s.tx.clone());
        let got_tx = got_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = s.rx.message().await {
                if let Some(Out::Task(t)) = m.message {
                    let _ = got_tx.send((i, t));
                }
            }
        });
    }
    let mut held = Vec::new();
    while held.len() < BOUND {
        let next = tokio::time::timeout(common::EVENT_TIMEOUT, got.recv()).await;
        held.push(next.expect("the greedy worker gets its bound").unwrap());
    }
    // another worker gets tasks while the greedy one holds its bound
    let mut polite_conn = connection(&koo).await;
    let mut polite = Stream::open(&mut polite_conn, 5).await;
    for _ in 0..5 {
        polite.task().await;
    }
    assert!(
        got.try_recv().is_err(),
        "the greedy worker got more than {BOUND}"
    );
    // its unary leases count too
    let err = greedy
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "greedy".into(),
            task_names: vec![NAME.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("KOO_MAX_HELD_PER_WORKER") && err.message().contains("50"),
        "{err:?}"
    );
    // a completion frees room: the greedy worker gets one more
    let (i, t) = held.pop().unwrap();
    senders[i]
        .send(msg(In::Complete(wpb::Complete {
            task_id: t.task.unwrap().id,
            lease_token: t.lease_token,
            lease_secret: String::new(),
            result: None,
        })))
        .await
        .unwrap();
    let more = tokio::time::timeout(common::EVENT_TIMEOUT, got.recv()).await;
    assert!(
        more.is_ok_and(|m| m.is_some()),
        "no task after a completion"
    );
}

/// Any koo process of a deployment checks a secret another handed out:
/// the key is created once in Redis (`SET NX`) and read by each process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_from_one_process_is_good_at_another() {
    let koo = start_on(Backend::Redis, 0).await;
    let other = spawn_on(koo.redis(), 0).await;
    let mut c = client(&koo.server);
    // the other process reads the key first: both must end up with one
    let mut w_other = WorkerServiceClient::new(other.channel.clone());
    let task = submit_ok(&mut c, job()).await;
    let leased = lease_one(&mut w_other).await;
    assert_eq!(leased.task.as_ref().unwrap().id, task.id);
    let mut w = connection(&koo).await;
    let done = w
        .complete_task(complete(
            &task.id,
            leased.lease_token,
            &leased.lease_secret,
            "a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
}

/// When the key in Redis changes under running processes (Redis lost its
/// data and another process stored a new key), every process adopts the
/// stored key within a lease, so a secret from a process started since is
/// good at one that was running before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_converge_on_the_stored_key() {
    let koo = start_on(Backend::Redis, 0).await;
    let mut c = client(&koo.server);
    let mut w = connection(&koo).await;
    // this process reads the key (K1)
    submit_ok(&mut c, job()).await;
    let first = lease_one(&mut w).await;
    w.complete_task(complete(
        &first.task.unwrap().id,
        first.lease_token,
        &first.lease_secret,
        "a",
    ))
    .await
    .unwrap();
    // another key is stored (K2), and a process started since reads it
    let mut conn = koo.redis().conn().await;
    let _: () = redis::cmd("SET")
        .arg("koo:v1:lease-key")
        .arg("b".repeat(64))
        .query_async(&mut conn)
        .await
        .unwrap();
    let later = spawn_on(koo.redis(), 0).await;
    let mut w_later = WorkerServiceClient::new(later.channel.clone());
    let task = submit_ok(&mut c, job()).await;
    let leased = lease_one(&mut w_later).await;
    let beat = |secret: &str| wpb::HeartbeatTaskRequest {
        task_id: task.id.clone(),
        lease_token: leased.lease_token,
        lease_secret: secret.into(),
    };
    // The first process re-checks the key once a lease (1 s here); it
    // exposes no event for it, so poll, keeping the lease alive meanwhile.
    let until = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    loop {
        match w.heartbeat_task(beat(&leased.lease_secret)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::PermissionDenied => {
                assert!(tokio::time::Instant::now() < until, "never adopted: {e:?}");
                w_later
                    .heartbeat_task(beat(&leased.lease_secret))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let done = w
        .complete_task(complete(
            &task.id,
            leased.lease_token,
            &leased.lease_secret,
            "b",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
}
