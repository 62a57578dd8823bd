//! The Python example worker (`examples/python-worker`) as real processes
//! against a real koo (issue 5): the seed's PDF and AI tasks complete
//! through it with live progress; `kill -9` mid-task, a network partition,
//! cancellation and its declared concurrency behave as promised.

use crate::common;

use common::python::{FakeOpenAi, Proxy, PyWorker};
use common::tasks::*;
use koo::pb::tasks::v1 as pb;

const PDF: &str = "koo.tasks.pdf_processing.process_document";

fn sample_pdf() -> String {
    common::python::example_dir()
        .join("testdata/sample.pdf")
        .to_string_lossy()
        .into_owned()
}

/// The seed's PDF task: args `[path, document_id]`.
fn pdf_task(page_delay: f64) -> pb::SubmitTaskRequest {
    let kwargs = match koo_json(serde_json::json!({ "page_delay_seconds": page_delay })).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Some(s),
        _ => None,
    };
    pb::SubmitTaskRequest {
        name: PDF.into(),
        category: pb::TaskCategory::PdfProcessing as i32,
        args: vec![
            koo_json(serde_json::json!(sample_pdf())),
            koo_json(serde_json::json!("doc_1")),
        ],
        kwargs,
        ..Default::default()
    }
}

fn result(t: &pb::Task) -> serde_json::Value {
    serde_json::from_str(&koo::grpc::json::to_json(t.result.as_ref().unwrap()).unwrap()).unwrap()
}

on_both!(pdf_task_completes_with_progress);

/// A PDF task completes through the Python worker: WatchTask shows its
/// progress page by page, and the result counts pages and characters.
async fn pdf_task_completes_with_progress(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut worker = PyWorker::start(
        koo.server.addr,
        &["--serve", "pdf", "--concurrency", "1"],
        &[],
    );
    worker.worker_id().await;
    let task = submit_ok(&mut c, pdf_task(0.05)).await;
    let mut watch = c
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut pages = Vec::new();
    let last = loop {
        let update = tokio::time::timeout(common::EVENT_TIMEOUT, watch.message())
            .await
            .expect("WatchTask went quiet")
            .unwrap()
            .expect("WatchTask ended before the task did");
        let t = update.task.unwrap();
        if let Some(p) = &t.progress {
            let page = p
                .metadata
                .as_ref()
                .and_then(|m| m.fields.get("page"))
                .cloned();
            if let Some(prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(n)),
            }) = page
                && pages.last() != Some(&n)
            {
                pages.push(n);
            }
        }
        if is_final(&t) {
            break t;
        }
    };
    assert_eq!(last.state, pb::TaskState::Succeeded as i32, "{last:?}");
    assert_eq!(pages, [1.0, 2.0, 3.0], "progress per page");
    let r = result(&last);
    assert_eq!(r["pages"], 3.0);
    assert_eq!(r["document_id"], "doc_1");
    assert!(r["characters"].as_f64().unwrap() > 50.0, "{r}");
    assert!(
        r["text_preview"].as_str().unwrap().contains("Page one"),
        "{r}"
    );
    worker.wait_task_event("completed", &task.id).await;
}

/// SubmitAiQuery's task is answered by the worker through an
/// OpenAI-compatible endpoint; a worker with no endpoint fails the task
/// for good with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_query_through_an_openai_compatible_endpoint() {
    let koo = start_on(Backend::Memory, 0).await;
    let mut c = client(&koo.server);
    let api = FakeOpenAi::start();
    let mut worker = PyWorker::start(
        koo.server.addr,
        &[
            "--serve",
            "ai",
            "--ai-base-url",
            &api.base_url,
            "--ai-model",
            "fake-1",
        ],
        &[],
    );
    worker.worker_id().await;
    let submit = |prompt: &str| pb::SubmitAiQueryRequest {
        provider: "claude".into(),
        prompt: prompt.into(),
        ..Default::default()
    };
    let task = c
        .submit_ai_query(submit("What are the latest advances in neurosurgery?"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    let r = result(&done);
    assert_eq!(r["provider"], "claude");
    assert_eq!(r["model"], "fake-1");
    assert!(
        r["answer"]
            .as_str()
            .unwrap()
            .contains("latest advances in neurosurgery"),
        "{r}"
    );
    // no endpoint configured: FAILED at once, not retried
    drop(worker);
    let mut bare = PyWorker::start(koo.server.addr, &["--serve", "ai"], &[]);
    bare.worker_id().await;
    let task = c
        .submit_ai_query(submit("Explain brain anatomy"))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Failed as i32, "{done:?}");
    assert_eq!(done.attempts, 1, "a missing endpoint is not retried");
    let error = done.error.unwrap();
    assert!(!error.retryable);
    assert!(
        error.message.contains("no AI endpoint configured"),
        "{error:?}"
    );
}

