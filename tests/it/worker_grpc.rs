//! WorkerService end to end (issue 5): external workers over a real gRPC
//! channel, as a program in another language would talk to koo, on the
//! embedded store and on a real Redis. (The Python example worker's own
//! tests are in `worker_python.rs`.)

use crate::common;

use std::time::Duration;

use common::tasks::*;
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1::{
    self as wpb, work_request::Message as In, work_response::Message as Out,
    worker_service_client::WorkerServiceClient,
};
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

on_both!(
    unary_lease_progress_complete,
    unary_late_report_is_aborted,
    unary_refusals,
    stream_respects_concurrency_and_routing,
    stream_drop_requeues_and_counts_the_attempt,
    stream_cancel_reaches_the_worker,
    stream_cancel_grace_and_hard_limit_revoke,
    stream_silent_worker_loses_its_leases,
    stream_protocol_errors,
    fail_with_details_and_retry,
    workers_are_listed_and_counted,
);

fn workers(server: &common::TestServer) -> WorkerServiceClient<Channel> {
    WorkerServiceClient::new(server.channel.clone())
}

/// The task and worker clients of `koo`, and a task named `name` submitted
/// to `pdf_processing`.
async fn clients_and_task(
    koo: &Koo,
    name: &str,
) -> (
    koo::pb::tasks::v1::task_service_client::TaskServiceClient<Channel>,
    WorkerServiceClient<Channel>,
    pb::Task,
) {
    let mut c = client(&koo.server);
    let task = submit_ok(&mut c, task_named(name, pb::TaskCategory::PdfProcessing)).await;
    (c, workers(&koo.server), task)
}

fn task_named(name: &str, category: pb::TaskCategory) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        name: name.into(),
        category: category as i32,
        ..Default::default()
    }
}

/// A worker on a Work stream, driven by the test.
struct StreamWorker {
    tx: mpsc::Sender<wpb::WorkRequest>,
    rx: tonic::Streaming<wpb::WorkResponse>,
    id: String,
    heartbeat_interval: Duration,
}

