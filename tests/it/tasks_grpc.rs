//! TaskService end to end: the real koo server, on a real Redis or on the
//! embedded store, real `koo worker` processes, calls over real gRPC. Every
//! scenario that does not need a second process runs on both stores.

use crate::common;

use std::time::Duration;

use common::tasks::*;
use common::{TestRedis, TestServer, memory_settings, redis_settings, test_settings};
use koo::pb::tasks::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

on_both!(
    submitted_tasks_run_to_success,
    bad_input_is_refused,
    convenience_rpcs_and_queue_metrics,
    listing_active_tasks_and_history,
    submit_tasks_in_a_batch,
    watch_tasks_resumes_after_a_disconnect,
    watch_task_shows_every_state_of_a_retry,
    watch_task_messages_are_each_true_and_in_order,
    upkeep_runs_as_tasks,
    resuming_past_the_kept_events_is_out_of_range,
    results_are_cached_and_warming_computes_values,
    a_queue_orders_by_priority_then_submission,
);

// the scenarios that apply on a Redis Cluster too
crate::on_cluster_too!(
    submit_tasks_in_a_batch,
    watch_tasks_resumes_after_a_disconnect,
    a_queue_orders_by_priority_then_submission,
);

/// A no-op submitted over gRPC runs on the built-in workers to SUCCEEDED;
/// a countdown makes a task SCHEDULED first.
async fn submitted_tasks_run_to_success(backend: Backend) {
    let koo = start_on(backend, 2).await;
    let server = &koo.server;
    server
        .wait_health("koo.tasks.v1.TaskService", ServingStatus::Serving)
        .await;
    let mut c = client(server);
    let task = c
        .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.queue, "research");
    assert_eq!(task.max_retries, 3);
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.attempt_log.len(), 1);
    let later = c
        .submit_task(pb::SubmitTaskRequest {
            countdown: Some(millis(3600000)),
            max_retries: Some(0),
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(later.state, pb::TaskState::Scheduled as i32);
    assert_eq!(later.max_retries, 0, "zero retries is kept, not defaulted");
}

/// Bad submits and ids are refused with INVALID_ARGUMENT naming the field;
/// a well-formed unknown id is NOT_FOUND.
async fn bad_input_is_refused(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let server = &koo.server;
    let mut c = client(server);
    let base = || submit("x", serde_json::json!({}));
    let cases = vec![
        (
            pb::SubmitTaskRequest {
                category: 0,
                ..base()
            },
            "category",
        ),
        (
            pb::SubmitTaskRequest {
                category: 99,
                ..base()
            },
            "category",
        ),
        (
            pb::SubmitTaskRequest {
                name: String::new(),
                ..base()
            },
            "name",
        ),
        (
            pb::SubmitTaskRequest {
                max_retries: Some(-1),
                ..base()
            },
            "max_retries",
        ),
        (
            pb::SubmitTaskRequest {
                max_retries: Some(1001),
                ..base()
            },
            "max_retries",
        ),
        (
            pb::SubmitTaskRequest {
                priority: 42,
                ..base()
            },
            "priority",
        ),
        (
            pb::SubmitTaskRequest {
                queue: "Bad Queue".into(),
                ..base()
            },
            "queue",
        ),
        (
            pb::SubmitTaskRequest {
                countdown: Some(millis(1000)),
                eta: Some(prost_types::Timestamp {
                    seconds: 2_000_000_000,
                    nanos: 0,
                }),
                ..base()
            },
            "eta",
        ),
        (
            pb::SubmitTaskRequest {
                args: vec![koo_json(serde_json::json!("x".repeat(1024 * 1024)))],
                ..base()
            },
            "args",
        ),
    ];
    for (req, field) in cases {
        let err = c.submit_task(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
        let details = err.get_error_details();
        let violation = &details.bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, field);
    }
    let err = c
        .get_task(pb::GetTaskRequest {
            task_id: "nonsense".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let unknown = unknown_task_id();
    let err = c
        .get_task(pb::GetTaskRequest {
            task_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// SIGTERM to a `koo worker`: a task that ends within the shutdown grace
/// finishes; one that does not is handed back to its queue at once (not
/// after its lease lapses), its attempt given back and logged; the process
/// exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_or_hands_back_running_tasks() {
    let koo = start(0).await;
    let redis = koo.redis();
    let mut c = client(&koo.server);
    // a long lease: only a hand-back can requeue the task quickly
    let long_lease = [("KOO_TASK_LEASE", "60s")];
    let long = c
        .submit_task(submit(
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 60, "steps": 60 }),
        ))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let mut first = worker_with(
        redis,
        &[long_lease[0], ("KOO_WORKER_SHUTDOWN_GRACE", "200ms")],
    );
    wait_task(&mut c, &long.id, |t| {
        t.state == pb::TaskState::Running as i32
    })
    .await;
    signal(&first, "TERM");
    let back = wait_task(&mut c, &long.id, |t| {
        t.state == pb::TaskState::Queued as i32
    })
    .await;
    assert_eq!(back.attempts, 0, "the attempt is given back");
    assert_eq!(
        back.attempt_log.last().map(|a| a.outcome.as_str()),
        Some("handed_back")
    );
    assert!(exits_within(&mut first, Duration::from_secs(10)).await);
    // a short task ends within the grace; the long one is handed back again
    let short = c
        .submit_task(pb::SubmitTaskRequest {
            category: pb::TaskCategory::Database as i32,
            ..submit(
                "koo.diagnostics.sleep",
                serde_json::json!({ "seconds": 1, "steps": 2 }),
            )
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let mut second = worker_with(
        redis,
        &[
            long_lease[0],
            ("KOO_WORKER_SHUTDOWN_GRACE", "3s"),
            ("KOO_WORKER_CONCURRENCY", "2"),
        ],
    );
    wait_task(&mut c, &short.id, |t| {
        t.state == pb::TaskState::Running as i32
    })
    .await;
    wait_task(&mut c, &long.id, |t| {
        t.state == pb::TaskState::Running as i32
    })
    .await;
    signal(&second, "TERM");
    let done = wait_task(&mut c, &short.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    let back = wait_task(&mut c, &long.id, |t| {
        t.state == pb::TaskState::Queued as i32
    })
    .await;
    assert_eq!(back.attempt_log.len(), 2);
    assert!(exits_within(&mut second, Duration::from_secs(20)).await);
}

/// `kill -9` of a `koo worker` mid-task: the lease lapses, the task goes
/// back to its queue, a second worker completes it, and its attempt log
/// shows both attempts, the first one lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_process_loses_nothing() {
    let koo = start(0).await;
    let (redis, server) = (koo.redis(), &koo.server);
    let mut c = client(server);
    let mut first = worker(redis);
    let task = c
        .submit_task(submit(
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 2, "steps": 20 }),
        ))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let running = wait_task(&mut c, &task.id, |t| t.progress.is_some()).await;
    assert_eq!(running.state, pb::TaskState::Running as i32);
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let mut second = worker(redis);
    let done = wait_task(&mut c, &task.id, is_final).await;
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempts, 2);
    let outcomes: Vec<&str> = done
        .attempt_log
        .iter()
        .map(|a| a.outcome.as_str())
        .collect();
    assert_eq!(outcomes, ["lost", "succeeded"]);
    assert_ne!(done.attempt_log[0].worker, done.attempt_log[1].worker);
}

/// WatchTask on an instance other than the one running the task sees the
/// current state at once, progress as it happens and the final state, then
/// the stream ends; a late subscriber gets the final state alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_task_follows_work_done_elsewhere() {
    let koo = start(0).await;
    let (redis, api_only) = (koo.redis(), &koo.server);
    let _runner = spawn_on(redis, 1).await;
    let mut c = client(api_only);
    let task = c
        .submit_task(submit(
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 0.6, "steps": 3 }),
        ))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let mut stream = c
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let ended = tokio::time::timeout(common::EVENT_TIMEOUT, async {
        while let Some(msg) = stream.message().await.unwrap() {
            let t = msg.task.unwrap();
            seen.push((t.state, t.progress.map(|p| p.percent)));
        }
    })
    .await;
    assert!(ended.is_ok(), "stream never ended: {seen:?}");
    let (last_state, _) = *seen.last().unwrap();
    assert_eq!(last_state, pb::TaskState::Succeeded as i32, "{seen:?}");
    let percents: Vec<f64> = seen.iter().filter_map(|(_, p)| *p).collect();
    assert!(percents.contains(&100.0), "{seen:?}");
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(s, _)| *s == pb::TaskState::Running as i32),
        "{seen:?}"
    );
    // a late subscriber gets the final state and the end
    let mut late = c
        .watch_task(pb::WatchTaskRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let only = late.message().await.unwrap().unwrap().task.unwrap();
    assert_eq!(only.state, pb::TaskState::Succeeded as i32);
    assert!(late.message().await.unwrap().is_none());
    // unknown and malformed ids
    let unknown = unknown_task_id();
    let err = c
        .watch_task(pb::WatchTaskRequest {
            task_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .watch_task(pb::WatchTaskRequest {
            task_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// The seed's convenience RPCs: an AI query waits in `ai_service` (no worker
/// here serves it) and shows in the queue metrics with its age; the built-in
/// health check runs and reports Redis and every queue.
async fn convenience_rpcs_and_queue_metrics(backend: Backend) {
    let koo = start_on(backend, 2).await;
    let server = &koo.server;
    let mut c = client(server);
    let ai = c
        .submit_ai_query(pb::SubmitAiQueryRequest {
            provider: "claude".into(),
            prompt: "What are the latest advances in neurosurgery?".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(ai.name, "koo.tasks.ai_service.process_query");
    assert_eq!(
        (ai.queue.as_str(), ai.priority),
        ("ai_service", pb::TaskPriority::High as i32)
    );
    assert_eq!(ai.args.len(), 2);
    let err = c
        .submit_ai_query(pb::SubmitAiQueryRequest {
            provider: "claude".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let check = c
        .submit_health_check(pb::SubmitHealthCheckRequest {})
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(check.queue, "health_check");
    let done = wait_task(&mut c, &check.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    let report = done.result.unwrap();
    let Some(prost_types::value::Kind::StructValue(report)) = report.kind else {
        panic!("{report:?}")
    };
    let Some(prost_types::value::Kind::StructValue(store)) = report.fields["store"].kind.clone()
    else {
        panic!("{report:?}")
    };
    let kind = match backend {
        Backend::Memory => "embedded",
        Backend::Redis | Backend::Cluster => "redis",
    };
    assert_eq!(
        store.fields["kind"].kind,
        Some(prost_types::value::Kind::StringValue(kind.into()))
    );
    let Some(prost_types::value::Kind::StructValue(queues)) = report.fields["queues"].kind.clone()
    else {
        panic!()
    };
    assert_eq!(queues.fields.len(), 6);
    assert_eq!(
        report.fields["workers_alive"].kind,
        Some(prost_types::value::Kind::NumberValue(1.0)),
        "this server's pool announces itself: {report:?}"
    );
    let metrics = c
        .get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    let queue = |name: &str| {
        metrics
            .queues
            .iter()
            .find(|q| q.queue == name)
            .unwrap()
            .clone()
    };
    let ai_queue = queue("ai_service");
    assert_eq!((ai_queue.queued, ai_queue.submitted), (1, 1));
    assert!(ai_queue.oldest_wait.is_some());
    let health = queue("health_check");
    assert_eq!(
        (health.submitted, health.succeeded, health.queued),
        (1, 1, 0)
    );
    assert!(health.oldest_wait.is_none());
    // the same figures as a stream, for dashboards
    let mut watch = c
        .watch_task_metrics(pb::WatchTaskMetricsRequest {
            interval: Some(millis(100)),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.queues.len(), 6);
    c.submit_ai_query(pb::SubmitAiQueryRequest {
        provider: "claude".into(),
        prompt: "again".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let seen = tokio::time::timeout(common::EVENT_TIMEOUT, async {
        loop {
            let snapshot = watch.message().await.unwrap().unwrap();
            let ai = snapshot
                .queues
                .iter()
                .find(|q| q.queue == "ai_service")
                .unwrap();
            if ai.queued == 2 {
                return snapshot.time.is_some();
            }
        }
    })
    .await;
    assert_eq!(seen, Ok(true), "a later snapshot shows the second query");
    let err = c
        .watch_task_metrics(pb::WatchTaskMetricsRequest {
            interval: Some(millis(1)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// ListActiveTasks pages through every active task, filtered by category
/// or name; ListTaskHistory pages through ended tasks newest first, filtered
/// by end state; a token is bound to its filters.
async fn listing_active_tasks_and_history(backend: Backend) {
    let koo = start_on(backend, 2).await;
    let server = &koo.server;
    let mut c = client(server);
    let hour = Some(millis(3600000));
    for i in 0..7 {
        c.submit_task(pb::SubmitTaskRequest {
            countdown: hour,
            ..submit(&format!("later.{}", i % 2), serde_json::json!({}))
        })
        .await
        .unwrap();
    }
    for _ in 0..3 {
        c.submit_task(pb::SubmitTaskRequest {
            countdown: hour,
            category: pb::TaskCategory::Database as i32,
            ..submit("later.db", serde_json::json!({}))
        })
        .await
        .unwrap();
    }
    let list = |category: pb::TaskCategory, name: &str, token: String| pb::ListActiveTasksRequest {
        category: category as i32,
        name: name.into(),
        page_size: 3,
        page_token: token,
        ..Default::default()
    };
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_active_tasks(list(pb::TaskCategory::Unspecified, "", token))
            .await
            .unwrap()
            .into_inner();
        assert!(page.tasks.len() <= 3);
        all.extend(page.tasks.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10);
    let db = c
        .list_active_tasks(list(pb::TaskCategory::Database, "", String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(db.tasks.len(), 3);
    let named = c
        .list_active_tasks(pb::ListActiveTasksRequest {
            page_size: 100,
            ..list(pb::TaskCategory::Research, "later.1", String::new())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(named.tasks.len(), 3);
    // history: six successes and two failures
    let mut ended = Vec::new();
    for i in 0..8 {
        let failures = if i < 2 { 5 } else { 0 };
        let t = c
            .submit_task(pb::SubmitTaskRequest {
                max_retries: Some(0),
                ..submit(
                    "koo.diagnostics.fail_times",
                    serde_json::json!({ "failures": failures }),
                )
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        ended.push(wait_task(&mut c, &t.id, is_final).await.id);
    }
    let history = |state: pb::TaskState, token: String| pb::ListTaskHistoryRequest {
        state: state as i32,
        page_size: 3,
        page_token: token,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_task_history(history(pb::TaskState::Unspecified, token))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.tasks);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
    let times: Vec<(i64, i32)> = seen
        .iter()
        .map(|t| t.end_time.map(|e| (e.seconds, e.nanos)).unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "not newest first: {times:?}"
    );
    let mut ids: Vec<String> = seen.iter().map(|t| t.id.clone()).collect();
    ids.sort();
    ended.sort();
    assert_eq!(ids, ended);
    // each entry carries its last attempt's start and run time
    let ms = |t: prost_types::Timestamp| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
    for t in &seen {
        let (start, end) = (ms(t.start_time.unwrap()), ms(t.end_time.unwrap()));
        let run = t.run_duration.unwrap();
        assert!(start <= end, "{t:?}");
        assert_eq!(
            run.seconds * 1000 + i64::from(run.nanos) / 1_000_000,
            end - start,
            "{t:?}"
        );
    }
    let failed = c
        .list_task_history(pb::ListTaskHistoryRequest {
            page_size: 50,
            ..history(pb::TaskState::Failed, String::new())
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.tasks.len(), 2);
    assert!(failed.next_page_token.is_empty());
    // tokens are bound to their filters; non-final states are refused
    let first = c
        .list_task_history(history(pb::TaskState::Unspecified, String::new()))
        .await
        .unwrap()
        .into_inner();
    let err = c
        .list_task_history(history(pb::TaskState::Failed, first.next_page_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .list_task_history(history(pb::TaskState::Running, String::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// SubmitTasks stores a batch in order, refusing the whole batch (naming
/// the task and field) when one is invalid.
async fn submit_tasks_in_a_batch(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let server = &koo.server;
    let mut c = client(server);
    let batch = |n: usize| pb::SubmitTasksRequest {
        tasks: (0..n)
            .map(|i| submit(&format!("t{i}"), serde_json::json!({})))
            .collect(),
    };
    let stored = c.submit_tasks(batch(3)).await.unwrap().into_inner().tasks;
    let names: Vec<&str> = stored.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["t0", "t1", "t2"]);
    let mut bad = batch(3);
    bad.tasks[1].category = 0;
    let err = c.submit_tasks(bad).await.unwrap_err();
    let details = err.get_error_details();
    assert_eq!(
        details.bad_request().unwrap().field_violations[0].field,
        "tasks[1].category"
    );
    // the field is named once, with its place in the batch
    assert_eq!(err.message(), "tasks[1].category: is required");
    let active = c
        .list_active_tasks(pb::ListActiveTasksRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.tasks.len(), 3, "the refused batch stored nothing");
    let err = c.submit_tasks(batch(101)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// WatchTasks streams every matching task's events; after a disconnect, a
/// new stream with the last resume token continues right after it.
async fn watch_tasks_resumes_after_a_disconnect(backend: Backend) {
    let koo = start_on(backend, 1).await;
    let server = &koo.server;
    let mut c = client(server);
    let watch = |token: String| pb::WatchTasksRequest {
        categories: vec![pb::TaskCategory::Research as i32],
        name: "koo.diagnostics.noop".into(),
        resume_token: token,
    };
    let mut first = c
        .watch_tasks(watch(String::new()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = c
        .submit_tasks(pb::SubmitTasksRequest {
            tasks: vec![
                submit("koo.diagnostics.noop", serde_json::json!({})),
                submit("koo.diagnostics.sleep", serde_json::json!({ "seconds": 0 })),
                submit("koo.diagnostics.noop", serde_json::json!({})),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .tasks
        .into_iter()
        .map(|t| t.id)
        .collect();
    let mut events = Vec::new();
    let succeeded = |events: &[pb::WatchTasksResponse]| {
        events
            .iter()
            .filter(|e| e.state == pb::TaskState::Succeeded as i32)
            .count()
    };
    tokio::time::timeout(common::EVENT_TIMEOUT, async {
        while succeeded(&events) < 2 {
            events.push(first.message().await.unwrap().unwrap());
        }
    })
    .await
    .expect("both no-ops succeeded");
    assert!(
        events.iter().all(|e| e.task_id != ids[1]),
        "name filter let the sleep through"
    );
    assert!(events.iter().all(|e| e.queue == "research"));
    drop(first);
    // resume after the first event: the second event comes next
    let mut resumed = c
        .watch_tasks(watch(events[0].resume_token.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut again = Vec::new();
    for _ in 1..events.len() {
        let e = tokio::time::timeout(common::EVENT_TIMEOUT, resumed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        again.push((e.task_id, e.state));
    }
    let expected: Vec<(String, i32)> = events[1..]
        .iter()
        .map(|e| (e.task_id.clone(), e.state))
        .collect();
    assert_eq!(again, expected);
    let err = c.watch_tasks(watch("garbage".into())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Two `koo worker` processes drain one queue of 2000 tasks: every task
/// succeeds after exactly one attempt, and both processes took part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_drain_a_queue_exactly_once() {
    let koo = start(0).await;
    let (redis, server) = (koo.redis(), &koo.server);
    let mut c = client(server);
    let mut ids = Vec::new();
    for _ in 0..20 {
        let batch = pb::SubmitTasksRequest {
            tasks: (0..100)
                .map(|_| submit("koo.diagnostics.noop", serde_json::json!({})))
                .collect(),
        };
        ids.extend(
            c.submit_tasks(batch)
                .await
                .unwrap()
                .into_inner()
                .tasks
                .into_iter()
                .map(|t| t.id),
        );
    }
    let mut workers = [worker(redis), worker(redis)];
    let mut by_worker = std::collections::HashMap::<String, usize>::new();
    for id in &ids {
        let done = wait_task(&mut c, id, is_final).await;
        assert_eq!(
            (done.state, done.attempts),
            (pb::TaskState::Succeeded as i32, 1),
            "{id}"
        );
        let process = done.attempt_log[0]
            .worker
            .rsplit_once('/')
            .unwrap()
            .0
            .to_owned();
        *by_worker.entry(process).or_default() += 1;
    }
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert_eq!(
        by_worker.len(),
        2,
        "both processes should have worked: {by_worker:?}"
    );
    let metrics = c
        .get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    let research = metrics
        .queues
        .iter()
        .find(|q| q.queue == "research")
        .unwrap();
    assert_eq!(
        (research.submitted, research.succeeded, research.lost),
        (2000, 2000, 0)
    );
}

/// WatchTask shows every state change, including those a single step
/// passes through: a retried task goes SCHEDULED, QUEUED, RUNNING again.
async fn watch_task_shows_every_state_of_a_retry(backend: Backend) {
    let koo = start_on(backend, 1).await;
    let server = &koo.server;
    let mut c = client(server);
    let task = c
        .submit_task(pb::SubmitTaskRequest {
            countdown: Some(millis(200)),
            ..submit(
                "koo.diagnostics.fail_times",
                serde_json::json!({ "failures": 1 }),
            )
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let mut stream = c
        .watch_task(pb::WatchTaskRequest { task_id: task.id })
        .await
        .unwrap()
        .into_inner();
    let mut states = Vec::new();
    tokio::time::timeout(common::EVENT_TIMEOUT, async {
        while let Some(msg) = stream.message().await.unwrap() {
            let state = msg.task.unwrap().state;
            if states.last() != Some(&state) {
                states.push(state);
            }
        }
    })
    .await
    .expect("stream ended");
    use pb::TaskState as S;
    let expected: Vec<i32> = [
        S::Scheduled,
        S::Queued,
        S::Running,
        S::Scheduled,
        S::Queued,
        S::Running,
        S::Succeeded,
    ]
    .map(|s| s as i32)
    .to_vec();
    assert_eq!(states, expected);
}

/// Watches opened as their tasks run (the events just before a watch's
/// first read arrive after it, and a read can be ahead of its event): no
/// message steps back to an earlier state, and none has what only the end
/// has (a result, an end time) before the end.
async fn watch_task_messages_are_each_true_and_in_order(backend: Backend) {
    let koo = start_on(backend, 4).await;
    let mut c = client(&koo.server);
    let stage = |s: i32| match pb::TaskState::try_from(s).unwrap() {
        pb::TaskState::Pending | pb::TaskState::Scheduled => 0,
        pb::TaskState::Queued => 1,
        pb::TaskState::Running => 2,
        _ => 3,
    };
    let mut watches = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let task = submit_ok(
            &mut c,
            submit(
                "koo.diagnostics.sleep",
                serde_json::json!({ "seconds": 0.01, "steps": 2 }),
            ),
        )
        .await;
        let mut c = c.clone();
        watches.spawn(async move {
            let mut stream = c
                .watch_task(pb::WatchTaskRequest { task_id: task.id })
                .await
                .unwrap()
                .into_inner();
            let mut seen = Vec::new();
            while let Some(msg) = stream.message().await.unwrap() {
                seen.push(msg.task.unwrap());
            }
            seen
        });
    }
    let all = tokio::time::timeout(common::EVENT_TIMEOUT, watches.join_all())
        .await
        .expect("every watch ends");
    for seen in all {
        let states: Vec<i32> = seen.iter().map(|t| t.state).collect();
        assert!(
            states.windows(2).all(|w| stage(w[0]) <= stage(w[1])),
            "a step back: {states:?}"
        );
        assert_eq!(states.last(), Some(&(pb::TaskState::Succeeded as i32)));
        for t in &seen[..seen.len() - 1] {
            assert!(
                t.result.is_none() && t.end_time.is_none(),
                "an end before the end: {t:?}"
            );
        }
    }
}

/// The cache's Cleanup, Warm and StartMaintenance submit built-in tasks in
/// the `cache` queue whose results are their reports; database maintenance
/// removes history older than asked, with the stored results.
async fn upkeep_runs_as_tasks(backend: Backend) {
    use koo::pb::cache::v1 as cache;
    let koo = start_on(backend, 2).await;
    let mut c = client(&koo.server);
    let mut cc = koo.server.cache();
    let cleanup = cc
        .cleanup(cache::CleanupRequest { wait: false })
        .await
        .unwrap()
        .into_inner();
    assert!(cleanup.report.is_none(), "no report without wait");
    let done = wait_task(&mut c, &cleanup.task_id, is_final).await;
    assert_eq!(
        (done.name.as_str(), done.queue.as_str(), done.state),
        (
            "koo.tasks.cache.cleanup",
            "cache",
            pb::TaskState::Succeeded as i32
        )
    );
    let Some(prost_types::value::Kind::StructValue(report)) = done.result.unwrap().kind else {
        panic!("the result is the cleanup report")
    };
    assert!(report.fields.contains_key("scanned"), "{report:?}");
    // Warm carries its entries to the task; with wait, the report comes back
    let warm = cc
        .warm(cache::WarmRequest {
            entries: vec![cache::CacheEntry {
                level: cache::CacheLevel::Db as i32,
                key: "k".into(),
                value: Some(cache::CacheValue {
                    kind: Some(cache::cache_value::Kind::Raw(vec![0u8, 255].into())),
                }),
                ttl: None,
                ..Default::default()
            }],
            skip_file: true,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(warm.report.unwrap().loaded, 1);
    let got = cc
        .get(cache::GetRequest {
            level: cache::CacheLevel::Db as i32,
            key: "k".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.value.unwrap().kind,
        Some(cache::cache_value::Kind::Raw(vec![0u8, 255].into()))
    );
    // more than a task carries is refused up front
    let big = cache::CacheEntry {
        level: cache::CacheLevel::Db as i32,
        key: "big".into(),
        value: Some(cache::CacheValue {
            kind: Some(cache::cache_value::Kind::Text("x".repeat(2 * 1024 * 1024))),
        }),
        ttl: None,
        ..Default::default()
    };
    let err = cc
        .warm(cache::WarmRequest {
            entries: vec![big],
            skip_file: true,
            wait: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "entries"
    );
    let maintenance = cc
        .start_maintenance(cache::StartMaintenanceRequest { wait: true })
        .await
        .unwrap()
        .into_inner();
    assert!(maintenance.report.unwrap().cleanup.is_some());
    // database maintenance: everything that ended so far is older than 0 h
    let trim = c
        .submit_task(pb::SubmitTaskRequest {
            category: pb::TaskCategory::Database as i32,
            ..submit(
                "koo.tasks.database.maintenance",
                serde_json::json!({ "older_than_hours": 0 }),
            )
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let trimmed = wait_task(&mut c, &trim.id, is_final).await;
    assert_eq!(
        trimmed.state,
        pb::TaskState::Succeeded as i32,
        "{trimmed:?}"
    );
    let report = koo::grpc::json::to_json(&trimmed.result.unwrap()).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        report["queues"]["cache"]["removed_history"], 3.0,
        "{report}"
    );
    let err = c
        .get_task(pb::GetTaskRequest {
            task_id: cleanup.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "its stored result went too");
    let history = c
        .list_task_history(pb::ListTaskHistoryRequest {
            category: pb::TaskCategory::Cache as i32,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(history.tasks.is_empty(), "{history:?}");
}

/// Redis killed under task load (SIGKILL) and restarted from its AOF
/// (`appendfsync always`): every submit that returned OK survives and runs to
/// SUCCEEDED (tasks caught mid-run come back when their leases lapse); the
/// calls made while Redis was down failed fast with UNAVAILABLE or
/// DEADLINE_EXCEEDED, and none hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_loses_no_acknowledged_task() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap().to_owned();
    let mut redis = TestRedis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir_arg,
    ])
    .await;
    let server = spawn_on(&redis, 2).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<String, Code>>();
    let stop = tokio_util::sync::CancellationToken::new();
    let submitter = {
        let mut c = client(&server);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            while !stop.is_cancelled() {
                let mut req = tonic::Request::new(submit(
                    "koo.diagnostics.sleep",
                    serde_json::json!({ "seconds": 0.01, "steps": 1 }),
                ));
                req.set_timeout(Duration::from_secs(2));
                let started = tokio::time::Instant::now();
                let reply = c.submit_task(req).await;
                slowest = slowest.max(started.elapsed());
                let sent = match reply {
                    Ok(r) => tx.send(Ok(r.into_inner().task.unwrap().id)),
                    Err(e) => {
                        let sent = tx.send(Err(e.code()));
                        // do not spin while Redis is down
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        sent
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            slowest
        })
    };
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    let mut next =
        async |acked: &mut Vec<String>, refused: &mut Vec<Code>| match tokio::time::timeout(
            common::EVENT_TIMEOUT,
            rx.recv(),
        )
        .await
        .expect("the submitter stalled")
        .expect("the submitter stopped")
        {
            Ok(id) => acked.push(id),
            Err(code) => refused.push(code),
        };
    while acked.len() < 200 {
        next(&mut acked, &mut refused).await;
    }
    redis.kill();
    let before = refused.len();
    while refused.len() < before + 10 {
        next(&mut acked, &mut refused).await;
    }
    redis.restart().await;
    let after_restart = acked.len();
    while acked.len() < after_restart + 200 {
        next(&mut acked, &mut refused).await;
    }
    stop.cancel();
    let slowest = submitter.await.unwrap();
    while let Ok(r) = rx.try_recv() {
        match r {
            Ok(id) => acked.push(id),
            Err(code) => refused.push(code),
        }
    }
    assert!(
        slowest < Duration::from_secs(3),
        "a submit hung for {slowest:?}"
    );
    assert!(
        refused
            .iter()
            .all(|c| matches!(c, Code::Unavailable | Code::DeadlineExceeded)),
        "{refused:?}"
    );
    let mut c = client(&server);
    for id in &acked {
        let done = wait_task(&mut c, id, is_final).await;
        assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    }
}

/// Redis restarted empty (no persistence): the tasks it held are gone, but
/// koo notices nothing it cannot handle: submits work again once Redis is
/// back (scripts are reloaded), and the new tasks run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_again_after_redis_restarts_empty() {
    let mut koo = start(1).await;
    let mut c = client(&koo.server);
    let before = c
        .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    wait_task(&mut c, &before.id, is_final).await;
    koo.redis.as_mut().unwrap().restart().await;
    koo.server.wait_health("", ServingStatus::Serving).await;
    // the first calls after the restart may still meet the breaker's
    // cool-down; a submit succeeds within the event timeout
    let until = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    let after = loop {
        match c
            .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
            .await
        {
            Ok(r) => break r.into_inner().task.unwrap(),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(
                    tokio::time::Instant::now() < until,
                    "never recovered: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let done = wait_task(&mut c, &after.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    let err = c
        .get_task(pb::GetTaskRequest { task_id: before.id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "the empty Redis forgot it");
}

/// A WatchTasks resume token older than the events a queue still keeps is
/// refused with OUT_OF_RANGE, rather than resuming with a silent gap.
async fn resuming_past_the_kept_events_is_out_of_range(backend: Backend) {
    let koo = match backend {
        Backend::Memory => {
            let mut settings = test_settings(memory_settings());
            settings.tasks.redis = None;
            short_intervals(&mut settings, 2);
            settings.tasks.config.limits.events = 10;
            let server = TestServer::spawn(settings).await;
            server.wait_health("", ServingStatus::Serving).await;
            Koo {
                redis: None,
                server,
                cluster: None,
            }
        }
        Backend::Redis => {
            let redis = TestRedis::start().await;
            let mut settings = test_settings(redis_settings(&redis.url()));
            short_intervals(&mut settings, 2);
            settings.tasks.config.limits.events = 10;
            let server = TestServer::spawn(settings).await;
            server.wait_health("", ServingStatus::Serving).await;
            Koo {
                redis: Some(redis),
                server,
                cluster: None,
            }
        }
        Backend::Cluster => unreachable!("not a cluster scenario"),
    };
    let mut c = client(&koo.server);
    let watch = |token: String| pb::WatchTasksRequest {
        categories: vec![pb::TaskCategory::Research as i32],
        name: String::new(),
        resume_token: token,
    };
    let mut stream = c
        .watch_tasks(watch(String::new()))
        .await
        .unwrap()
        .into_inner();
    let first = c
        .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let token = tokio::time::timeout(common::EVENT_TIMEOUT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .resume_token;
    drop(stream);
    wait_task(&mut c, &first.id, is_final).await;
    // Redis trims whole stream nodes (100 entries): 300 tasks make 900 events
    let mut last = String::new();
    for _ in 0..3 {
        let batch = c
            .submit_tasks(pb::SubmitTasksRequest {
                tasks: (0..100)
                    .map(|_| submit("koo.diagnostics.noop", serde_json::json!({})))
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner()
            .tasks;
        last = batch.last().unwrap().id.clone();
    }
    wait_task(&mut c, &last, is_final).await;
    let err = c.watch_tasks(watch(token)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("without a resume token"), "{err:?}");
}

/// A task submitted with a cache target has its result cached under that
/// key by the time it reads SUCCEEDED; a warm file's `task` line submits such
/// a task, so warming computes the value.
async fn results_are_cached_and_warming_computes_values(backend: Backend) {
    use koo::pb::cache::v1 as cache;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("warm.jsonl");
    std::fs::write(
        &file,
        concat!(
            "{\"key\":\"plain\",\"text\":\"v\"}\n",
            "{\"level\":\"api\",\"key\":\"computed\",\"ttl\":\"10m\",",
            "\"task\":{\"name\":\"koo.diagnostics.fail_times\",\"category\":\"research\",\"kwargs\":{\"failures\":0}}}\n",
            "{\"key\":\"bad\",\"task\":{\"name\":\"x\",\"category\":\"nope\"}}\n",
        ),
    )
    .unwrap();
    let warm_file = file.clone();
    let koo = start_on_with(backend, 2, move |s| s.cache.warm_file = Some(warm_file)).await;
    let mut c = client(&koo.server);
    let mut cc = koo.server.cache();
    let target = |key: &str| pb::CacheTarget {
        level: cache::CacheLevel::Db as i32,
        key: key.into(),
        ttl: Some(millis(60000)),
        ..Default::default()
    };
    let task = c
        .submit_task(pb::SubmitTaskRequest {
            cache_result: Some(target("answer")),
            ..submit(
                "koo.diagnostics.fail_times",
                serde_json::json!({ "failures": 0 }),
            )
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.cache_result.as_ref().unwrap().key, "answer");
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    let get = |level: cache::CacheLevel, key: &str| cache::GetRequest {
        level: level as i32,
        key: key.into(),
    };
    let cached = cc
        .get(get(cache::CacheLevel::Db, "answer"))
        .await
        .unwrap()
        .into_inner();
    assert!(cached.found, "cached by the time it reads SUCCEEDED");
    let Some(cache::cache_value::Kind::Json(v)) = cached.value.unwrap().kind else {
        panic!("the result is cached as JSON")
    };
    assert_eq!(koo::grpc::json::to_json(&v).unwrap(), "{\"attempt\":1.0}");
    assert!(cached.ttl.unwrap().seconds <= 60);
    let err = c
        .submit_task(pb::SubmitTaskRequest {
            cache_result: Some(target("")),
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "cache_result.key"
    );
    assert!(err.message().contains("\"\" (0 bytes)"), "{err:?}");
    // warming: the task line is submitted, the bad one reported
    let report = cc
        .warm(cache::WarmRequest {
            entries: vec![],
            skip_file: false,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(report.loaded, 1, "{report:?}");
    assert_eq!(report.computed.len(), 1, "{report:?}");
    assert_eq!(report.computed[0].key, "computed");
    assert_eq!(report.computed[0].line, 2);
    assert_eq!(report.failures.len(), 1, "{report:?}");
    assert_eq!(report.failures[0].line, 3);
    assert!(report.failures[0].reason.contains("nope"), "{report:?}");
    let computed = wait_task(&mut c, &report.computed[0].task_id, is_final).await;
    assert_eq!(computed.state, pb::TaskState::Succeeded as i32);
    let value = cc
        .get(get(cache::CacheLevel::Api, "computed"))
        .await
        .unwrap()
        .into_inner();
    assert!(value.found);
    assert!(
        value.ttl.unwrap().seconds > 300,
        "the line's TTL (10m), not the level's (5m)"
    );
}

/// Waiting for an upkeep task that no worker serves (no built-in slots, no
/// `koo worker`) ends in a few seconds with FAILED_PRECONDITION saying so,
/// not at the bulk deadline (5 minutes); the task stays queued for a
/// worker to come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upkeep_wait_that_no_worker_serves_says_so() {
    use koo::pb::cache::v1 as cache;
    let koo = start_on(Backend::Memory, 0).await;
    let mut cc = koo.server.cache();
    let err = cc
        .cleanup(cache::CleanupRequest { wait: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("no worker serves koo.tasks.cache.cleanup"),
        "{err:?}"
    );
    let id = err
        .message()
        .split_whitespace()
        .nth(1)
        .expect("the message names the task")
        .to_owned();
    let task = get_ok(&mut client(&koo.server), &id).await;
    assert_eq!(task.state, pb::TaskState::Queued as i32);
    // served (a stream worker of the cleanup task, busy with the first
    // one): the second wait goes on past the unserved checks, to the
    // call's deadline, where the reply carries its task's id alone, as
    // documented
    let mut worker = crate::common::stream::StreamWorker::open(
        &koo.server,
        crate::common::stream::hello("upkeep", &["koo.tasks.cache.cleanup"], &["cache"], 1),
    )
    .await;
    let mut waiting = tonic::Request::new(cache::CleanupRequest { wait: true });
    waiting.set_timeout(std::time::Duration::from_millis(4500));
    let mut other = koo.server.cache();
    let call = tokio::spawn(async move { other.cleanup(waiting).await });
    let held = worker.task().await;
    let reply = call
        .await
        .unwrap()
        .expect("a served wait ends at its deadline, not as unserved")
        .into_inner();
    assert_eq!(reply.report, None, "{reply:?}");
    assert_eq!(held.task.map(|t| t.id), Some(id.clone()));
    assert!(
        !reply.task_id.is_empty() && reply.task_id != id,
        "{reply:?}"
    );
}

/// Within a queue, higher priority comes first and equal priorities in
/// submission order: the order ListActiveTasks shows is the order workers
/// lease in (the same sorted set).
async fn a_queue_orders_by_priority_then_submission(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| {
        s.tasks.config.extra_queues = vec![koo::domain::task::QueueName::parse("ordered").unwrap()];
    })
    .await;
    let mut c = client(&koo.server);
    use pb::TaskPriority as P;
    for (name, priority) in [
        ("low", P::Low),
        ("normal-1", P::Normal),
        ("critical", P::Critical),
        ("unspecified", P::Unspecified),
        ("high", P::High),
    ] {
        c.submit_task(pb::SubmitTaskRequest {
            priority: priority as i32,
            queue: "ordered".into(),
            ..submit(name, serde_json::json!({}))
        })
        .await
        .unwrap();
    }
    let listed = c
        .list_active_tasks(pb::ListActiveTasksRequest {
            queue: "ordered".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["critical", "high", "normal-1", "unspecified", "low"]
    );
}
