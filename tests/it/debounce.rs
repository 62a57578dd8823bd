//! Debounced submits (issue 18) end to end, on the embedded store and on
//! a real Redis: a burst of submits with one `debounce_key` makes one task,
//! which runs once with the last submit's arguments at the end of the
//! window; once it has started (or ended) the key makes a new task.

use crate::common;

use std::collections::HashSet;
use std::time::SystemTime;

use common::tasks::*;
use futures::StreamExt;
use koo::pb::tasks::v1 as pb;
use tonic::Code;

on_both!(
    a_burst_runs_once_with_the_last_arguments,
    a_queued_task_is_replaced_and_scheduled_again,
    a_started_or_ended_task_lets_go_of_its_key,
    keys_are_per_key_and_per_queue,
    concurrent_submits_make_one_task,
    bad_debounced_submits_are_refused,
);

// the scenarios that apply on a Redis Cluster too
crate::on_cluster_too!(concurrent_submits_make_one_task,);

/// A submit of `kwargs` to echo, debounced by `key` over `window_ms`.
fn debounced(key: &str, window_ms: u64, kwargs: serde_json::Value) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        debounce_key: key.into(),
        debounce_window: Some(millis(window_ms)),
        ..submit("koo.diagnostics.echo", kwargs)
    }
}

async fn submit_reply(
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    req: pb::SubmitTaskRequest,
) -> (pb::Task, bool) {
    let r = c.submit_task(req).await.unwrap().into_inner();
    (r.task.unwrap(), r.deduplicated)
}

fn kwarg(t: &pb::Task, name: &str) -> serde_json::Value {
    let kwargs = t.kwargs.clone().unwrap_or_default();
    let v = koo::grpc::json::to_json(&prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(kwargs)),
    })
    .unwrap();
    serde_json::from_str::<serde_json::Value>(&v).unwrap()[name].clone()
}

