//! A failure's own retry delay and the caller's cancel reason (issue 15),
//! over real gRPC on both stores: `Fail.retry_delay` and
//! `FailTaskRequest.retry_delay` replace the backoff (and are refused when
//! negative, unnormalised or over 24 h, naming the field), and the reason
//! given to CancelTask reaches the worker: on the stream from this process
//! at once, from another koo process on the same Redis at the worker's next
//! heartbeat, and in HeartbeatTaskResponse.cancel_reason.

use crate::common;

use std::time::{Duration, SystemTime};

use common::stream::{StreamWorker, hello};
use common::tasks::*;
use koo::pb::tasks::v1::{self as pb, task_service_client::TaskServiceClient};
use koo::pb::worker::v1::{
    self as wpb, work_request::Message as In, work_response::Message as Out,
    worker_service_client::WorkerServiceClient,
};
use tonic::Code;
use tonic::transport::Channel;

on_both!(
    stream_fail_retry_delay_replaces_the_backoff,
    unary_fail_retry_delay_replaces_the_backoff,
    cancel_reason_reaches_stream_and_unary_workers,
);

const NAME: &str = "koo.examples.retry";

/// A server whose backoff is a minute and whose leases outlive the test:
/// a task back within seconds came back by its retry delay.
async fn start(backend: Backend) -> Koo {
    start_on_with(backend, 0, slow_backoff).await
}

fn slow_backoff(s: &mut koo::server::Settings) {
    s.tasks.config.lease = Duration::from_secs(30);
    s.tasks.config.backoff = koo::tasks::retry::Backoff {
        base: Duration::from_secs(60),
        max: Duration::from_secs(60),
    };
}

fn job(max_retries: i32) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        name: NAME.into(),
        category: pb::TaskCategory::Research as i32,
        max_retries: Some(max_retries),
        ..Default::default()
    }
}