impl StreamWorker {
    async fn connect(
        client: &mut WorkerServiceClient<Channel>,
        names: &[&str],
        queues: &[&str],
        concurrency: i32,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(msg(In::Hello(wpb::Hello {
            name: "test-worker".into(),
            task_names: names.iter().map(|s| s.to_string()).collect(),
            queues: queues.iter().map(|s| s.to_string()).collect(),
            concurrency,
            accept_batches: false,
            ..Default::default()
        })))
        .await
        .unwrap();
        let mut rx = client
            .work(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let welcome = match rx.message().await?.and_then(|m| m.message) {
            Some(Out::Welcome(w)) => w,
            other => panic!("expected welcome, got {other:?}"),
        };
        assert!(welcome.worker_id.starts_with("test-worker/"), "{welcome:?}");
        Ok(Self {
            tx,
            rx,
            id: welcome.worker_id,
            heartbeat_interval: Duration::try_from(welcome.heartbeat_interval.unwrap()).unwrap(),
        })
    }

    /// The next message from koo (the test fails after EVENT_TIMEOUT).
    async fn next(&mut self) -> Out {
        match tokio::time::timeout(common::EVENT_TIMEOUT, self.rx.message()).await {
            Err(_) => panic!("no message from koo"),
            Ok(Ok(Some(m))) => m.message.expect("a message"),
            Ok(other) => panic!("the stream ended: {other:?}"),
        }
    }

    /// The next message, or `None` if none comes within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<Out> {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Err(_) => None,
            Ok(Ok(Some(m))) => m.message,
            Ok(other) => panic!("the stream ended: {other:?}"),
        }
    }

    async fn next_task(&mut self) -> wpb::TaskAssignment {
        match self.next().await {
            Out::Task(t) => t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    async fn send(&self, m: In) {
        self.tx.send(msg(m)).await.unwrap();
    }

    async fn complete(&self, t: &wpb::TaskAssignment, result: serde_json::Value) {
        self.send(In::Complete(wpb::Complete {
            task_id: id(t),
            lease_token: t.lease_token,
            lease_secret: String::new(),
            result: Some(koo_json(result)),
        }))
        .await;
    }

    async fn fail(&self, t: &wpb::TaskAssignment, message: &str, retryable: bool) {
        self.send(In::Fail(wpb::Fail {
            task_id: id(t),
            lease_token: t.lease_token,
            lease_secret: String::new(),
            message: message.into(),
            retryable,
            details: None,
            retry_delay: None,
            key_retry_after: None,
        }))
        .await;
    }

    async fn reply(&mut self) -> wpb::Reply {
        match self.next().await {
            Out::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Heartbeats until told to stop, as a real worker does.
    fn keep_beating(&self) -> tokio::task::JoinHandle<()> {
        let tx = self.tx.clone();
        let every = self.heartbeat_interval;
        tokio::spawn(async move {
            loop {
                if tx
                    .send(msg(In::Heartbeat(wpb::Heartbeat {})))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

fn msg(m: In) -> wpb::WorkRequest {
    wpb::WorkRequest { message: Some(m) }
}

fn id(t: &wpb::TaskAssignment) -> String {
    t.task.as_ref().unwrap().id.clone()
}

/// The unary protocol: nothing to lease, then a task leased, progress seen
/// by WatchTask, a heartbeat, and a completion.
async fn unary_lease_progress_complete(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = workers(&koo.server);
    let none = w
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "script".into(),
            task_names: vec!["koo.examples.echo".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.task.is_none(), "{none:?}");
    let task = submit_ok(
        &mut c,
        task_named("koo.examples.echo", pb::TaskCategory::Research),
    )
    .await;
    let leased = w
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "script".into(),
            task_names: vec!["koo.examples.echo".into()],
            wait: Some(millis(5000)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let leased_task = leased.task.unwrap();
    assert_eq!(leased_task.id, task.id);
    assert_eq!(leased_task.attempts, 1);
    assert_eq!(leased_task.worker, "script");
    assert!(leased.lease_expire_time.is_some());
    let token = leased.lease_token;
    w.report_progress(wpb::ReportProgressRequest {
        task_id: task.id.clone(),
        lease_token: token,
        lease_secret: String::new(),
        percent: 40.0,
        message: "page 2 of 5".into(),
        metadata: None,
    })
    .await
    .unwrap();
    let seen = wait_task(&mut c, &task.id, |t| {
        t.progress.as_ref().is_some_and(|p| p.percent == 40.0)
    })
    .await;
    assert_eq!(seen.progress.unwrap().message, "page 2 of 5");
    let beat = w
        .heartbeat_task(wpb::HeartbeatTaskRequest {
            task_id: task.id.clone(),
            lease_token: token,
            lease_secret: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!beat.cancel_requested && !beat.soft_time_limit_exceeded);
    let done = w
        .complete_task(wpb::CompleteTaskRequest {
            task_id: task.id.clone(),
            lease_token: token,
            lease_secret: String::new(),
            result: Some(koo_json(serde_json::json!({"pages": 5}))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    assert_eq!(
        koo::grpc::json::to_json(t.result.as_ref().unwrap()).unwrap(),
        r#"{"pages":5.0}"#
    );
    // a second report on the ended attempt is refused
    let again = w
        .complete_task(wpb::CompleteTaskRequest {
            task_id: task.id.clone(),
            lease_token: token,
            lease_secret: String::new(),
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::Aborted, "{again:?}");

    // a cancel reaches a unary worker through its heartbeat; its fail then
    // ends the task CANCELLED
    let cancelled = submit_ok(
        &mut c,
        task_named("koo.examples.echo", pb::TaskCategory::Research),
    )
    .await;
    let leased = w
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "script".into(),
            task_names: vec!["koo.examples.echo".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leased.task.unwrap().id, cancelled.id);
    c.cancel_task(pb::CancelTaskRequest {
        task_id: cancelled.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let beat = w
        .heartbeat_task(wpb::HeartbeatTaskRequest {
            task_id: cancelled.id.clone(),
            lease_token: leased.lease_token,
            lease_secret: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(beat.cancel_requested, "{beat:?}");
    let failed = w
        .fail_task(wpb::FailTaskRequest {
            task_id: cancelled.id.clone(),
            lease_token: leased.lease_token,
            message: "stopped".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.state, pb::TaskState::Cancelled as i32);
}

/// A unary worker that outlives its lease is ABORTED when it reports: the
/// task went back to its queue and another worker holds it now.
async fn unary_late_report_is_aborted(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = workers(&koo.server);
    let task = submit_ok(
        &mut c,
        task_named("koo.examples.slow", pb::TaskCategory::Research),
    )
    .await;
    let lease = |name: &str| wpb::LeaseTaskRequest {
        worker_name: name.into(),
        task_names: vec!["koo.examples.slow".into()],
        wait: Some(millis(10_000)),
        ..Default::default()
    };
    let first = w.lease_task(lease("first")).await.unwrap().into_inner();
    // no heartbeat: the lease (1 s in tests) lapses and the sweep queues
    // the task again; the second worker waits for it
    let second = w.lease_task(lease("second")).await.unwrap().into_inner();
    assert_eq!(second.task.as_ref().unwrap().id, task.id);
    assert_eq!(second.task.as_ref().unwrap().attempts, 2);
    assert_ne!(second.lease_token, first.lease_token);
    for call in ["complete", "fail", "progress", "heartbeat"] {
        let err = match call {
            "complete" => w
                .complete_task(wpb::CompleteTaskRequest {
                    task_id: task.id.clone(),
                    lease_token: first.lease_token,
                    lease_secret: String::new(),
                    result: None,
                })
                .await
                .map(|_| ()),
            "fail" => w
                .fail_task(wpb::FailTaskRequest {
                    task_id: task.id.clone(),
                    lease_token: first.lease_token,
                    lease_secret: String::new(),
                    message: "late".into(),
                    retryable: true,
                    details: None,
                    retry_delay: None,
                    key_retry_after: None,
                })
                .await
                .map(|_| ()),
            "progress" => w
                .report_progress(wpb::ReportProgressRequest {
                    task_id: task.id.clone(),
                    lease_token: first.lease_token,
                    percent: 1.0,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            _ => w
                .heartbeat_task(wpb::HeartbeatTaskRequest {
                    task_id: task.id.clone(),
                    lease_token: first.lease_token,
                    lease_secret: String::new(),
                })
                .await
                .map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{call}: {err:?}");
    }
    w.complete_task(wpb::CompleteTaskRequest {
        task_id: task.id.clone(),
        lease_token: second.lease_token,
        lease_secret: String::new(),
        result: None,
    })
    .await
    .unwrap();
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    assert_eq!(t.attempt_log.len(), 2, "{:?}", t.attempt_log);
    assert_eq!(t.attempt_log[0].outcome, "lost");
    assert_eq!(t.attempt_log[0].worker, "first");
    assert_eq!(t.attempt_log[1].worker, "second");
}

/// Bad unary calls get INVALID_ARGUMENT naming the field, unknown tasks
/// NOT_FOUND.
async fn unary_refusals(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut w = workers(&koo.server);
    let cases = [
        (
            wpb::LeaseTaskRequest {
                worker_name: "w".into(),
                ..Default::default()
            },
            "task_names",
        ),
        (
            wpb::LeaseTaskRequest {
                worker_name: String::new(),
                task_names: vec!["x".into()],
                ..Default::default()
            },
            "worker_name",
        ),
        (
            wpb::LeaseTaskRequest {
                worker_name: "w".into(),
                queues: vec!["Bad Queue".into()],
                ..Default::default()
            },
            "queues[0]",
        ),
        (
            wpb::LeaseTaskRequest {
                worker_name: "w".into(),
                task_names: vec!["x".into()],
                wait: Some(millis(61_000)),
                ..Default::default()
            },
            "wait",
        ),
    ];
    for (req, field) in cases {
        let err = w.lease_task(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{field}: {err:?}");
    }
    let err = w
        .complete_task(wpb::CompleteTaskRequest {
            task_id: "nonsense".into(),
            lease_token: 1,
            lease_secret: String::new(),
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = w
        .complete_task(wpb::CompleteTaskRequest {
            task_id: unknown_task_id(),
            lease_token: 1,
            lease_secret: String::new(),
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = w
        .report_progress(wpb::ReportProgressRequest {
            task_id: unknown_task_id(),
            lease_token: 1,
            percent: 101.0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("percent"), "{err:?}");
    let err = w
        .fail_task(wpb::FailTaskRequest {
            task_id: unknown_task_id(),
            lease_token: 1,
            message: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("message"), "{err:?}");
}

/// A stream worker with concurrency 2 never holds a third task; it gets
/// only the names it serves; freeing a slot brings the next task.
async fn stream_respects_concurrency_and_routing(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = workers(&koo.server);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            submit_ok(
                &mut c,
                task_named("koo.examples.pdf", pb::TaskCategory::PdfProcessing),
            )
            .await
            .id,
        );
    }
    // a name this worker does not serve, in the same queue
    let other = submit_ok(
        &mut c,
        task_named("koo.examples.other", pb::TaskCategory::PdfProcessing),
    )
    .await;
    let mut worker = StreamWorker::connect(&mut w, &["koo.examples.pdf"], &[], 2)
        .await
        .unwrap();
    let _beat = worker.keep_beating();
    let mut held = vec![worker.next_task().await, worker.next_task().await];
    // two held: nothing more comes, though three more wait
    assert!(
        worker
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "a third task was pushed to a worker of concurrency 2"
    );
    let mut received = 2;
    let mut done = Vec::new();
    while let Some(t) = held.pop() {
        assert_eq!(t.task.as_ref().unwrap().name, "koo.examples.pdf");
        worker.complete(&t, serde_json::json!({"ok": true})).await;
        // the reply and, while tasks remain, the next task, in either order
        let expect_task = received < 5;
        let (mut replied, mut got_task) = (false, false);
        while !replied || (expect_task && !got_task) {
            match worker.next().await {
                Out::Reply(r) => {
                    assert_eq!(r.code, 0, "{r:?}");
                    assert_eq!(r.state, pb::TaskState::Succeeded as i32);
                    replied = true;
                }
                Out::Task(n) => {
                    held.push(n);
                    received += 1;
                    got_task = true;
                }
                other => panic!("unexpected {other:?}"),
            }
            assert!(held.len() <= 2, "more than 2 tasks held");
        }
        done.push(id(&t));
    }
    done.sort();
    ids.sort();
    assert_eq!(done, ids);
    let t = get_ok(&mut c, &other.id).await;
    assert_eq!(
        t.state,
        pb::TaskState::Queued as i32,
        "routing leaked: {t:?}"
    );
    // a worker serving the queue takes every name in it
    drop(worker);
    let mut by_queue = StreamWorker::connect(&mut w, &[], &["pdf_processing"], 1)
        .await
        .unwrap();
    let t = by_queue.next_task().await;
    assert_eq!(id(&t), other.id);
}

/// When a stream worker's connection drops mid-task (it reported
/// progress, so the task had started), the task goes back to its queue at
/// once with the attempt counted, and another worker completes it; history
/// shows both attempts. (A task the worker never spoke about is given back
/// uncounted: `worker_stream.rs`.)
async fn stream_drop_requeues_and_counts_the_attempt(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| {
        // longer than the test: only the dropped stream can requeue it
        s.tasks.config.lease = Duration::from_secs(60);
    })
    .await;
    let (mut c, mut w, task) = clients_and_task(&koo, "koo.examples.pdf").await;
    let mut first = StreamWorker::connect(&mut w, &["koo.examples.pdf"], &[], 1)
        .await
        .unwrap();
    let held = first.next_task().await;
    assert_eq!(id(&held), task.id);
    first
        .send(In::Progress(wpb::Progress {
            task_id: task.id.clone(),
            lease_token: held.lease_token,
            percent: 10.0,
            ..Default::default()
        }))
        .await;
    wait_task(&mut c, &task.id, |t| t.progress.is_some()).await;
    let first_id = first.id.clone();
    drop(first);
    let mut second = StreamWorker::connect(&mut w, &["koo.examples.pdf"], &[], 1)
        .await
        .unwrap();
    let again = second.next_task().await;
    assert_eq!(id(&again), task.id);
    assert_eq!(again.task.as_ref().unwrap().attempts, 2);
    second.complete(&again, serde_json::json!("done")).await;
    assert_eq!(second.reply().await.code, 0);
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    assert_eq!(t.attempts, 2);
    assert_eq!(t.attempt_log.len(), 2, "{:?}", t.attempt_log);
    assert_eq!(t.attempt_log[0].outcome, "lost");
    assert_eq!(t.attempt_log[0].worker, first_id);
    assert_eq!(t.attempt_log[1].outcome, "succeeded");
    assert_eq!(t.attempt_log[1].worker, second.id);
}

/// CancelTask reaches a stream worker at once; its fail ends the task
/// CANCELLED.
async fn stream_cancel_reaches_the_worker(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let (mut c, mut w, task) = clients_and_task(&koo, "koo.examples.pdf").await;
    let mut worker = StreamWorker::connect(&mut w, &["koo.examples.pdf"], &[], 1)
        .await
        .unwrap();
    let _beat = worker.keep_beating();
    let held = worker.next_task().await;
    c.cancel_task(pb::CancelTaskRequest {
        task_id: task.id.clone(),
        reason: "user gave up".into(),
    })
    .await
    .unwrap();
    match worker.next().await {
        Out::Cancel(cancel) => assert_eq!(cancel.task_id, task.id),
        other => panic!("expected a cancel, got {other:?}"),
    }
    worker.fail(&held, "stopped", false).await;
    let reply = worker.reply().await;
    assert_eq!(reply.code, 0, "{reply:?}");
    assert_eq!(reply.state, pb::TaskState::Cancelled as i32);
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(t.state, pb::TaskState::Cancelled as i32);
    assert_eq!(t.error.unwrap().message, "cancelled: user gave up");
}

/// A worker that ignores a cancel is revoked at the end of the cancel
/// grace (the task ends CANCELLED); one that overruns the hard limit is
/// revoked and the task ends TIMED_OUT, after a soft-limit notice.
async fn stream_cancel_grace_and_hard_limit_revoke(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| {
        s.tasks.config.cancel_grace = Duration::from_millis(200);
    })
    .await;
    let mut c = client(&koo.server);
    let mut w = workers(&koo.server);
    let mut worker = StreamWorker::connect(&mut w, &["koo.examples.stuck"], &[], 2)
        .await
        .unwrap();
    let _beat = worker.keep_beating();
    let cancelled = submit_ok(
        &mut c,
        task_named("koo.examples.stuck", pb::TaskCategory::Research),
    )
    .await;
    assert_eq!(id(&worker.next_task().await), cancelled.id);
    c.cancel_task(pb::CancelTaskRequest {
        task_id: cancelled.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert!(matches!(worker.next().await, Out::Cancel(_)));
    match worker.next().await {
        Out::Revoked(r) => {
            assert_eq!(r.task_id, cancelled.id);
            assert!(r.reason.contains("cancel grace"), "{r:?}");
        }
        other => panic!("expected a revoke, got {other:?}"),
    }
    let t = wait_task(&mut c, &cancelled.id, is_final).await;
    assert_eq!(t.state, pb::TaskState::Cancelled as i32);

    let limited = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            soft_time_limit: Some(millis(100)),
            time_limit: Some(millis(400)),
            ..task_named("koo.examples.stuck", pb::TaskCategory::Research)
        },
    )
    .await;
    assert_eq!(id(&worker.next_task().await), limited.id);
    match worker.next().await {
        Out::SoftTimeLimit(s) => assert_eq!(s.task_id, limited.id),
        other => panic!("expected a soft limit notice, got {other:?}"),
    }
    match worker.next().await {
        Out::Revoked(r) => assert!(r.reason.contains("hard time limit"), "{r:?}"),
        other => panic!("expected a revoke, got {other:?}"),
    }
    let t = wait_task(&mut c, &limited.id, is_final).await;
    assert_eq!(t.state, pb::TaskState::TimedOut as i32);
}

/// A stream worker that stops heartbeating is pushed nothing after two
/// heartbeat intervals (a task submitted then is not pushed to it, though
/// it has room), loses its leases after a lease (revoked), and the task
/// runs elsewhere; its late completion is ABORTED. Pushes carry koo's clock.
async fn stream_silent_worker_loses_its_leases(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let (mut c, mut w, task) = clients_and_task(&koo, "koo.examples.pdf").await;
    let connected = std::time::Instant::now();
    let names = ["koo.examples.pdf", "koo.examples.later"];
    let mut silent = StreamWorker::connect(&mut w, &names, &[], 2).await.unwrap();
    let held = silent.next_task().await;
    let pushed = std::time::SystemTime::try_from(held.push_time.expect("push_time")).unwrap();
    let off = pushed
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_secs(5), "push_time {off:?} off");
    // past the push cutoff (2/3 of the 1 s lease), before the revoke: a
    // new task the silent worker serves, with room for it, is not pushed
    // (the revoke comes first)
    tokio::time::sleep_until((connected + Duration::from_millis(800)).into()).await;
    let later = submit_ok(
        &mut c,
        task_named("koo.examples.later", pb::TaskCategory::PdfProcessing),
    )
    .await;
    match silent.next().await {
        Out::Revoked(r) => {
            assert_eq!(r.task_id, task.id);
            assert!(r.reason.contains("no heartbeat"), "{r:?}");
        }
        other => panic!("expected a revoke, got {other:?}"),
    }
    let mut other = StreamWorker::connect(&mut w, &["koo.examples.pdf"], &[], 1)
        .await
        .unwrap();
    let _beat = other.keep_beating();
    let again = other.next_task().await;
    assert_eq!(id(&again), task.id);
    silent.complete(&held, serde_json::json!(1)).await;
    let reply = silent.reply().await;
    assert_eq!(reply.code, Code::Aborted as i32, "{reply:?}");
    other.complete(&again, serde_json::json!(2)).await;
    assert_eq!(other.reply().await.code, 0);
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    assert_eq!(
        koo::grpc::json::to_json(t.result.as_ref().unwrap()).unwrap(),
        "2.0"
    );
    assert_eq!(
        get_ok(&mut c, &later.id).await.state,
        pb::TaskState::Queued as i32,
        "never pushed to the silent worker"
    );
}

/// Protocol errors: no hello first, bad hello fields, a second hello, and
/// an invalid report (answered with a reply, the stream going on).
async fn stream_protocol_errors(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut w = workers(&koo.server);
    for (names, queues, concurrency, field) in [
        (&[][..], &[][..], 1, "hello.task_names"),
        (&["x"][..], &[][..], 0, "hello.concurrency"),
        (&["x"][..], &[][..], 1025, "hello.concurrency"),
        (&["x"][..], &["No Such"][..], 1, "hello.queues[0]"),
    ] {
        let err = match StreamWorker::connect(&mut w, names, queues, concurrency).await {
            Ok(_) => panic!("accepted a bad hello ({field})"),
            Err(e) => e,
        };
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{field}: {err:?}");
    }
    // the first message is not a hello
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(In::Heartbeat(wpb::Heartbeat {})))
        .await
        .unwrap();
    let err = w
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hello"), "{err:?}");

    let mut worker = StreamWorker::connect(&mut w, &["x"], &[], 1).await.unwrap();
    worker
        .send(In::Fail(wpb::Fail {
            task_id: unknown_task_id(),
            lease_token: 1,
            message: String::new(),
            ..Default::default()
        }))
        .await;
    let reply = worker.reply().await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert_eq!(reply.kind, wpb::ReplyKind::Fail as i32);
    worker
        .send(In::Progress(wpb::Progress {
            task_id: "garbage".into(),
            lease_token: 1,
            percent: 5.0,
            ..Default::default()
        }))
        .await;
    let reply = worker.reply().await;
    assert_eq!(reply.code, Code::InvalidArgument as i32, "{reply:?}");
    assert_eq!(reply.kind, wpb::ReplyKind::Progress as i32);
    // a second hello ends the stream with INVALID_ARGUMENT
    worker
        .send(In::Hello(wpb::Hello {
            name: "again".into(),
            task_names: vec!["x".into()],
            queues: vec![],
            concurrency: 1,
            accept_batches: false,
            ..Default::default()
        }))
        .await;
    let end = tokio::time::timeout(common::EVENT_TIMEOUT, worker.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), Code::InvalidArgument, "{end:?}");
}

/// A failure's details are kept with the error; a retryable failure goes
/// back to the queue (SCHEDULED, then QUEUED) and runs again.
async fn fail_with_details_and_retry(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = workers(&koo.server);
    let task = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            max_retries: Some(1),
            ..task_named("koo.examples.flaky", pb::TaskCategory::Research)
        },
    )
    .await;
    let mut worker = StreamWorker::connect(&mut w, &["koo.examples.flaky"], &[], 1)
        .await
        .unwrap();
    let _beat = worker.keep_beating();
    let first = worker.next_task().await;
    let details = match koo_json(serde_json::json!({"http_status": 503})).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Some(s),
        _ => unreachable!(),
    };
    worker
        .send(In::Fail(wpb::Fail {
            task_id: task.id.clone(),
            lease_token: first.lease_token,
            lease_secret: String::new(),
            message: "upstream unavailable".into(),
            retryable: true,
            details: details.clone(),
            retry_delay: None,
            key_retry_after: None,
        }))
        .await;
    let reply = worker.reply().await;
    assert_eq!(reply.state, pb::TaskState::Scheduled as i32, "{reply:?}");
    let second = worker.next_task().await;
    assert_eq!(id(&second), task.id);
    assert_eq!(second.task.as_ref().unwrap().attempts, 2);
    worker
        .send(In::Fail(wpb::Fail {
            task_id: task.id.clone(),
            lease_token: second.lease_token,
            lease_secret: String::new(),
            message: "still unavailable".into(),
            retryable: true,
            details: details.clone(),
            retry_delay: None,
            key_retry_after: None,
        }))
        .await;
    // the retry budget is spent: FAILED for good
    assert_eq!(worker.reply().await.state, pb::TaskState::Failed as i32);
    let t = get_ok(&mut c, &task.id).await;
    let error = t.error.unwrap();
    assert_eq!(error.message, "still unavailable");
    assert_eq!(error.details, details);
}

/// ListWorkers shows stream and unary workers with what they serve and
/// hold; GetTaskMetrics counts them; a gone worker disappears.
async fn workers_are_listed_and_counted(backend: Backend) {
    let koo = start_on(backend, 1).await;
    let (mut c, mut w, task) = clients_and_task(&koo, "koo.examples.pdf").await;
    let mut worker = StreamWorker::connect(&mut w, &["koo.examples.pdf"], &[], 3)
        .await
        .unwrap();
    let beat = worker.keep_beating();
    worker.next_task().await;
    w.lease_task(wpb::LeaseTaskRequest {
        worker_name: "script".into(),
        queues: vec!["research".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // the stream worker's record is refreshed within a second of a change
    // (nothing signals it: the list is read until it shows, within a bound)
    let until = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    let listed = loop {
        let list = w
            .list_workers(wpb::ListWorkersRequest::default())
            .await
            .unwrap()
            .into_inner();
        if list
            .workers
            .iter()
            .any(|x| x.id == worker.id && x.task_ids == [task.id.clone()])
        {
            break list;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "never listed: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let kinds: Vec<i32> = listed.workers.iter().map(|x| x.kind).collect();
    assert!(
        kinds.contains(&(wpb::WorkerKind::Builtin as i32)),
        "{listed:?}"
    );
    assert!(
        kinds.contains(&(wpb::WorkerKind::Unary as i32)),
        "{listed:?}"
    );
    let me = listed.workers.iter().find(|x| x.id == worker.id).unwrap();
    assert_eq!(me.kind, wpb::WorkerKind::Stream as i32);
    assert_eq!(me.name, "test-worker");
    assert_eq!(me.task_names, ["koo.examples.pdf"]);
    assert_eq!(me.concurrency, 3);
    assert_eq!(me.running, 1);
    assert!(me.peer.starts_with("127.0.0.1:"), "{me:?}");
    assert!(me.last_seen_time.is_some() && me.start_time.is_some());
    // paging: one at a time covers the same workers
    let mut token = String::new();
    let mut paged = Vec::new();
    loop {
        let page = w
            .list_workers(wpb::ListWorkersRequest {
                page_size: 1,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        paged.extend(page.workers.into_iter().map(|x| x.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut all: Vec<String> = listed.workers.iter().map(|x| x.id.clone()).collect();
    all.sort();
    assert_eq!(paged, all);
    // a token ListWorkers did not issue (a bare worker id) is refused
    let err = w
        .list_workers(wpb::ListWorkersRequest {
            page_size: 1,
            page_token: worker.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("page_token"), "{err:?}");
    let m = c
        .get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .unwrap();
    assert_eq!(m.external, 2, "{m:?}");
    assert_eq!(m.live, 3, "{m:?}");
    assert!(m.busy >= 1, "{m:?}");
    // a worker that hangs up is removed at once
    let gone = worker.id.clone();
    beat.abort();
    let _ = beat.await;
    drop(worker);
    let until = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    loop {
        let list = w
            .list_workers(wpb::ListWorkersRequest::default())
            .await
            .unwrap()
            .into_inner();
        if !list.workers.iter().any(|x| x.id == gone) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "still listed: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With KOO_WORKER_TOKEN set, calls without the token, or with another,
/// are UNAUTHENTICATED; with it they work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_token_is_required_when_set() {
    let koo = start_on_with(Backend::Memory, 0, |s| {
        s.worker_token = Some("s3cret-token".into());
    })
    .await;
    let list = |token: Option<&str>| {
        let mut req = tonic::Request::new(wpb::ListWorkersRequest::default());
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", t.parse().unwrap());
        }
        req
    };
    let mut w = workers(&koo.server);
    for bad in [
        None,
        Some("Bearer wrong"),
        Some("s3cret-token"),
        Some("Bearer s3cret-tokenX"),
    ] {
        let err = w.list_workers(list(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad:?}: {err:?}");
        // no keys file here: a wrong token is not called a missing key
        assert!(!err.message().contains("keys file"), "{bad:?}: {err:?}");
    }
    w.list_workers(list(Some("Bearer s3cret-token")))
        .await
        .unwrap();
    // the stream is guarded too
    let err = match StreamWorker::connect(&mut w, &["x"], &[], 1).await {
        Ok(_) => panic!("a stream without the token was accepted"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // the TaskService is not
    let mut c = client(&koo.server);
    c.get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap();
}

/// Queues beyond the categories must be declared (KOO_TASK_QUEUES), so
/// that every queue holding tasks is swept for lapsed leases: undeclared,
/// submits and workers naming them are refused; declared, a worker serving
/// one gets its tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_queues_must_be_declared() {
    let undeclared = start_on(Backend::Memory, 0).await;
    let mut c = client(&undeclared.server);
    let gpu = pb::SubmitTaskRequest {
        queue: "gpu".into(),
        ..task_named("koo.examples.render", pb::TaskCategory::Research)
    };
    let err = c.submit_task(gpu.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("unknown queue"), "{err:?}");
    let mut w = workers(&undeclared.server);
    let err = match StreamWorker::connect(&mut w, &[], &["gpu"], 1).await {
        Ok(_) => panic!("a worker for an undeclared queue was accepted"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("hello.queues[0]"), "{err:?}");

    let declared = start_on_with(Backend::Memory, 0, |s| {
        s.tasks.config.extra_queues = vec![koo::domain::task::QueueName::parse("gpu").unwrap()];
    })
    .await;
    let mut c = client(&declared.server);
    let task = submit_ok(&mut c, gpu).await;
    assert_eq!(task.queue, "gpu");
    let mut w = workers(&declared.server);
    let mut worker = StreamWorker::connect(&mut w, &[], &["gpu"], 1)
        .await
        .unwrap();
    assert_eq!(id(&worker.next_task().await), task.id);
}

/// When koo stops, a stream worker's tasks go back to their queue at once
/// with their attempts given back (the worker did not fail), and another
/// koo on the same Redis runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn koo_stopping_hands_stream_tasks_back() {
    let koo = start_on_with(Backend::Redis, 0, |s| {
        // longer than the test: only the hand-back can requeue the task
        s.tasks.config.lease = Duration::from_secs(60);
    })
    .await;
    let mut c = client(&koo.server);
    let task = submit_ok(
        &mut c,
        task_named("koo.examples.pdf", pb::TaskCategory::PdfProcessing),
    )
    .await;
    let mut w = workers(&koo.server);
    let mut worker = StreamWorker::connect(&mut w, &["koo.examples.pdf"], &[], 1)
        .await
        .unwrap();
    assert_eq!(id(&worker.next_task().await), task.id);
    let Koo { redis, server, .. } = koo;
    server.shutdown().await;
    // the stream ends with the server
    let end = tokio::time::timeout(common::EVENT_TIMEOUT, worker.rx.message())
        .await
        .expect("the stream did not end");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    let other = spawn_on(redis.as_ref().unwrap(), 0).await;
    let mut c = client(&other);
    let t = get_ok(&mut c, &task.id).await;
    assert_eq!(t.state, pb::TaskState::Queued as i32, "{t:?}");
    assert_eq!(t.attempts, 0, "the attempt was given back");
    assert_eq!(t.attempt_log[0].outcome, "handed_back");
    let mut w = workers(&other);
    let mut again = StreamWorker::connect(&mut w, &["koo.examples.pdf"], &[], 1)
        .await
        .unwrap();
    let leased = again.next_task().await;
    assert_eq!(id(&leased), task.id);
    assert_eq!(leased.task.unwrap().attempts, 1);
}

/// A stream that never says hello is turned away after the request
/// timeout, with DEADLINE_EXCEEDED saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_hello_is_turned_away() {
    let koo = start_on_with(Backend::Memory, 0, |s| {
        s.request_timeout = Duration::from_millis(300);
    })
    .await;
    let mut w = workers(&koo.server);
    // the request stream stays open and silent
    let (_tx, rx) = mpsc::channel::<wpb::WorkRequest>(1);
    let err = tokio::time::timeout(
        common::EVENT_TIMEOUT,
        w.work(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("koo kept a silent stream open")
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("no hello"), "{err:?}");
}
