//! Batch messages on Work streams (issue 15): a worker whose hello sets
//! `accept_batches` gets the tasks, replies and next tasks koo makes
//! together as one `batch`; any worker may send a batch of reports, ended
//! concurrently and answered in order; workers that do not ask get one
//! message at a time, as before; bad batches end the stream with a status
//! naming the message.

use crate::common;

use common::stream::{StreamWorker, hello, msg};
use common::tasks::*;
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1::{
    self as wpb, work_request::Message as In, work_response::Message as Out,
};
use prost::Message as _;
use tonic::Code;

on_both!(
    batches_both_ways,
    workers_that_do_not_ask_get_single_messages
);

// the scenarios that apply on a Redis Cluster too
crate::on_cluster_too!(batches_both_ways,);

const NAME: &str = "koo.examples.batched";
const QUEUE: &str = "pdf_processing";

/// A worker on a Work stream that serves [`NAME`] from [`QUEUE`].
async fn connect(koo: &Koo, concurrency: i32, accept_batches: bool) -> StreamWorker {
    let hello = wpb::Hello {
        accept_batches,
        ..hello("batcher", &[NAME], &[QUEUE], concurrency)
    };
    StreamWorker::open(&koo.server, hello).await
}

/// The messages `m` holds: a batch's, in order, or itself.
fn items(m: wpb::WorkResponse) -> Vec<Out> {
    match m.message.expect("a message") {
        Out::Batch(b) => b
            .responses
            .into_iter()
            .map(|r| r.message.unwrap())
            .collect(),
        one => vec![one],
    }
}

