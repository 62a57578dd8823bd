//! Pausing and resuming queues (PauseQueue, ResumeQueue, ListQueues) on
//! both stores: a paused queue accepts submits and hands out nothing while
//! the others run, to a worker's lease as to the chained lease of a
//! completion; a resume hands its tasks out again; a pause outlives the koo
//! process that made it (Redis here; the embedded store's snapshots in
//! `store::memory::tasks::snapshot`'s tests).

use crate::common;

use common::tasks::{
    Backend, client, is_final, millis, spawn_on, start_on, start_on_with, submit, submit_ok,
    wait_task,
};
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1 as wpb;
use koo::pb::worker::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::transport::Channel;

const JOB: &str = "test.queues.job";

on_both!(
    a_paused_queue_hands_out_nothing_while_others_run,
    a_resume_wakes_the_workers_at_once,
);

// the scenarios that apply on a Redis Cluster too
crate::on_cluster_too!(a_paused_queue_hands_out_nothing_while_others_run,);

fn job(category: pb::TaskCategory) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        category: category as i32,
        ..submit(JOB, serde_json::json!({}))
    }
}

fn lease(wait_ms: u64) -> wpb::LeaseTaskRequest {
    wpb::LeaseTaskRequest {
        worker_name: "queues-test".into(),
        task_names: vec![JOB.into()],
        queues: vec!["research".into(), "cache".into()],
        wait: (wait_ms > 0).then(|| millis(wait_ms)),
    }
}

async fn lease_id(w: &mut WorkerServiceClient<Channel>, wait_ms: u64) -> Option<String> {
    let r = w.lease_task(lease(wait_ms)).await.unwrap().into_inner();
    r.task.map(|t| t.id)
}

fn pause(queue: &str, reason: &str) -> pb::PauseQueueRequest {
    pb::PauseQueueRequest {
        queue: queue.into(),
        reason: reason.into(),
    }
}

async fn queue(
    c: &mut koo::pb::tasks::v1::task_service_client::TaskServiceClient<Channel>,
    name: &str,
) -> pb::Queue {
    let all = c
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues;
    all.into_iter()
        .find(|q| q.name == name)
        .unwrap_or_else(|| panic!("ListQueues lists {name}"))
}

