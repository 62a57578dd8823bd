//! Task control end to end (issue 4): cancel, retry, cleanup and dead
//! letters through real gRPC, on the embedded store and on a real Redis.

use crate::common;

use std::time::Duration;

use common::tasks::*;
use futures::StreamExt;
use koo::pb::tasks::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

on_both!(
    cancel_while_queued_or_scheduled,
    cancel_while_running,
    cancel_racing_completion_ends_once,
    retry_runs_an_ended_task_again_with_a_fresh_budget,
    cleanup_and_dead_letters,
    idempotency_keys,
    dependencies_release_on_success,
    dependencies_cancel_on_failure,
    bad_dependencies_are_refused,
);

// the scenarios that apply on a Redis Cluster too
crate::on_cluster_too!(
    cancel_racing_completion_ends_once,
    retry_runs_an_ended_task_again_with_a_fresh_budget,
    idempotency_keys,
    dependencies_cancel_on_failure,
);

/// A queued or scheduled task never runs once cancelled; cancelling again,
/// or an ended task, is FAILED_PRECONDITION; unknown ids are NOT_FOUND.
async fn cancel_while_queued_or_scheduled(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let queued = submit_ok(
        &mut c,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await;
    let scheduled = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            countdown: Some(millis(3600000)),
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    for (task, reason) in [(&queued, "no longer needed"), (&scheduled, "")] {
        let cancelled = c
            .cancel_task(pb::CancelTaskRequest {
                task_id: task.id.clone(),
                reason: reason.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert_eq!(cancelled.state, pb::TaskState::Cancelled as i32);
        assert!(cancelled.end_time.is_some());
        let expected = if reason.is_empty() {
            "cancelled: cancelled by request"
        } else {
            "cancelled: no longer needed"
        };
        assert_eq!(cancelled.error.unwrap().message, expected);
        let err = c
            .cancel_task(pb::CancelTaskRequest {
                task_id: task.id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("CANCELLED"), "{err:?}");
    }
    let active = c
        .list_active_tasks(pb::ListActiveTasksRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(active.tasks.is_empty(), "{active:?}");
    let cancelled = c
        .list_task_history(pb::ListTaskHistoryRequest {
            state: pb::TaskState::Cancelled as i32,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.tasks.len(), 2);
    // cancelled before they ran: no start, no run time
    assert!(
        cancelled
            .tasks
            .iter()
            .all(|t| t.start_time.is_none() && t.run_duration.is_none()),
        "{cancelled:?}"
    );
    let research = queue_metrics(&mut c, "research").await;
    assert_eq!(research.dead_letters, 0, "a cancel is not a dead letter");
    let unknown = unknown_task_id();
    let err = c
        .cancel_task(pb::CancelTaskRequest {
            task_id: unknown.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .cancel_task(pb::CancelTaskRequest {
            task_id: "garbage".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A running task is told to stop: a handler that cooperates stops at once;
/// one that ignores its token is abandoned after the cancel grace. Both end
/// CANCELLED with the reason, and the slot runs the next task.
async fn cancel_while_running(backend: Backend) {
    let koo = start_on_with(backend, 1, |s| {
        s.tasks.config.cancel_grace = Duration::from_millis(300);
    })
    .await;
    let mut c = client(&koo.server);
    for (name, kwargs) in [
        (
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 60, "steps": 60 }),
        ),
        (
            "koo.diagnostics.stubborn",
            serde_json::json!({ "seconds": 3 }),
        ),
    ] {
        let task = submit_ok(&mut c, submit(name, kwargs)).await;
        wait_task(&mut c, &task.id, |t| {
            t.state == pb::TaskState::Running as i32
        })
        .await;
        let reply = c
            .cancel_task(pb::CancelTaskRequest {
                task_id: task.id.clone(),
                reason: "operator".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert_eq!(
            reply.state,
            pb::TaskState::Running as i32,
            "told, not yet stopped"
        );
        let done = wait_task(&mut c, &task.id, is_final).await;
        assert_eq!(
            done.state,
            pb::TaskState::Cancelled as i32,
            "{name}: {done:?}"
        );
        assert_eq!(done.error.unwrap().message, "cancelled: operator");
        assert_eq!(done.attempts, 1, "a cancelled task is not retried");
    }
    let next = submit_ok(
        &mut c,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await;
    let done = wait_task(&mut c, &next.id, is_final).await;
    assert_eq!(
        done.state,
        pb::TaskState::Succeeded as i32,
        "the slot is free"
    );
}

/// Cancel racing completion, a thousand times: every task ends exactly once,
/// SUCCEEDED or CANCELLED, consistent with what the cancel answered, and
/// history holds each task once.
async fn cancel_racing_completion_ends_once(backend: Backend) {
    // no scheduler: it counts history, where a default schedule's firing
    // (every 5 minutes) would add tasks of its own
    let koo = start_on_with(backend, 4, |s| s.schedule.enabled = false).await;
    let mut c = client(&koo.server);
    // 10 ms tasks, cancelled while the workers run: some are cancelled
    // waiting, some running, some finish first
    let mut answers: Vec<(String, Result<i32, Code>)> = Vec::new();
    for _ in 0..10 {
        let batch = pb::SubmitTasksRequest {
            tasks: (0..100)
                .map(|_| {
                    submit(
                        "koo.diagnostics.sleep",
                        serde_json::json!({ "seconds": 0.01, "steps": 1 }),
                    )
                })
                .collect(),
        };
        let ids: Vec<String> = c
            .submit_tasks(batch)
            .await
            .unwrap()
            .into_inner()
            .tasks
            .into_iter()
            .map(|t| t.id)
            .collect();
        // cancel once the batch's first task has ended: the rest are then
        // queued, running or just finishing, so both outcomes occur
        wait_task(&mut c, &ids[0], is_final).await;
        let batch_answers: Vec<_> = futures::stream::iter(ids)
            .map(|id| {
                let mut c = c.clone();
                async move {
                    let reply = c
                        .cancel_task(pb::CancelTaskRequest {
                            task_id: id.clone(),
                            reason: String::new(),
                        })
                        .await
                        .map(|r| r.into_inner().task.unwrap().state)
                        .map_err(|e| e.code());
                    (id, reply)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        answers.extend(batch_answers);
    }
    let (mut succeeded, mut cancelled) = (0, 0);
    for (id, answer) in answers {
        let done = wait_task(&mut c, &id, is_final).await;
        match answer {
            Err(Code::FailedPrecondition) => {
                assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{id}")
            }
            // the task as the cancel left it, or as it already ended
            Ok(s) if s >= pb::TaskState::Succeeded as i32 => assert_eq!(done.state, s, "{id}"),
            Ok(s) if s == pb::TaskState::Running as i32 => assert!(
                done.state == pb::TaskState::Cancelled as i32
                    || done.state == pb::TaskState::Succeeded as i32,
                "{done:?}"
            ),
            other => panic!("{id}: unexpected cancel answer {other:?}"),
        }
        if done.state == pb::TaskState::Succeeded as i32 {
            succeeded += 1;
        } else {
            cancelled += 1;
        }
    }
    assert_eq!(succeeded + cancelled, 1000);
    assert!(
        succeeded > 0 && cancelled > 0,
        "the race went one way only ({succeeded} succeeded, {cancelled} cancelled)"
    );
    let mut seen = std::collections::HashSet::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_task_history(pb::ListTaskHistoryRequest {
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for t in page.tasks {
            assert!(seen.insert(t.id.clone()), "{} in history twice", t.id);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 1000);
}

/// RetryTask runs a FAILED, TIMED_OUT or CANCELLED task again under its id
/// with a fresh retry budget, keeping its earlier attempts; other states are
/// FAILED_PRECONDITION and unknown ids NOT_FOUND.
async fn retry_runs_an_ended_task_again_with_a_fresh_budget(backend: Backend) {
    let koo = start_on(backend, 2).await;
    let mut c = client(&koo.server);
    // fails three times; one retry allowed: FAILED after two attempts
    let task = submit_ok(&mut c, failing(3, 1)).await;
    let failed = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(
        (failed.state, failed.attempts),
        (pb::TaskState::Failed as i32, 2)
    );
    let again = c
        .retry_task(pb::RetryTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    // queued (or already taken by a worker: the reply reads the task after
    // the retry, and a worker may have run attempt 3 meanwhile)
    assert!(again.state < pb::TaskState::Succeeded as i32, "{again:?}");
    if again.state == pb::TaskState::Queued as i32 {
        assert!(
            again.error.is_none() && again.end_time.is_none(),
            "{again:?}"
        );
    }
    // attempt 3 fails, the fresh budget allows attempt 4, which succeeds
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(
        (done.state, done.attempts),
        (pb::TaskState::Succeeded as i32, 4),
        "{done:?}"
    );
    assert_eq!(done.attempt_log.len(), 4, "earlier attempts are kept");
    for state_of_refusal in ["succeeded", "queued"] {
        let id = if state_of_refusal == "succeeded" {
            task.id.clone()
        } else {
            submit_ok(
                &mut c,
                pb::SubmitTaskRequest {
                    countdown: Some(millis(3600000)),
                    ..submit("koo.diagnostics.noop", serde_json::json!({}))
                },
            )
            .await
            .id
        };
        let err = c
            .retry_task(pb::RetryTaskRequest { task_id: id })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{state_of_refusal}");
    }
    // a cancelled task runs again too
    let waiting = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            countdown: Some(millis(3600000)),
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    c.cancel_task(pb::CancelTaskRequest {
        task_id: waiting.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    c.retry_task(pb::RetryTaskRequest {
        task_id: waiting.id.clone(),
    })
    .await
    .unwrap();
    let ran = wait_task(&mut c, &waiting.id, is_final).await;
    assert_eq!(ran.state, pb::TaskState::Succeeded as i32);
    // and a timed-out one
    let slow = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            max_retries: Some(0),
            soft_time_limit: Some(millis(50)),
            time_limit: Some(millis(100)),
            ..submit(
                "koo.diagnostics.stubborn",
                serde_json::json!({ "seconds": 1 }),
            )
        },
    )
    .await;
    let timed_out = wait_task(&mut c, &slow.id, is_final).await;
    assert_eq!(timed_out.state, pb::TaskState::TimedOut as i32);
    let requeued = c
        .retry_task(pb::RetryTaskRequest {
            task_id: slow.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert!(
        requeued.state < pb::TaskState::Succeeded as i32,
        "{requeued:?}"
    );
    let unknown = unknown_task_id();
    let err = c
        .retry_task(pb::RetryTaskRequest {
            task_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Dead letters (FAILED, TIMED_OUT) are listed by ListTaskHistory's state
/// filter and requeued one by one or all at once; CleanupTasks removes
/// ended tasks older than asked and counts them.
async fn cleanup_and_dead_letters(backend: Backend) {
    let koo = start_on(backend, 2).await;
    let mut c = client(&koo.server);
    let fail = || failing(1, 0);
    let mut dead = Vec::new();
    for _ in 0..3 {
        let t = submit_ok(&mut c, fail()).await;
        dead.push(wait_task(&mut c, &t.id, is_final).await.id);
    }
    let ok = submit_ok(
        &mut c,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await;
    wait_task(&mut c, &ok.id, is_final).await;
    let listed = c
        .list_task_history(pb::ListTaskHistoryRequest {
            state: pb::TaskState::Failed as i32,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 3);
    // one by one: the first; then all: the other two
    let one = c
        .requeue_dead_letters(pb::RequeueDeadLettersRequest {
            task_ids: vec![dead[0].clone()],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.task_ids, [dead[0].clone()]);
    let rest = c
        .requeue_dead_letters(pb::RequeueDeadLettersRequest {
            task_ids: vec![],
            all: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut rest_ids = rest.task_ids.clone();
    rest_ids.sort();
    let mut expected = dead[1..].to_vec();
    expected.sort();
    assert_eq!(rest_ids, expected);
    for id in &dead {
        // fail_times fails once: the requeued run (attempt 2) succeeds
        let done = wait_task(&mut c, id, |t| t.state == pb::TaskState::Succeeded as i32).await;
        assert_eq!(done.attempts, 2);
    }
    // a task that is not a dead letter is refused, naming it and what was
    // requeued before it
    let err = c
        .requeue_dead_letters(pb::RequeueDeadLettersRequest {
            task_ids: vec![ok.id.clone()],
            all: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().starts_with("task_ids[0]: ")
            && err.message().ends_with("requeued before it: none"),
        "{err:?}"
    );
    for bad in [
        pb::RequeueDeadLettersRequest {
            task_ids: vec![],
            all: false,
        },
        pb::RequeueDeadLettersRequest {
            task_ids: vec![dead[0].clone()],
            all: true,
        },
    ] {
        let err = c.requeue_dead_letters(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    // cleanup: nothing is a day old; everything is older than zero (dead
    // letters too, when asked for)
    let none = c
        .cleanup_tasks(pb::CleanupTasksRequest {
            older_than: None,
            include_dead_letters: true,
            hours_old: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.removed_tasks, 0);
    let all = c
        .cleanup_tasks(pb::CleanupTasksRequest {
            older_than: Some(millis(0)),
            include_dead_letters: true,
            hours_old: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.removed_tasks, 4, "{all:?}");
    let err = c
        .get_task(pb::GetTaskRequest { task_id: ok.id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let history = c
        .list_task_history(pb::ListTaskHistoryRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(history.tasks.is_empty());
}

/// A cancel is stored, so it survives the loss of every koo process: a task
/// whose worker was killed mid-run and that was cancelled meanwhile ends
/// CANCELLED when a new koo starts, and never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_survives_a_restart_of_every_koo_process() {
    let mut koo = start(0).await;
    let mut c = client(&koo.server);
    let mut w = worker(koo.redis());
    let task = submit_ok(
        &mut c,
        submit(
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 60, "steps": 60 }),
        ),
    )
    .await;
    wait_task(&mut c, &task.id, |t| {
        t.state == pb::TaskState::Running as i32
    })
    .await;
    w.kill().unwrap(); // SIGKILL: the task stays RUNNING until its lease lapses
    w.wait().unwrap();
    let reply = c
        .cancel_task(pb::CancelTaskRequest {
            task_id: task.id.clone(),
            reason: "abandoned".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(reply.state, pb::TaskState::Running as i32);
    // every koo process goes away; a new server and worker start
    let redis = koo.redis.take().unwrap();
    koo.server.shutdown().await;
    let server = spawn_on(&redis, 0).await;
    let mut w = worker(&redis);
    let mut c = client(&server);
    let done = wait_task(&mut c, &task.id, is_final).await;
    let _ = w.kill();
    let _ = w.wait();
    assert_eq!(done.state, pb::TaskState::Cancelled as i32, "{done:?}");
    assert_eq!(done.attempts, 1, "it never ran again");
    assert_eq!(done.error.unwrap().message, "cancelled: abandoned");
}

/// An idempotency key: concurrent submits of one key create one task, and
/// each answer names it (all but one deduplicated); the same key with other
/// content is ALREADY_EXISTS; a batch refuses keys.
async fn idempotency_keys(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let c = client(&koo.server);
    let keyed = |kwargs: serde_json::Value| pb::SubmitTaskRequest {
        idempotency_key: "order-42".into(),
        ..submit("koo.diagnostics.noop", kwargs)
    };
    let answers: Vec<(String, bool)> = futures::stream::iter(0..50)
        .map(|_| {
            let mut c = c.clone();
            let req = keyed(serde_json::json!({ "n": 1 }));
            async move {
                let r = c.submit_task(req).await.unwrap().into_inner();
                (r.task.unwrap().id, r.deduplicated)
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let ids: std::collections::HashSet<_> = answers.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|(_, dedup)| !dedup).count(), 1);
    let mut c = c.clone();
    let err = c
        .submit_task(keyed(serde_json::json!({ "n": 2 })))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = c
        .submit_tasks(pb::SubmitTasksRequest {
            tasks: vec![keyed(serde_json::json!({}))],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let active = c
        .list_active_tasks(pb::ListActiveTasksRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.tasks.len(), 1, "one task stored");
}

/// Fifty concurrent submits of one key through two koo instances on one
/// Redis create one task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_across_two_instances_makes_one_task() {
    let koo = start(0).await;
    let other = spawn_on(koo.redis(), 0).await;
    let clients = [client(&koo.server), client(&other)];
    let answers: Vec<(String, bool)> = futures::stream::iter(0..50)
        .map(|i| {
            let mut c = clients[i % 2].clone();
            async move {
                let r = c
                    .submit_task(pb::SubmitTaskRequest {
                        idempotency_key: "shared".into(),
                        ..submit("koo.diagnostics.noop", serde_json::json!({}))
                    })
                    .await
                    .unwrap()
                    .into_inner();
                (r.task.unwrap().id, r.deduplicated)
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let ids: std::collections::HashSet<_> = answers.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|(_, dedup)| !dedup).count(), 1);
}

/// A claim whose task was never stored (its submitter died between the two
/// steps) is taken over by the next submit of the key: nothing is lost and
/// no submit waits forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_idempotency_claim_is_taken_over() {
    let koo = start(0).await;
    let mut c = client(&koo.server);
    let req = || pb::SubmitTaskRequest {
        idempotency_key: "orphan".into(),
        ..submit("koo.diagnostics.noop", serde_json::json!({}))
    };
    let first = c.submit_task(req()).await.unwrap().into_inner();
    assert!(!first.deduplicated);
    let id = first.task.unwrap().id;
    // the claim stays; the task it names disappears, as if never stored
    let queue = koo::domain::task::TaskId::parse(&id).unwrap().queue();
    let keys = koo::keys::QueueKeys::new("koo", &queue);
    let mut conn = koo.redis().conn().await;
    let task_key = keys.task(&koo::domain::task::TaskId::parse(&id).unwrap());
    let _: () = redis::cmd("DEL")
        .arg(&task_key)
        .arg(keys.ready())
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = c.submit_task(req()).await.unwrap().into_inner();
    assert!(!second.deduplicated, "a new task, not the lost one");
    let second_id = second.task.unwrap().id;
    assert_ne!(second_id, id);
    let third = c.submit_task(req()).await.unwrap().into_inner();
    assert!(third.deduplicated);
    assert_eq!(third.task.unwrap().id, second_id);
}

/// Dependencies across queues: the dependent waits PENDING and runs once
/// both dependencies have SUCCEEDED; its task lists them.
async fn dependencies_release_on_success(backend: Backend) {
    let koo = start_on(backend, 2).await;
    let mut c = client(&koo.server);
    let a = submit_ok(
        &mut c,
        submit(
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 1, "steps": 1 }),
        ),
    )
    .await;
    let b = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            category: pb::TaskCategory::Database as i32,
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    let dependent = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            category: pb::TaskCategory::Cache as i32,
            depends_on: vec![a.id.clone(), b.id.clone()],
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    assert_eq!(dependent.state, pb::TaskState::Pending as i32);
    assert_eq!(dependent.depends_on, [a.id.clone(), b.id.clone()]);
    let listed = c
        .list_active_tasks(pb::ListActiveTasksRequest {
            category: pb::TaskCategory::Cache as i32,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tasks.len(), 1, "PENDING tasks are active");
    let cache = queue_metrics(&mut c, "cache").await;
    assert_eq!(cache.pending, 1);
    let done = wait_task(&mut c, &dependent.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    let a_done = wait_task(&mut c, &a.id, is_final).await;
    let (started, a_ended) = (done.start_time.unwrap(), a_done.end_time.unwrap());
    assert!(
        (started.seconds, started.nanos) >= (a_ended.seconds, a_ended.nanos),
        "ran only after its dependency ended"
    );
    // all dependencies already succeeded: queued at once
    let later = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![a.id.clone()],
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    assert_ne!(later.state, pb::TaskState::Pending as i32);
}

/// A dependency that ends otherwise than SUCCEEDED (timed out, cancelled)
/// cancels its dependents, naming it, and theirs in turn.
async fn dependencies_cancel_on_failure(backend: Backend) {
    let koo = start_on(backend, 2).await;
    let mut c = client(&koo.server);
    let slow = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            max_retries: Some(0),
            soft_time_limit: Some(millis(100)),
            time_limit: Some(millis(300)),
            ..submit(
                "koo.diagnostics.stubborn",
                serde_json::json!({ "seconds": 1 }),
            )
        },
    )
    .await;
    let child = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![slow.id.clone()],
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    let grandchild = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![child.id.clone()],
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    let done = wait_task(&mut c, &child.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Cancelled as i32, "{done:?}");
    assert_eq!(
        done.error.unwrap().message,
        format!("dependency {} ended TIMED_OUT", slow.id)
    );
    let done = wait_task(&mut c, &grandchild.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Cancelled as i32, "{done:?}");
    assert_eq!(
        done.error.unwrap().message,
        format!("dependency {} ended CANCELLED", child.id)
    );
    // a dependent cancelled by its dependency's failure is not retried
    // while that dependency has not succeeded (it would run without it)
    let refused = c
        .retry_task(pb::RetryTaskRequest {
            task_id: child.id.clone(),
        })
        .await
        .expect_err("a retry past a failed dependency");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains(&format!("{}, which is TIMED_OUT", slow.id)),
        "{refused:?}"
    );
    // one whose dependencies all succeeded is retried as any other
    let first = submit_ok(
        &mut c,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await;
    let failing = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![first.id.clone()],
            max_retries: Some(0),
            ..submit(
                "koo.diagnostics.fail_times",
                serde_json::json!({ "failures": 5 }),
            )
        },
    )
    .await;
    let done = wait_task(&mut c, &failing.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Failed as i32, "{done:?}");
    c.retry_task(pb::RetryTaskRequest {
        task_id: failing.id.clone(),
    })
    .await
    .expect("a retry after its dependency succeeded");
    // it ran again (it may have failed again before the reply was read:
    // its attempt log, not its state, says so)
    wait_task(&mut c, &failing.id, |t| t.attempt_log.len() == 2).await;
    // one that ran is retried even when its dependency's record has expired
    // since (it ran, so the dependency had succeeded)
    let brief = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            result_ttl: Some(millis(1000)),
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    let orphan = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![brief.id.clone()],
            max_retries: Some(0),
            ..submit(
                "koo.diagnostics.fail_times",
                serde_json::json!({ "failures": 5 }),
            )
        },
    )
    .await;
    let done = wait_task(&mut c, &orphan.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Failed as i32, "{done:?}");
    // an expiry is a time, not an event: read until the record is gone
    let gone_by = tokio::time::Instant::now() + Duration::from_secs(10);
    while c
        .get_task(pb::GetTaskRequest {
            task_id: brief.id.clone(),
        })
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < gone_by,
            "{} never expired",
            brief.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.retry_task(pb::RetryTaskRequest {
        task_id: orphan.id.clone(),
    })
    .await
    .expect("a retry of a task that ran, its dependency expired since");
    // cancelling the dependency cancels the dependent
    let long = submit_ok(
        &mut c,
        submit(
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 60, "steps": 60 }),
        ),
    )
    .await;
    let waiting = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![long.id.clone()],
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    c.cancel_task(pb::CancelTaskRequest {
        task_id: long.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let done = wait_task(&mut c, &waiting.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Cancelled as i32, "{done:?}");
    // a PENDING task can itself be cancelled
    let blocker = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            countdown: Some(millis(3600000)),
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    let pending = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![blocker.id.clone()],
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await;
    let cancelled = c
        .cancel_task(pb::CancelTaskRequest {
            task_id: pending.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(cancelled.state, pb::TaskState::Cancelled as i32);
}

/// Bad dependencies are refused at submit: unknown, malformed, listed
/// twice, already failed, with a countdown, or in a batch.
async fn bad_dependencies_are_refused(backend: Backend) {
    let koo = start_on(backend, 1).await;
    let mut c = client(&koo.server);
    let failed = submit_ok(&mut c, failing(1, 0)).await;
    wait_task(&mut c, &failed.id, is_final).await;
    let unknown = unknown_task_id();
    let with = |deps: Vec<String>| pb::SubmitTaskRequest {
        depends_on: deps,
        ..submit("koo.diagnostics.noop", serde_json::json!({}))
    };
    for (req, code, field) in [
        (
            with(vec![unknown.clone()]),
            Code::InvalidArgument,
            "depends_on[0]",
        ),
        (
            with(vec!["nonsense".into()]),
            Code::InvalidArgument,
            "depends_on[0]",
        ),
        (
            with(vec![failed.id.clone(), failed.id.clone()]),
            Code::InvalidArgument,
            "depends_on[1]",
        ),
        (with(vec![failed.id.clone()]), Code::FailedPrecondition, ""),
        (
            pb::SubmitTaskRequest {
                countdown: Some(millis(5000)),
                ..with(vec![failed.id.clone()])
            },
            Code::InvalidArgument,
            "countdown",
        ),
    ] {
        let err = c.submit_task(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        if !field.is_empty() {
            assert_eq!(
                err.get_error_details()
                    .bad_request()
                    .unwrap()
                    .field_violations[0]
                    .field,
                field
            );
        }
    }
    let err = c
        .submit_tasks(pb::SubmitTasksRequest {
            tasks: vec![with(vec![failed.id.clone()])],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