fn tasks_of(items: &[Out]) -> Vec<wpb::TaskAssignment> {
    items
        .iter()
        .filter_map(|m| match m {
            Out::Task(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn complete(t: &wpb::TaskAssignment) -> wpb::WorkRequest {
    msg(In::Complete(wpb::Complete {
        task_id: t.task.as_ref().unwrap().id.clone(),
        lease_token: t.lease_token,
        lease_secret: String::new(),
        result: Some(koo_json(serde_json::json!({ "ok": true }))),
    }))
}

async fn submit_n(koo: &Koo, n: usize, args: serde_json::Value) -> Vec<String> {
    let mut c = client(&koo.server);
    let mut ids = Vec::new();
    for _ in 0..n {
        let req = pb::SubmitTaskRequest {
            name: NAME.into(),
            category: pb::TaskCategory::PdfProcessing as i32,
            args: match &args {
                serde_json::Value::Array(a) => a.iter().cloned().map(koo_json).collect(),
                _ => vec![],
            },
            ..Default::default()
        };
        ids.push(submit_ok(&mut c, req).await.id);
    }
    ids
}

/// Eight tasks, a worker of concurrency 4 that accepts batches: the four
/// it is pushed come as one batch; its batch of four completions is
/// answered by one batch, the four replies in order and then the next
/// tasks leased with them; the last four end the same way; all eight
/// SUCCEEDED. The welcome says koo reads batches, its message limit and
/// koo's clock.
async fn batches_both_ways(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let ids = submit_n(&koo, 8, serde_json::json!([])).await;
    let mut w = connect(&koo, 4, true).await;
    assert!(w.welcome.accepts_batches, "{:?}", w.welcome);
    assert_eq!(
        w.welcome.max_message_size,
        4 * 1024 * 1024,
        "{:?}",
        w.welcome
    );
    // koo's clock, for reading a pushed task's start_time as an age
    let said = std::time::SystemTime::try_from(w.welcome.time.expect("the welcome's time"))
        .expect("a valid time");
    let off = said
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_else(|e| e.duration());
    assert!(
        off < std::time::Duration::from_secs(5),
        "welcome time {off:?} off"
    );

    let first = items(w.next_message().await);
    let pushed = tasks_of(&first);
    assert_eq!(
        (first.len(), pushed.len()),
        (4, 4),
        "one batch of 4 tasks: {first:?}"
    );

    let batch = |ts: &[wpb::TaskAssignment]| {
        In::Batch(wpb::WorkRequestBatch {
            requests: ts.iter().map(complete).collect(),
        })
    };
    w.send(batch(&pushed)).await;
    let answer = items(w.next_message().await);
    assert_eq!(
        answer.len(),
        8,
        "4 replies and 4 next tasks in one batch: {answer:?}"
    );
    // the replies first, in order, then the next tasks
    for (i, m) in answer[..4].iter().enumerate() {
        match m {
            Out::Reply(r) => {
                assert_eq!(r.task_id, pushed[i].task.as_ref().unwrap().id);
                assert_eq!(
                    (r.code, r.state),
                    (0, pb::TaskState::Succeeded as i32),
                    "{r:?}"
                );
                assert_eq!(r.kind, wpb::ReplyKind::Complete as i32);
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }
    assert!(
        answer[4..].iter().all(|m| matches!(m, Out::Task(_))),
        "{answer:?}"
    );
    let next = tasks_of(&answer);
    w.send(batch(&next)).await;
    let last = items(w.next_message().await);
    assert_eq!(last.len(), 4, "4 replies, nothing left to lease: {last:?}");
    assert!(
        last.iter()
            .all(|m| matches!(m, Out::Reply(r) if r.code == 0)),
        "{last:?}"
    );

    let mut c = client(&koo.server);
    for id in &ids {
        assert_eq!(
            get_ok(&mut c, id).await.state,
            pb::TaskState::Succeeded as i32
        );
    }
}

/// A worker whose hello does not set `accept_batches` gets no batch, one
/// message per task and per reply, as before; the batch it sends is read.
async fn workers_that_do_not_ask_get_single_messages(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let ids = submit_n(&koo, 4, serde_json::json!([])).await;
    let mut w = connect(&koo, 2, false).await;
    let mut pushed = Vec::new();
    for _ in 0..2 {
        let m = w.next_message().await;
        match m.message {
            Some(Out::Task(t)) => pushed.push(t),
            other => panic!("expected a single task message, got {other:?}"),
        }
    }
    w.send(In::Batch(wpb::WorkRequestBatch {
        requests: pushed.iter().map(complete).collect(),
    }))
    .await;
    let mut kinds = Vec::new();
    for _ in 0..4 {
        match w.next_message().await.message {
            Some(Out::Reply(r)) => {
                assert_eq!(r.code, 0, "{r:?}");
                kinds.push("reply");
            }
            Some(Out::Task(_)) => kinds.push("task"),
            other => panic!("expected a single reply or task message, got {other:?}"),
        }
    }
    assert_eq!(kinds, ["reply", "reply", "task", "task"]);
    let mut c = client(&koo.server);
    for id in &ids[..2] {
        assert_eq!(
            get_ok(&mut c, id).await.state,
            pb::TaskState::Succeeded as i32
        );
    }
}

/// A batch's messages act in order: a heartbeat, progress, then the
/// completion of the same task; the progress is recorded and the task
/// SUCCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_acts_in_order() {
    let koo = start_on(Backend::Memory, 0).await;
    let ids = submit_n(&koo, 1, serde_json::json!([])).await;
    let mut w = connect(&koo, 1, true).await;
    let t = tasks_of(&items(w.next_message().await)).remove(0);
    let progress = In::Progress(wpb::Progress {
        task_id: ids[0].clone(),
        lease_token: t.lease_token,
        percent: 50.0,
        message: "halfway".into(),
        ..Default::default()
    });
    w.send(In::Batch(wpb::WorkRequestBatch {
        requests: vec![
            msg(In::Heartbeat(wpb::Heartbeat {})),
            msg(progress),
            complete(&t),
        ],
    }))
    .await;
    match items(w.next_message().await).as_slice() {
        [Out::Reply(r)] => assert_eq!((r.code, r.state), (0, pb::TaskState::Succeeded as i32)),
        other => panic!("expected one reply: {other:?}"),
    }
    let task = get_ok(&mut client(&koo.server), &ids[0]).await;
    let p = task.progress.expect("progress recorded");
    assert_eq!((p.percent, p.message.as_str()), (50.0, "halfway"));
}

/// The tasks pushed together are split so that no batch passes about
/// 256 KiB: four tasks of ~100 KiB arguments come in more than one
/// message, none over 256 KiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_under_their_byte_bound() {
    let koo = start_on(Backend::Memory, 0).await;
    let big = "x".repeat(100 * 1024);
    submit_n(&koo, 4, serde_json::json!([big])).await;
    let mut w = connect(&koo, 4, true).await;
    let mut got = 0;
    let mut messages = 0;
    while got < 4 {
        let m = w.next_message().await;
        assert!(
            m.encoded_len() <= 256 * 1024,
            "a message of {} bytes",
            m.encoded_len()
        );
        got += tasks_of(&items(m)).len();
        messages += 1;
    }
    assert_eq!(got, 4);
    assert!(
        messages >= 2,
        "four ~100 KiB tasks in {messages} message(s)"
    );
}

/// Batches koo cannot read end the stream with INVALID_ARGUMENT naming the
/// message: an empty batch, a hello or a batch inside a batch, and a bad
/// report inside one (by its index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_end_the_stream() {
    let koo = start_on(Backend::Memory, 0).await;
    let hello = msg(In::Hello(wpb::Hello {
        name: "x".into(),
        task_names: vec![NAME.into()],
        concurrency: 1,
        ..Default::default()
    }));
    let nested = msg(In::Batch(wpb::WorkRequestBatch::default()));
    let nan = prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
    };
    let bad_result = msg(In::Complete(wpb::Complete {
        result: Some(nan),
        ..Default::default()
    }));
    let heartbeat = msg(In::Heartbeat(wpb::Heartbeat {}));
    let cases = [
        (vec![], "batch.requests: an empty batch"),
        (
            vec![heartbeat.clone(), hello],
            "batch.requests[1]: hello may only be the stream's first message",
        ),
        (
            vec![nested],
            "batch.requests[0]: a batch may not hold another batch",
        ),
        (
            vec![heartbeat.clone(), heartbeat, bad_result],
            "batch.requests[2]: ",
        ),
        (
            vec![wpb::WorkRequest { message: None }],
            "batch.requests[0]: a message with nothing set",
        ),
    ];
    for (requests, want) in cases {
        let mut w = connect(&koo, 1, true).await;
        w.send(In::Batch(wpb::WorkRequestBatch { requests })).await;
        let status = w.ended().await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(want),
            "{want:?} not in {:?}",
            status.message()
        );
    }
}

/// Two outcomes for one task in one batch end one after the other, as
/// they would one by one: the first counts, the second is ABORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_outcome_in_a_batch_is_fenced() {
    let koo = start_on(Backend::Memory, 0).await;
    let ids = submit_n(&koo, 1, serde_json::json!([])).await;
    let mut w = connect(&koo, 1, true).await;
    let t = tasks_of(&items(w.next_message().await)).remove(0);
    let fail = msg(In::Fail(wpb::Fail {
        task_id: ids[0].clone(),
        lease_token: t.lease_token,
        message: "second thoughts".into(),
        ..Default::default()
    }));
    w.send(In::Batch(wpb::WorkRequestBatch {
        requests: vec![complete(&t), fail],
    }))
    .await;
    let mut replies = Vec::new();
    while replies.len() < 2 {
        for m in items(w.next_message().await) {
            if let Out::Reply(r) = m {
                replies.push(r.code);
            }
        }
    }
    assert_eq!(replies, [0, Code::Aborted as i32]);
    let task = get_ok(&mut client(&koo.server), &ids[0]).await;
    assert_eq!(task.state, pb::TaskState::Succeeded as i32);
}