/// `kill -9` of the worker mid-task: the task goes back to its queue, a
/// second worker completes it, and its history shows both attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_task_then_another_worker_completes_it() {
    let koo = start_on(Backend::Redis, 0).await;
    let mut c = client(&koo.server);
    let mut first = PyWorker::start(koo.server.addr, &["--serve", "pdf"], &[]);
    let first_id = first.worker_id().await;
    let task = submit_ok(&mut c, pdf_task(0.5)).await;
    // mid-task: the first page reported
    first.wait_task_event("progress", &task.id).await;
    first.kill9();
    let mut second = PyWorker::start(koo.server.addr, &["--serve", "pdf"], &[]);
    let second_id = second.worker_id().await;
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempts, 2);
    let log: Vec<(&str, &str)> = done
        .attempt_log
        .iter()
        .map(|a| (a.worker.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        log,
        [
            (first_id.as_str(), "lost"),
            (second_id.as_str(), "succeeded")
        ]
    );
    second.wait_task_event("completed", &task.id).await;
}

/// A worker cut off by a network partition outlives its lease: the task
/// runs elsewhere, and when the partition heals the late completion is
/// refused with ABORTED. Nothing is recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_outlives_its_lease_is_aborted() {
    let koo = start_on(Backend::Redis, 0).await;
    let mut c = client(&koo.server);
    let proxy = Proxy::start(koo.server.addr).await;
    let mut cut = PyWorker::start(proxy.addr, &["--serve", "pdf"], &[]);
    cut.worker_id().await;
    // three pages at 0.6 s: longer than the lease (1 s in tests)
    let task = submit_ok(&mut c, pdf_task(0.6)).await;
    cut.wait_task_event("task", &task.id).await;
    proxy.partition();
    // koo hears no heartbeat for a lease; the sweep queues the task again
    // and a second worker completes it
    let mut other = PyWorker::start(koo.server.addr, &["--serve", "pdf"], &[]);
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    other.wait_task_event("completed", &task.id).await;
    // the cut-off worker finished too, and sent its completion into the
    // partition
    let sent = cut.wait_task_event("reported", &task.id).await;
    assert_eq!(sent["kind"], "complete");
    proxy.heal();
    // its progress reports and its completion, all refused
    let aborted = cut
        .wait_for("the completion's ABORTED", |e| {
            e["event"] == "aborted" && e["task_id"] == task.id.as_str() && e["kind"] == "complete"
        })
        .await;
    assert!(
        aborted["message"]
            .as_str()
            .unwrap()
            .contains("no longer yours"),
        "{aborted}"
    );
    assert!(
        cut.drain()
            .iter()
            .all(|e| !(e["event"] == "completed" && e["task_id"] == task.id.as_str()))
    );
    let after = get_ok(&mut c, &task.id).await;
    assert_eq!(after.attempts, 2);
    assert_eq!(after.attempt_log.len(), 2, "{:?}", after.attempt_log);
    assert_eq!(after.attempt_log[0].outcome, "lost");
}

/// CancelTask reaches the Python worker mid-task; the task ends CANCELLED
/// without running its remaining pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_python_worker() {
    let koo = start_on(Backend::Memory, 0).await;
    let mut c = client(&koo.server);
    let mut worker = PyWorker::start(koo.server.addr, &["--serve", "pdf"], &[]);
    worker.worker_id().await;
    let task = submit_ok(&mut c, pdf_task(2.0)).await;
    worker.wait_task_event("progress", &task.id).await;
    c.cancel_task(pb::CancelTaskRequest {
        task_id: task.id.clone(),
        reason: "not needed any more".into(),
    })
    .await
    .unwrap();
    worker.wait_task_event("cancel", &task.id).await;
    let failed = worker.wait_task_event("failed", &task.id).await;
    assert_eq!(failed["state"], "TASK_STATE_CANCELLED");
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Cancelled as i32);
    assert_eq!(
        done.error.unwrap().message,
        "cancelled: not needed any more"
    );
    let pages = done.progress.unwrap().metadata.unwrap().fields["page"].clone();
    assert_ne!(
        pages.kind,
        Some(prost_types::value::Kind::NumberValue(3.0)),
        "ran to the end"
    );
}

/// A worker that declares concurrency 2 holds two tasks at once, never
/// three, and runs them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_two_never_holds_three() {
    let koo = start_on(Backend::Redis, 0).await;
    let mut c = client(&koo.server);
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(submit_ok(&mut c, pdf_task(0.1)).await.id);
    }
    let mut worker = PyWorker::start(
        koo.server.addr,
        &["--serve", "pdf", "--concurrency", "2"],
        &[],
    );
    for id in &ids {
        let done = wait_task(&mut c, id, is_final).await;
        assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    }
    for id in &ids {
        worker.wait_task_event("completed", id).await;
    }
    let held: Vec<u64> = worker
        .drain()
        .iter()
        .filter(|e| e["event"] == "task")
        .map(|e| e["held"].as_u64().unwrap())
        .collect();
    assert_eq!(held.len(), 6, "one task event per task");
    assert_eq!(held.iter().max(), Some(&2), "held: {held:?}");
}