fn secs(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

/// A Work stream serving [`NAME`], one task at a time.
async fn open(server: &common::TestServer) -> StreamWorker {
    StreamWorker::open(server, hello("retry-test", &[NAME], &[], 1)).await
}

/// Fails `t` retryably, asking for `delay`; koo's reply.
async fn fail(
    s: &mut StreamWorker,
    t: &wpb::TaskAssignment,
    delay: Option<prost_types::Duration>,
) -> wpb::Reply {
    s.send(In::Fail(wpb::Fail {
        task_id: id(t),
        lease_token: t.lease_token,
        lease_secret: String::new(),
        message: "busy".into(),
        retryable: true,
        details: None,
        retry_delay: delay,
        key_retry_after: None,
    }))
    .await;
    s.reply().await
}

fn id(t: &wpb::TaskAssignment) -> String {
    t.task.as_ref().unwrap().id.clone()
}

/// Asserts that task `id` is SCHEDULED with its next attempt due about
/// `ahead` from now, read through GetTask (its last attempt's retry time).
async fn assert_due_in(c: &mut TaskServiceClient<Channel>, id: &str, ahead: Duration) {
    let t = get_ok(c, id).await;
    assert_eq!(t.state, pb::TaskState::Scheduled as i32, "{t:?}");
    let retry = t
        .attempt_log
        .last()
        .and_then(|a| a.retry_time)
        .expect("a retry time");
    let due = SystemTime::UNIX_EPOCH + Duration::new(retry.seconds as u64, retry.nanos as u32);
    let now = SystemTime::now();
    let lo = now + ahead - Duration::from_secs(5);
    assert!(
        due > lo && due <= now + ahead,
        "due {due:?}, expected about {ahead:?} from {now:?}"
    );
}

/// On the stream: a retryable fail with a retry delay of 0 s is leased
/// again at once (the backoff is a minute), one of 30 s leaves the task
/// SCHEDULED 30 s out, a negative, unnormalised or over-24-h delay is
/// refused in the reply (INVALID_ARGUMENT naming `fail.retry_delay`, the
/// value quoted) and the task stays held, and on the last attempt a delay
/// changes nothing: the task ends FAILED.
async fn stream_fail_retry_delay_replaces_the_backoff(backend: Backend) {
    let koo = start(backend).await;
    let mut c = client(&koo.server);
    let task = submit_ok(&mut c, job(2)).await;
    let mut s = open(&koo.server).await;
    let first = s.task().await;
    assert_eq!(id(&first), task.id);
    let r = fail(&mut s, &first, secs(0, 0)).await;
    assert_eq!(
        (r.code, r.state),
        (0, pb::TaskState::Scheduled as i32),
        "{r:?}"
    );
    let second = tokio::time::timeout(Duration::from_secs(5), s.task())
        .await
        .expect("a retry delay of 0 s did not run the task again at once");
    assert_eq!(id(&second), task.id);
    assert_eq!(second.task.as_ref().unwrap().attempts, 2);

    for (seconds, nanos, why) in [
        (-1, 0, "is negative"),
        (86_400, 1, "is out of range"),
        (1, 1_000_000_000, "is not a normalised duration"),
    ] {
        let r = fail(&mut s, &second, secs(seconds, nanos)).await;
        assert_eq!(r.code, Code::InvalidArgument as i32, "{r:?}");
        assert!(r.message.starts_with("fail.retry_delay: "), "{r:?}");
        assert!(r.message.contains(why), "{r:?}");
        let quoted = format!("got seconds {seconds}, nanos {nanos}");
        assert!(r.message.contains(&quoted), "{r:?}");
    }
    let held = get_ok(&mut c, &task.id).await;
    assert_eq!(held.state, pb::TaskState::Running as i32, "{held:?}");

    let r = fail(&mut s, &second, secs(30, 0)).await;
    assert_eq!(
        (r.code, r.state),
        (0, pb::TaskState::Scheduled as i32),
        "{r:?}"
    );
    assert_due_in(&mut c, &task.id, Duration::from_secs(30)).await;
    // cancelled while it waits for its retry: its history names no start
    // (the attempts that ran are in its attempt log)
    c.cancel_task(pb::CancelTaskRequest {
        task_id: task.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let history = c
        .list_task_history(pb::ListTaskHistoryRequest {
            state: pb::TaskState::Cancelled as i32,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let entry = history
        .iter()
        .find(|h| h.id == task.id)
        .expect("in history");
    assert!(
        entry.start_time.is_none() && entry.run_duration.is_none(),
        "{entry:?}"
    );

    let last = submit_ok(&mut c, job(0)).await;
    let t = s.task().await;
    assert_eq!(id(&t), last.id);
    let r = fail(&mut s, &t, secs(0, 0)).await;
    assert_eq!(
        (r.code, r.state),
        (0, pb::TaskState::Failed as i32),
        "{r:?}"
    );
}

/// FailTask: a retry delay of 0 s makes the task leasable at once, one of
/// 30 s leaves it SCHEDULED 30 s out, bad ones are INVALID_ARGUMENT naming
/// `retry_delay` (the task stays held).
async fn unary_fail_retry_delay_replaces_the_backoff(backend: Backend) {
    let koo = start(backend).await;
    let mut c = client(&koo.server);
    let mut w = WorkerServiceClient::new(koo.server.channel.clone());
    let task = submit_ok(&mut c, job(3)).await;
    let lease = |mut w: WorkerServiceClient<Channel>| async move {
        w.lease_task(wpb::LeaseTaskRequest {
            worker_name: "script".into(),
            task_names: vec![NAME.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    };
    let fail = |token, delay| wpb::FailTaskRequest {
        task_id: task.id.clone(),
        lease_token: token,
        message: "busy".into(),
        retryable: true,
        retry_delay: delay,
        ..Default::default()
    };
    let leased = lease(w.clone()).await;
    let s = w
        .fail_task(fail(leased.lease_token, secs(0, 0)))
        .await
        .unwrap();
    assert_eq!(s.into_inner().state, pb::TaskState::Scheduled as i32);
    // no wait: the lease promotes what is due
    let again = lease(w.clone()).await;
    assert_eq!(
        again.task.as_ref().map(|t| t.id.as_str()),
        Some(task.id.as_str())
    );

    for (seconds, nanos) in [(-5, 0), (86_401, 0), (0, -1)] {
        let e = w
            .fail_task(fail(again.lease_token, secs(seconds, nanos)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with("retry_delay: "), "{e:?}");
        let quoted = format!("got seconds {seconds}, nanos {nanos}");
        assert!(e.message().contains(&quoted), "{e:?}");
    }
    let s = w
        .fail_task(fail(again.lease_token, secs(30, 0)))
        .await
        .unwrap();
    assert_eq!(s.into_inner().state, pb::TaskState::Scheduled as i32);
    assert_due_in(&mut c, &task.id, Duration::from_secs(30)).await;
}

/// The reason given to CancelTask reaches a stream worker in its `cancel`
/// message (this process's cancel, no heartbeat needed), an empty one
/// arrives as `cancelled by request`, and a unary worker's heartbeat
/// returns it as `cancel_reason`.
async fn cancel_reason_reaches_stream_and_unary_workers(backend: Backend) {
    let koo = start(backend).await;
    let mut c = client(&koo.server);
    let mut s = open(&koo.server).await;
    for (given, told) in [
        ("the user closed the tab", "the user closed the tab"),
        ("", "cancelled by request"),
    ] {
        let task = submit_ok(&mut c, job(0)).await;
        let held = s.task().await;
        assert_eq!(id(&held), task.id);
        cancel(&mut c, &task.id, given).await;
        match s.next().await {
            Out::Cancel(x) => assert_eq!((x.task_id, x.reason), (task.id, told.to_owned())),
            other => panic!("expected a cancel, got {other:?}"),
        }
        // the worker stops: the slot is free for the next case
        s.send(In::Fail(wpb::Fail {
            task_id: id(&held),
            lease_token: held.lease_token,
            message: "stopped".into(),
            ..Default::default()
        }))
        .await;
        let r = s.reply().await;
        assert_eq!(r.state, pb::TaskState::Cancelled as i32, "{r:?}");
    }
    drop(s);

    let mut w = WorkerServiceClient::new(koo.server.channel.clone());
    let task = submit_ok(&mut c, job(0)).await;
    // waiting: the dropped stream's session may lease the task before it
    // sees the stream closed, and then hands it back
    let leased = w
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "script".into(),
            task_names: vec![NAME.into()],
            wait: secs(10, 0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leased.task.as_ref().unwrap().id, task.id);
    let beat = wpb::HeartbeatTaskRequest {
        task_id: task.id.clone(),
        lease_token: leased.lease_token,
        lease_secret: String::new(),
    };
    let before = w.heartbeat_task(beat.clone()).await.unwrap().into_inner();
    assert!(
        !before.cancel_requested && before.cancel_reason.is_empty(),
        "{before:?}"
    );
    cancel(&mut c, &task.id, "quota exceeded").await;
    let after = w.heartbeat_task(beat).await.unwrap().into_inner();
    assert!(after.cancel_requested, "{after:?}");
    assert_eq!(after.cancel_reason, "quota exceeded");
}

async fn cancel(c: &mut TaskServiceClient<Channel>, id: &str, reason: &str) {
    c.cancel_task(pb::CancelTaskRequest {
        task_id: id.to_owned(),
        reason: reason.to_owned(),
    })
    .await
    .unwrap();
}

/// A cancel made through another koo process on the same Redis reaches
/// this process's stream worker at its next heartbeat, with the caller's
/// reason (the heartbeat script returns it: no broadcast crosses
/// processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_another_process_carries_its_reason() {
    let koo = start(Backend::Redis).await;
    let other = spawn_on(koo.redis(), 0).await;
    let mut c = client(&koo.server);
    let mut s = open(&koo.server).await;
    let task = submit_ok(&mut c, job(0)).await;
    assert_eq!(id(&s.task().await), task.id);
    cancel(
        &mut client(&other),
        &task.id,
        "superseded by a newer upload",
    )
    .await;
    s.send(In::Heartbeat(wpb::Heartbeat {})).await;
    match s.next().await {
        Out::Cancel(x) => assert_eq!(
            (x.task_id, x.reason.as_str()),
            (task.id, "superseded by a newer upload")
        ),
        other => panic!("expected a cancel, got {other:?}"),
    }
}