/// A task whose last failure kept details nested as deep as koo allows
/// goes out alone, never in a batch (whose two extra levels would pass
/// protobuf's decoding limit): the worker reads it again with its details.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_deep_error_details_goes_alone() {
    let koo = start_on(Backend::Memory, 0).await;
    let mut c = client(&koo.server);
    let deep_task = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            name: NAME.into(),
            category: pb::TaskCategory::PdfProcessing as i32,
            max_retries: Some(1),
            ..Default::default()
        },
    )
    .await;
    submit_n(&koo, 1, serde_json::json!([])).await;
    let mut w = connect(&koo, 2, true).await;
    let both = tasks_of(&items(w.next_message().await));
    assert_eq!(both.len(), 2);
    let (a, b) = match both[0].task.as_ref().unwrap().id == deep_task.id {
        true => (&both[0], &both[1]),
        false => (&both[1], &both[0]),
    };
    // 31 objects inside the details object: 32 levels, koo's limit
    let mut inner = serde_json::json!("bottom");
    for _ in 0..31 {
        inner = serde_json::json!({ "a": inner });
    }
    let details = match koo_json(serde_json::json!({ "a": inner })).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        other => panic!("not a struct: {other:?}"),
    };
    // the retried task may be leased again by the other's completion, in
    // the same run as the replies
    let fail = msg(In::Fail(wpb::Fail {
        task_id: deep_task.id.clone(),
        lease_token: a.lease_token,
        message: "deep".into(),
        retryable: true,
        details: Some(details),
        retry_delay: Some(prost_types::Duration::default()),
        ..Default::default()
    }));
    w.send(In::Batch(wpb::WorkRequestBatch {
        requests: vec![fail, complete(b)],
    }))
    .await;
    let mut again = None;
    while again.is_none() {
        let m = w.next_message().await;
        let batched = matches!(m.message, Some(Out::Batch(_)));
        for t in tasks_of(&items(m)) {
            if t.task.as_ref().unwrap().id == deep_task.id {
                assert!(!batched, "the task with deep details came in a batch");
                again = Some(t);
            }
        }
    }
    let task = again.unwrap().task.unwrap();
    assert_eq!(task.attempts, 2);
    assert!(task.error.and_then(|e| e.details).is_some());
}