async fn a_paused_queue_hands_out_nothing_while_others_run(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = WorkerServiceClient::new(koo.server.channel.clone());
    let paused = c
        .pause_queue(pause("research", "provider outage"))
        .await
        .unwrap()
        .into_inner()
        .queue
        .unwrap();
    assert_eq!(paused.state(), pb::QueueState::Paused);
    assert_eq!(paused.category(), pb::TaskCategory::Research);
    let p = paused.pause.clone().unwrap();
    assert_eq!(
        (p.principal.as_str(), p.reason.as_str()),
        ("anonymous", "provider outage")
    );
    assert!(p.pause_time.is_some());
    // a second pause changes nothing: the first reason stays
    let again = c
        .pause_queue(pause("research", "other"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.queue.unwrap().pause.unwrap().reason,
        "provider outage"
    );

    // submits are accepted; only the running queue's task is handed out
    let held = submit_ok(&mut c, job(pb::TaskCategory::Research)).await;
    let other = submit_ok(&mut c, job(pb::TaskCategory::Cache)).await;
    assert_eq!(held.state(), pb::TaskState::Queued);
    assert_eq!(
        lease_id(&mut w, 0).await.as_deref(),
        Some(other.id.as_str())
    );
    assert_eq!(
        lease_id(&mut w, 0).await,
        None,
        "a paused queue hands out nothing"
    );
    let research = queue(&mut c, "research").await;
    assert_eq!(research.state(), pb::QueueState::Paused);
    let m = research.metrics.unwrap();
    assert_eq!((m.queued, m.paused), (1, true));
    assert_eq!(
        queue(&mut c, "cache").await.state(),
        pb::QueueState::Running
    );
    let metrics = c
        .get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    let paused_now: Vec<_> = metrics
        .queues
        .iter()
        .filter(|q| q.paused)
        .map(|q| q.queue.as_str())
        .collect();
    assert_eq!(paused_now, ["research"]);

    // a lease waiting on the paused queue gets its task once it resumes
    let mut waiting = WorkerServiceClient::new(koo.server.channel.clone());
    let waiter = tokio::spawn(async move { lease_id(&mut waiting, 10_000).await });
    let resumed = c
        .resume_queue(pb::ResumeQueueRequest {
            queue: "research".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .queue
        .unwrap();
    assert_eq!(resumed.state(), pb::QueueState::Running);
    assert!(resumed.pause.is_none());
    assert_eq!(waiter.await.unwrap().as_deref(), Some(held.id.as_str()));
    // resuming a running queue changes nothing
    let twice = c
        .resume_queue(pb::ResumeQueueRequest {
            queue: "research".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        twice.into_inner().queue.unwrap().state(),
        pb::QueueState::Running
    );
    koo.server.shutdown().await;
}

/// An unknown queue and an over-long reason are INVALID_ARGUMENT naming the
/// field, with a bounded quote and the queues there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field() {
    let koo = start_on(Backend::Memory, 0).await;
    let mut c = client(&koo.server);
    let long = "x".repeat(5000);
    let e = c.pause_queue(pause(&long, "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("queue: unknown queue"),
        "{}",
        e.message()
    );
    assert!(
        e.message().contains("ai_service") && e.message().len() < 400,
        "{}",
        e.message()
    );
    let e = c
        .resume_queue(pb::ResumeQueueRequest {
            queue: String::new(),
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("queue:"), "{}", e.message());
    let e = c.pause_queue(pause("cache", &long)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("reason:"), "{}", e.message());
    assert_eq!(
        queue(&mut c, "cache").await.state(),
        pb::QueueState::Running
    );
    koo.server.shutdown().await;
}

/// A pause is stored with the queue: a koo process started after the one
/// that paused it (on the same Redis) hands out nothing either, and sees
/// who paused it; resumed there, the task is handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_outlives_the_process_that_made_it() {
    let koo = start_on(Backend::Redis, 0).await;
    let mut c = client(&koo.server);
    c.pause_queue(pause("research", "deploy")).await.unwrap();
    let held = submit_ok(&mut c, job(pb::TaskCategory::Research)).await;
    let Some(redis) = koo.redis else {
        unreachable!()
    };
    koo.server.shutdown().await;

    let second = spawn_on(&redis, 0).await;
    let mut c = client(&second);
    let mut w = WorkerServiceClient::new(second.channel.clone());
    let q = queue(&mut c, "research").await;
    assert_eq!(q.state(), pb::QueueState::Paused);
    assert_eq!(q.pause.unwrap().reason, "deploy");
    assert_eq!(lease_id(&mut w, 0).await, None);
    c.resume_queue(pb::ResumeQueueRequest {
        queue: "research".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        lease_id(&mut w, 5_000).await.as_deref(),
        Some(held.id.as_str())
    );
    second.shutdown().await;
}

/// A built-in worker that found the paused queue empty rests it for its
/// poll interval (a minute here); the resume wakes it, so the held task
/// runs at once: it ends well within the event timeout (20 s), which it
/// could not without the wake.
async fn a_resume_wakes_the_workers_at_once(backend: Backend) {
    let koo = start_on_with(backend, 1, |s| {
        s.tasks.config.poll_interval = std::time::Duration::from_secs(60);
    })
    .await;
    let mut c = client(&koo.server);
    c.pause_queue(pause("research", "")).await.unwrap();
    // the submit wakes the worker on research (found paused: it rests it)
    let held = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            category: pb::TaskCategory::Research as i32,
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    // a task of another queue run to its end: the worker has looked since
    let other = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            category: pb::TaskCategory::Cache as i32,
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    wait_task(&mut c, &other.id, is_final).await;
    assert_eq!(
        (c.get_task(pb::GetTaskRequest {
            task_id: held.id.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
        .state()),
        pb::TaskState::Queued
    );
    c.resume_queue(pb::ResumeQueueRequest {
        queue: "research".into(),
    })
    .await
    .unwrap();
    let done = wait_task(&mut c, &held.id, is_final).await;
    assert_eq!(done.state(), pb::TaskState::Succeeded);
    koo.server.shutdown().await;
}