fn ms(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("a time");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Ten submits with one key inside the window: one task (every answer
/// names it, all but the first deduplicated, each showing the arguments it
/// brought), rescheduled by each (a SCHEDULED event on its watch), which
/// runs once, not before the window after the last submit, with the last
/// submit's arguments; one task counted as submitted.
async fn a_burst_runs_once_with_the_last_arguments(backend: Backend) {
    let koo = start_on(backend, 1).await;
    let mut c = client(&koo.server);
    let window = 400;
    let (first, dedup) = submit_reply(
        &mut c,
        debounced("doc-7", window, serde_json::json!({ "result": 0 })),
    )
    .await;
    assert!(!dedup);
    assert_eq!(first.state, pb::TaskState::Scheduled as i32, "{first:?}");
    assert_eq!(first.debounce_key, "doc-7");
    let mut watch = c
        .watch_task(pb::WatchTaskRequest {
            task_id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // as stored (the first answer shows the submitting process's clock)
    let created = ms(&get_ok(&mut c, &first.id).await.create_time);
    let mut last_submit = 0;
    for i in 1..10 {
        last_submit = now_ms();
        let (task, dedup) = submit_reply(
            &mut c,
            debounced("doc-7", window, serde_json::json!({ "result": i })),
        )
        .await;
        assert!(dedup, "submit {i}");
        assert_eq!(task.id, first.id, "submit {i}");
        assert_eq!(task.state, pb::TaskState::Scheduled as i32);
        assert_eq!(
            kwarg(&task, "result").as_f64(),
            Some(f64::from(i)),
            "the answer shows submit {i}'s arguments"
        );
        assert_eq!(ms(&task.create_time), created, "its submit time stays");
    }
    // the replaces were announced: a SCHEDULED update with new arguments
    // (the watch may first send the task as it was when it opened)
    loop {
        let update = tokio::time::timeout(common::EVENT_TIMEOUT, watch.message())
            .await
            .expect("an event")
            .unwrap()
            .expect("the stream goes on")
            .task
            .unwrap();
        assert_eq!(update.state, pb::TaskState::Scheduled as i32, "{update:?}");
        if kwarg(&update, "result").as_f64() != Some(0.0) {
            break;
        }
    }
    let done = wait_task(&mut c, &first.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    let result = koo::grpc::json::to_json(done.result.as_ref().unwrap()).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&result)
            .unwrap()
            .as_f64(),
        Some(9.0),
        "the last submit's arguments ran: {result}"
    );
    assert_eq!(done.attempts, 1, "it ran once");
    assert!(
        ms(&done.start_time) >= last_submit + window as i64 - 5,
        "started {} ms after the last submit, before its window of {window} ms",
        ms(&done.start_time) - last_submit
    );
    let m = queue_metrics(&mut c, "research").await;
    assert_eq!(m.submitted, 1, "one task: {m:?}");
    assert_eq!(m.succeeded, 1, "{m:?}");
}

/// A debounced task that is due but not leased (QUEUED: its queue is
/// paused) still takes a submit: it is SCHEDULED again at the end of the
/// new window, and runs the last arguments once the queue resumes.
async fn a_queued_task_is_replaced_and_scheduled_again(backend: Backend) {
    let koo = start_on(backend, 1).await;
    let mut c = client(&koo.server);
    c.pause_queue(pb::PauseQueueRequest {
        queue: "research".into(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    let (first, _) = submit_reply(
        &mut c,
        debounced("q", 10, serde_json::json!({ "result": 1 })),
    )
    .await;
    wait_task(&mut c, &first.id, |t| {
        t.state == pb::TaskState::Queued as i32
    })
    .await;
    let (again, dedup) = submit_reply(
        &mut c,
        debounced("q", 60_000, serde_json::json!({ "result": 2 })),
    )
    .await;
    assert!(dedup);
    assert_eq!(again.id, first.id);
    assert_eq!(again.state, pb::TaskState::Scheduled as i32, "{again:?}");
    let m = queue_metrics(&mut c, "research").await;
    assert_eq!(
        (m.queued, m.scheduled),
        (0, 1),
        "out of the ready set: {m:?}"
    );
    // a short window again: due soon, and the queue resumes
    submit_reply(
        &mut c,
        debounced("q", 10, serde_json::json!({ "result": 3 })),
    )
    .await;
    c.resume_queue(pb::ResumeQueueRequest {
        queue: "research".into(),
    })
    .await
    .unwrap();
    let done = wait_task(&mut c, &first.id, is_final).await;
    let result = koo::grpc::json::to_json(done.result.as_ref().unwrap()).unwrap();
    assert_eq!(result.parse::<f64>().ok(), Some(3.0), "{done:?}");
    assert_eq!(done.attempts, 1);
}

/// Once its task has started, the key makes a new task (the running one
/// keeps its arguments); so it does once its task ended or was cancelled.
/// On Redis the queue's debounce hash is empty afterwards: nothing leaks.
async fn a_started_or_ended_task_lets_go_of_its_key(backend: Backend) {
    let koo = start_on(backend, 1).await;
    let mut c = client(&koo.server);
    let sleepy = |seconds: f64| pb::SubmitTaskRequest {
        name: "koo.diagnostics.sleep".into(),
        ..debounced(
            "k",
            20,
            serde_json::json!({ "seconds": seconds, "steps": 1 }),
        )
    };
    let (running, _) = submit_reply(&mut c, sleepy(30.0)).await;
    wait_task(&mut c, &running.id, |t| {
        t.state == pb::TaskState::Running as i32
    })
    .await;
    let (next, dedup) = submit_reply(&mut c, sleepy(0.0)).await;
    assert!(!dedup, "a started task does not take submits");
    assert_ne!(next.id, running.id);
    let still = get_ok(&mut c, &running.id).await;
    assert_eq!(
        kwarg(&still, "seconds"),
        30.0,
        "the running task kept its arguments"
    );
    c.cancel_task(pb::CancelTaskRequest {
        task_id: running.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    wait_task(&mut c, &next.id, is_final).await;
    // ended: a new task again (with the same key)
    let (third, dedup) = submit_reply(&mut c, debounced("k", 60_000, serde_json::json!({}))).await;
    assert!(!dedup);
    // cancelled before it started: the key is free
    c.cancel_task(pb::CancelTaskRequest {
        task_id: third.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let (fourth, dedup) = submit_reply(&mut c, debounced("k", 60_000, serde_json::json!({}))).await;
    assert!(!dedup);
    assert_ne!(fourth.id, third.id);
    c.cancel_task(pb::CancelTaskRequest {
        task_id: fourth.id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    wait_task(&mut c, &running.id, is_final).await;
    if backend == Backend::Redis {
        let mut conn = koo.redis().conn().await;
        let hashes: Vec<String> = redis::cmd("KEYS")
            .arg("*debounce*")
            .query_async(&mut conn)
            .await
            .unwrap();
        for hash in hashes {
            let left: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(&hash)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(left.is_empty(), "{hash} still holds {left:?}");
        }
    }
}

/// Different keys make different tasks; one key in two queues makes one
/// task in each (a key is per queue).
async fn keys_are_per_key_and_per_queue(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut ids = HashSet::new();
    for key in ["a", "b", "c"] {
        let (t, dedup) = submit_reply(&mut c, debounced(key, 60_000, serde_json::json!({}))).await;
        assert!(!dedup);
        ids.insert(t.id);
    }
    let (other_queue, dedup) = submit_reply(
        &mut c,
        pb::SubmitTaskRequest {
            category: pb::TaskCategory::Cache as i32,
            ..debounced("a", 60_000, serde_json::json!({}))
        },
    )
    .await;
    assert!(!dedup, "another queue, another task");
    assert_eq!(other_queue.queue, "cache");
    ids.insert(other_queue.id);
    assert_eq!(ids.len(), 4);
    // a key stands for one task name
    let err = c
        .submit_task(pb::SubmitTaskRequest {
            name: "koo.diagnostics.noop".into(),
            ..debounced("a", 60_000, serde_json::json!({}))
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("debounce_key"), "{err:?}");
}

/// Fifty submits of one key at once make one task: every answer names it,
/// exactly one not deduplicated; it holds one of the submits' arguments.
async fn concurrent_submits_make_one_task(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let c = client(&koo.server);
    let answers: Vec<(pb::Task, bool)> = futures::stream::iter(0..50)
        .map(|i| {
            let mut c = c.clone();
            async move {
                submit_reply(
                    &mut c,
                    debounced("burst", 60_000, serde_json::json!({ "result": i })),
                )
                .await
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let ids: HashSet<_> = answers.iter().map(|(t, _)| t.id.clone()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(answers.iter().filter(|(_, d)| !d).count(), 1);
    let mut c = c.clone();
    let m = queue_metrics(&mut c, "research").await;
    assert_eq!((m.submitted, m.scheduled), (1, 1), "{m:?}");
}

/// Bad debounced submits are INVALID_ARGUMENT naming the field, and store
/// nothing.
async fn bad_debounced_submits_are_refused(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let ok = || debounced("k", 1000, serde_json::json!({}));
    let cases: Vec<(pb::SubmitTaskRequest, &str)> = vec![
        (
            pb::SubmitTaskRequest {
                idempotency_key: "i".into(),
                ..ok()
            },
            "idempotency_key",
        ),
        (
            pb::SubmitTaskRequest {
                expire_after: Some(common::tasks::millis(60_000)),
                ..ok()
            },
            "expire_after",
        ),
        (
            pb::SubmitTaskRequest {
                debounce_window: None,
                ..ok()
            },
            "debounce_window",
        ),
        (
            pb::SubmitTaskRequest {
                debounce_key: String::new(),
                ..ok()
            },
            "debounce_window",
        ),
        (
            pb::SubmitTaskRequest {
                debounce_window: Some(millis(0)),
                ..ok()
            },
            "debounce_window",
        ),
        (
            pb::SubmitTaskRequest {
                debounce_window: Some(millis(24 * 3600 * 1000 + 1)),
                ..ok()
            },
            "debounce_window",
        ),
        (
            pb::SubmitTaskRequest {
                debounce_window: Some(prost_types::Duration {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..ok()
            },
            "debounce_window",
        ),
        (
            pb::SubmitTaskRequest {
                debounce_key: "x".repeat(257),
                ..ok()
            },
            "debounce_key",
        ),
        (
            pb::SubmitTaskRequest {
                countdown: Some(millis(5000)),
                ..ok()
            },
            "countdown",
        ),
        (
            pb::SubmitTaskRequest {
                depends_on: vec![unknown_task_id()],
                ..ok()
            },
            "depends_on",
        ),
    ];
    for (req, field) in cases {
        let err = c.submit_task(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
        assert!(err.message().len() < 1000, "bounded: {err:?}");
    }
    let err = c
        .submit_tasks(pb::SubmitTasksRequest { tasks: vec![ok()] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tasks[0].debounce_key"), "{err:?}");
    // a key of exactly 256 bytes is fine
    let (t, _) = submit_reply(
        &mut c,
        pb::SubmitTaskRequest {
            debounce_key: "x".repeat(256),
            ..ok()
        },
    )
    .await;
    assert_eq!(t.debounce_key.len(), 256);
    let m = queue_metrics(&mut c, "research").await;
    assert_eq!(m.submitted, 1, "only the good one was stored: {m:?}");
}

/// Fifty submits of one key through two koo processes on one Redis make
/// one task (the key lives in the queue's slot, read and written by one
/// script).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_across_two_instances_makes_one_task() {
    let koo = start(0).await;
    let other = spawn_on(koo.redis(), 0).await;
    let clients = [client(&koo.server), client(&other)];
    let answers: Vec<(pb::Task, bool)> = futures::stream::iter(0..50)
        .map(|i| {
            let mut c = clients[i % 2].clone();
            async move {
                submit_reply(
                    &mut c,
                    debounced("shared", 60_000, serde_json::json!({ "result": i })),
                )
                .await
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let ids: HashSet<_> = answers.iter().map(|(t, _)| t.id.clone()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(answers.iter().filter(|(_, d)| !d).count(), 1);
    let mut c = clients[0].clone();
    let m = queue_metrics(&mut c, "research").await;
    assert_eq!((m.submitted, m.scheduled), (1, 1), "{m:?}");
}

mod store {
    //! The debounced submit transition itself, on a real Redis (the Lua
    //! script) and on the embedded store (its twin), step by step.

    use std::time::Duration;

    use crate::common::TestRedis;
    use crate::common::tasks::queued_task;
    use koo::domain::task::{Priority, QueueName, State, Task};
    use koo::store::clock::Clock;
    use koo::store::tasks::{DebounceReply, TaskLimits, TaskStore};
    use koo::store::{Deadline, RedisConfig, RedisStore};

    fn later() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    fn keyed(queue: &QueueName, name: &str, kwargs: &str) -> Task {
        Task {
            kwargs: kwargs.into(),
            state: State::Scheduled,
            debounce_key: Some("k".into()),
            ..queued_task(queue, name, Priority::Normal, 0)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory() {
        let clock = Clock::system();
        scenario(TaskStore::memory_with_clock(clock.clone()), clock, None).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        let redis = TestRedis::start().await;
        let store = RedisStore::connect(&RedisConfig::new(redis.url())).unwrap();
        let clock = Clock::system();
        let tasks = TaskStore::redis_with_clock(store, "koo", clock.clone());
        scenario(tasks, clock, Some(&redis)).await;
    }

    /// Created, replaced (arguments and due time, the new id never
    /// stored), refused for another name, let go at lease (created
    /// again) and at a cancel (created again); on Redis the queue's hash
    /// holds only the last unstarted task.
    async fn scenario(s: TaskStore, clock: Clock, redis: Option<&TestRedis>) {
        let q = QueueName::parse("research").unwrap();
        let (limits, hour) = (TaskLimits::default(), Duration::from_secs(3600));
        let name = "koo.diagnostics.echo";
        let a = keyed(&q, name, r#"{"n":1}"#);
        let reply = s.submit_debounced(&a, hour, limits, later()).await.unwrap();
        assert_eq!(reply, DebounceReply::Created);
        let b = keyed(&q, name, r#"{"n":2}"#);
        let reply = s.submit_debounced(&b, hour, limits, later()).await.unwrap();
        assert_eq!(reply, DebounceReply::Replaced(a.id.clone()));
        let held = s.get(&a.id, later()).await.unwrap().unwrap();
        assert_eq!(
            (held.state, held.kwargs.as_str()),
            (State::Scheduled, r#"{"n":2}"#)
        );
        assert!(
            s.get(&b.id, later()).await.unwrap().is_none(),
            "b was not stored"
        );
        let other = keyed(&q, "koo.diagnostics.noop", "{}");
        match s
            .submit_debounced(&other, hour, limits, later())
            .await
            .unwrap()
        {
            DebounceReply::Conflict {
                id,
                name: held_name,
                category,
            } => {
                assert_eq!(
                    (id, held_name, category.as_str()),
                    (a.id.to_string(), name.to_owned(), "research")
                );
            }
            reply => panic!("{reply:?}"),
        }
        // not due before the window's end; then leased with the last arguments
        let lease = Duration::from_secs(60);
        assert!(
            s.lease(&q, "w", lease, &["*"], limits, later())
                .await
                .unwrap()
                .is_none()
        );
        clock.advance(hour + Duration::from_secs(1));
        let leased = s
            .lease(&q, "w", lease, &["*"], limits, later())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (leased.id.clone(), leased.kwargs.as_str()),
            (a.id.clone(), r#"{"n":2}"#)
        );
        let c = keyed(&q, name, "{}");
        let reply = s.submit_debounced(&c, hour, limits, later()).await.unwrap();
        assert_eq!(reply, DebounceReply::Created, "started: a new task");
        s.cancel(&c.id, "test", limits, later()).await.unwrap();
        let d = keyed(&q, name, "{}");
        let reply = s.submit_debounced(&d, hour, limits, later()).await.unwrap();
        assert_eq!(reply, DebounceReply::Created, "ended: a new task");
        let stats = s.queue_stats(&q, later()).await.unwrap();
        assert_eq!((stats.scheduled, stats.running), (1, 1), "{stats:?}");
        if let Some(redis) = redis {
            let mut conn = redis.conn().await;
            let keys = koo::keys::QueueKeys::new("koo", &q);
            let held: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(keys.debounce())
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(held, [("k".to_owned(), d.id.to_string())].into(), "only d");
        }
    }
}
