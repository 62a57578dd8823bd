//! Input validation end to end (issue 11, items 6, 7, 9 and 13; RELIABILITY
//! fault 24), over real gRPC on both stores: huge inputs are refused with a
//! short message, every duration and time field has a range, JSON doubles
//! come back bit for bit, deep JSON is refused naming the limit, task names
//! are printable, and ListSchedules refuses a page token it never issued.

use crate::common;

use common::tasks::*;
use koo::pb::cache::v1 as cpb;
use koo::pb::schedule::v1::{self as spb, schedule_service_client::ScheduleServiceClient};
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1::{self as wpb, worker_service_client::WorkerServiceClient};
use prost_types::value::Kind;
use prost_types::{Duration as PbDuration, Timestamp};
use tonic::{Code, Status};

on_both!(
    huge_inputs_get_short_messages,
    extreme_durations_are_refused,
    doubles_round_trip_exactly,
    filters_that_select_nothing_and_bad_keys_are_named,
);

/// Scenario: a listing of a queue koo does not serve and a history window
/// that ends before it starts are refused (not answered with an empty
/// list); a bad idempotency or rate-limit key is quoted in its refusal.
async fn filters_that_select_nothing_and_bad_keys_are_named(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut t = client(&koo.server);
    let r = t
        .list_active_tasks(pb::ListActiveTasksRequest {
            queue: "nope".into(),
            ..Default::default()
        })
        .await;
    refused("unknown queue", r, "queue");
    let at = |year_s: i64| {
        Some(prost_types::Timestamp {
            seconds: year_s,
            nanos: 0,
        })
    };
    let r = t
        .list_task_history(pb::ListTaskHistoryRequest {
            start_time: at(1_893_456_000), // 2030
            end_time: at(1_577_836_800),   // 2020
            ..Default::default()
        })
        .await;
    refused("a window ending before it starts", r, "end_time");
    let e = t
        .submit_task(pb::SubmitTaskRequest {
            idempotency_key: "k".repeat(300),
            ..research("x")
        })
        .await
        .expect_err("a 300-byte idempotency key");
    assert!(e.message().contains("(300 bytes)"), "{e:?}");
    let e = t
        .submit_task(pb::SubmitTaskRequest {
            rate_limit_key: "a\nb".into(),
            ..research("x")
        })
        .await
        .expect_err("a key with a newline");
    assert!(e.message().contains("\"a\\nb\""), "{e:?}");
}

/// Longest message a refusal of a huge input may carry.
const SHORT: usize = 512;

/// Asserts an INVALID_ARGUMENT naming `field` with a short message.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, Status>, field: &str) {
    let e = r.expect_err(what);
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "{what}: {}",
        clip(e.message())
    );
    assert!(
        e.message().len() <= SHORT,
        "{what}: message of {} bytes: {}",
        e.message().len(),
        clip(e.message())
    );
    assert!(
        e.message().contains(field),
        "{what}: message does not name {field}: {}",
        e.message()
    );
}

/// As [`refused`], and the input's length is said once: a quote of a long
/// input carries it, and no message says it twice.
fn refused_sized<T: std::fmt::Debug>(what: &str, r: Result<T, Status>, field: &str) {
    let e = r.expect_err(what);
    let message = e.message().to_owned();
    refused(what, Err::<T, _>(e), field);
    assert_eq!(
        message.matches("(1048576 bytes)").count(),
        1,
        "{what}: {}",
        clip(&message)
    );
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

fn schedules(koo: &Koo) -> ScheduleServiceClient<tonic::transport::Channel> {
    ScheduleServiceClient::new(koo.server.channel.clone())
}

fn workers(koo: &Koo) -> WorkerServiceClient<tonic::transport::Channel> {
    WorkerServiceClient::new(koo.server.channel.clone())
}

fn research(name: &str) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        name: name.into(),
        category: pb::TaskCategory::Research as i32,
        ..Default::default()
    }
}

/// Scenario: 1 MiB queue names, task ids, cron expressions, keys, schedule
/// names, patterns and page tokens are INVALID_ARGUMENT with a short message
/// naming the field (not RESOURCE_EXHAUSTED from an oversized trailer).
async fn huge_inputs_get_short_messages(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let huge = "q".repeat(1 << 20);
    let mut t = client(&koo.server);
    let mut c = koo.server.cache();
    let mut s = schedules(&koo);
    let r = t
        .submit_task(pb::SubmitTaskRequest {
            queue: huge.clone(),
            ..research("x")
        })
        .await;
    refused("queue", r, "queue");
    let r = t
        .submit_task(pb::SubmitTaskRequest {
            depends_on: vec![huge.clone()],
            ..research("x")
        })
        .await;
    refused("depends_on", r, "depends_on");
    let r = t
        .get_task(pb::GetTaskRequest {
            task_id: huge.clone(),
        })
        .await;
    refused("get task_id", r, "task_id");
    let r = t
        .cancel_task(pb::CancelTaskRequest {
            task_id: huge.clone(),
            ..Default::default()
        })
        .await;
    refused("cancel task_id", r, "task_id");
    let r = t
        .list_active_tasks(pb::ListActiveTasksRequest {
            page_token: huge.clone(),
            ..Default::default()
        })
        .await;
    refused("active page_token", r, "page_token");
    let r = t
        .list_task_history(pb::ListTaskHistoryRequest {
            page_token: huge.clone(),
            ..Default::default()
        })
        .await;
    refused("history page_token", r, "page_token");
    let r = t
        .watch_tasks(pb::WatchTasksRequest {
            resume_token: huge.clone(),
            ..Default::default()
        })
        .await;
    refused("resume_token", r, "resume_token");
    // a token koo did not issue says so, naming the field once
    let e = t
        .watch_tasks(pb::WatchTasksRequest {
            resume_token: "bm90IGEgdG9rZW4".into(),
            ..Default::default()
        })
        .await
        .expect_err("a foreign token");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "resume_token: \"bm90IGEgdG9rZW4\" is not a token this server issued"
        )
    );
    let r = c
        .get(cpb::GetRequest {
            key: huge.clone(),
            ..Default::default()
        })
        .await;
    refused("key", r, "key");
    let r = c
        .list_keys(cpb::ListKeysRequest {
            page_token: huge.clone(),
            ..Default::default()
        })
        .await;
    refused("keys page_token", r, "page_token");
    let r = s
        .create_schedule(spb::CreateScheduleRequest {
            schedule: Some(spb::Schedule {
                name: "huge-cron".into(),
                cron: huge.clone(),
                task: Some(spb::TaskTemplate {
                    name: "x".into(),
                    category: pb::TaskCategory::Research as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            paused: false,
        })
        .await;
    refused("cron", r, "cron");
    let r = s
        .get_schedule(spb::GetScheduleRequest { name: huge.clone() })
        .await;
    refused("schedule name", r, "name");
    let r = s
        .list_schedules(spb::ListSchedulesRequest {
            page_token: huge.clone(),
            ..Default::default()
        })
        .await;
    refused("schedules page_token", r, "page_token");
    huge_names_are_sized_once(&koo, &huge).await;
}

/// Names and keys of other RPCs, 1 MiB each: each refusal quotes the input
/// with its length once; an oversized value's names its field once.
async fn huge_names_are_sized_once(koo: &Koo, huge: &str) {
    let mut t = client(&koo.server);
    let mut c = koo.server.cache();
    let r = t
        .pause_queue(pb::PauseQueueRequest {
            queue: huge.into(),
            ..Default::default()
        })
        .await;
    refused_sized("pause queue", r, "queue");
    let r = t
        .resume_queue(pb::ResumeQueueRequest { queue: huge.into() })
        .await;
    refused_sized("resume queue", r, "queue");
    let r = t
        .submit_task(pb::SubmitTaskRequest {
            debounce_key: huge.into(),
            debounce_window: secs(1, 0),
            ..research("x")
        })
        .await;
    refused_sized("debounce key", r, "debounce_key");
    let r = t
        .set_rate_limit(pb::SetRateLimitRequest {
            rate_limit: Some(pb::RateLimit {
                name: huge.into(),
                limit: 1,
                period: secs(1, 0),
                ..Default::default()
            }),
        })
        .await;
    refused_sized("rate limit", r, "rate_limit.name");
    let r = t
        .submit_ai_query(pb::SubmitAiQueryRequest {
            provider: huge.into(),
            prompt: "hi".into(),
            ..Default::default()
        })
        .await;
    refused_sized("ai provider", r, "provider");
    let r = t
        .list_task_history(pb::ListTaskHistoryRequest {
            name: huge.into(),
            ..Default::default()
        })
        .await;
    refused_sized("history name", r, "name");
    let r = t
        .list_active_tasks(pb::ListActiveTasksRequest {
            name: huge.into(),
            ..Default::default()
        })
        .await;
    refused_sized("active name", r, "name");
    let r = t
        .watch_tasks(pb::WatchTasksRequest {
            name: huge.into(),
            ..Default::default()
        })
        .await;
    refused_sized("watch name", r, "name");
    let r = c
        .watch_invalidations(cpb::WatchInvalidationsRequest {
            key_prefix: huge.into(),
            ..Default::default()
        })
        .await;
    refused_sized("key prefix", r, "key_prefix");
    let big = "v".repeat((10 << 20) + 5);
    let r = c
        .set(cpb::SetRequest {
            key: "big".into(),
            value: Some(cpb::CacheValue {
                kind: Some(cpb::cache_value::Kind::Text(big)),
            }),
            ..Default::default()
        })
        .await;
    let e = r.expect_err("an 11 MiB value");
    assert!(
        e.message().starts_with("value: is "),
        "the field once: {}",
        clip(e.message())
    );
}

fn secs(seconds: i64, nanos: i32) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos })
}

/// Durations no field accepts: too long, nanos outside ±999,999,999, mixed
/// signs.
fn bad_durations() -> Vec<Option<PbDuration>> {
    vec![
        secs(i64::MAX, 0),
        secs(1_000_000_000_000, 0),
        secs(1, 2_000_000_000),
        secs(0, -1_000_000_000),
        secs(1, -1),
        secs(-1, 0),
    ]
}

/// Scenario: every duration and time field of a request refuses `i64::MAX`
/// seconds, unnormalised nanos and far-future times with INVALID_ARGUMENT
/// naming the field; the largest accepted limits give a task that can still
/// be read (on Redis, `i64::MAX` seconds used to poison it).
async fn extreme_durations_are_refused(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut t = client(&koo.server);
    let mut c = koo.server.cache();
    let mut s = schedules(&koo);
    let mut w = workers(&koo);
    for d in bad_durations() {
        let label = format!("{d:?}");
        for field in ["countdown", "soft_time_limit", "time_limit", "result_ttl"] {
            let mut req = research("x");
            match field {
                "countdown" => req.countdown = d,
                "soft_time_limit" => req.soft_time_limit = d,
                "time_limit" => req.time_limit = d,
                _ => req.result_ttl = d,
            }
            let r = t.submit_task(req).await;
            refused(&format!("{field} {label}"), r, field);
        }
        let r = t
            .submit_task(pb::SubmitTaskRequest {
                cache_result: Some(pb::CacheTarget {
                    key: "k".into(),
                    ttl: d,
                    ..Default::default()
                }),
                ..research("x")
            })
            .await;
        refused(&label, r, "cache_result.ttl");
        let r = t
            .submit_tasks(pb::SubmitTasksRequest {
                tasks: vec![pb::SubmitTaskRequest {
                    time_limit: d,
                    ..research("x")
                }],
            })
            .await;
        refused(&label, r, "tasks[0].time_limit");
        let r = t
            .cleanup_tasks(pb::CleanupTasksRequest {
                older_than: d,
                include_dead_letters: false,
                hours_old: 0,
            })
            .await;
        refused(&label, r, "older_than");
        let r = t
            .watch_task_metrics(pb::WatchTaskMetricsRequest { interval: d })
            .await;
        refused(&label, r, "interval");
        let r = c
            .set(cpb::SetRequest {
                key: "k".into(),
                value: Some(cpb::CacheValue {
                    kind: Some(cpb::cache_value::Kind::Text("v".into())),
                }),
                ttl: d,
                ..Default::default()
            })
            .await;
        refused(&label, r, "ttl");
        let entry = cpb::CacheEntry {
            key: "k".into(),
            value: Some(cpb::CacheValue {
                kind: Some(cpb::cache_value::Kind::Text("v".into())),
            }),
            ttl: d,
            ..Default::default()
        };
        let r = c
            .set_many(cpb::SetManyRequest {
                entries: vec![entry.clone()],
            })
            .await;
        refused(&label, r, "entries[0].ttl");
        let r = c
            .warm(cpb::WarmRequest {
                entries: vec![entry],
                skip_file: true,
                wait: false,
            })
            .await;
        refused(&label, r, "entries[0].ttl");
        let r = c
            .watch_metrics(cpb::WatchMetricsRequest { interval: d })
            .await;
        refused(&label, r, "interval");
        let r = w
            .lease_task(wpb::LeaseTaskRequest {
                worker_name: "w".into(),
                task_names: vec!["x".into()],
                wait: d,
                ..Default::default()
            })
            .await;
        refused(&label, r, "wait");
        // checked before the task is looked for: no lease needed
        let r = w
            .fail_task(wpb::FailTaskRequest {
                task_id: unknown_task_id(),
                message: "busy".into(),
                retryable: true,
                retry_delay: d,
                ..Default::default()
            })
            .await;
        refused(&label, r, "retry_delay");
        for field in ["task.soft_time_limit", "task.time_limit"] {
            let mut task = spb::TaskTemplate {
                name: "x".into(),
                category: pb::TaskCategory::Research as i32,
                ..Default::default()
            };
            if field == "task.time_limit" {
                task.time_limit = d;
            } else {
                task.soft_time_limit = d;
            }
            let r = s
                .create_schedule(spb::CreateScheduleRequest {
                    schedule: Some(spb::Schedule {
                        name: "limits".into(),
                        cron: "0 * * * *".into(),
                        task: Some(task),
                        ..Default::default()
                    }),
                    paused: false,
                })
                .await;
            refused(&format!("{field} {label}"), r, field);
        }
    }
    let far = [
        Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        },
        Timestamp {
            seconds: 4_000_000_000,
            nanos: 0,
        },
        Timestamp {
            seconds: 1,
            nanos: 1_000_000_000,
        },
        Timestamp {
            seconds: -100_000_000_000,
            nanos: 0,
        },
    ];
    for ts in far {
        let r = t
            .submit_task(pb::SubmitTaskRequest {
                eta: Some(ts),
                ..research("x")
            })
            .await;
        refused(&format!("eta {ts:?}"), r, "eta");
        if ts.seconds == 4_000_000_000 {
            // a far-future bound is a fine history filter
            continue;
        }
        let r = t
            .list_task_history(pb::ListTaskHistoryRequest {
                start_time: Some(ts),
                ..Default::default()
            })
            .await;
        refused(&format!("start_time {ts:?}"), r, "start_time");
        let r = t
            .list_task_history(pb::ListTaskHistoryRequest {
                end_time: Some(ts),
                ..Default::default()
            })
            .await;
        refused(&format!("end_time {ts:?}"), r, "end_time");
    }
    // The largest limits accepted still make a task that reads back.
    let task = submit_ok(
        &mut t,
        pb::SubmitTaskRequest {
            soft_time_limit: secs(30 * 86_400, 0),
            time_limit: secs(30 * 86_400, 0),
            result_ttl: secs(365 * 86_400, 0),
            countdown: secs(365 * 86_400, 0),
            ..research("x")
        },
    )
    .await;
    let read = get_ok(&mut t, &task.id).await;
    assert_eq!(read.time_limit, secs(30 * 86_400, 0));
    assert_eq!(read.state, pb::TaskState::Scheduled as i32);
    // a time limit alone, below the default soft limit (25 min), brings the
    // soft one down to it (Celery's `time_limit=` alone)
    let alone = submit_ok(
        &mut t,
        pb::SubmitTaskRequest {
            time_limit: secs(2, 0),
            countdown: secs(3600, 0),
            ..research("x")
        },
    )
    .await;
    let read = get_ok(&mut t, &alone.id).await;
    assert_eq!(
        (read.soft_time_limit, read.time_limit),
        (secs(2, 0), secs(2, 0))
    );
    // both given and contradicting each other: the soft one is named
    let r = t
        .submit_task(pb::SubmitTaskRequest {
            soft_time_limit: secs(5, 0),
            time_limit: secs(2, 0),
            ..research("x")
        })
        .await;
    let e = r.expect_err("a soft limit past the hard one");
    assert!(
        e.message().starts_with(
            "soft_time_limit: the soft time limit (5s) must not exceed the time limit (2s)"
        ),
        "{e:?}"
    );
}

/// Deterministic pseudo-random f64s (splitmix64 bit patterns), with the
/// awkward ones added: subnormals, ±0, 2^53±1, the extremes.
fn doubles(n: usize) -> Vec<f64> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut out = vec![
        0.0,
        -0.0,
        f64::MIN_POSITIVE,
        -f64::MIN_POSITIVE,
        f64::MAX,
        f64::MIN,
        f64::EPSILON,
        5e-324,
        -5e-324,
        2.225_073_858_507_201e-308,
        9_007_199_254_740_991.0,
        9_007_199_254_740_992.0,
        9_007_199_254_740_993.0,
        -9_007_199_254_740_993.0,
        1e21,
        1e300,
        0.424_519_189_142_513_96,
        123_456_789.123_456_79,
    ];
    while out.len() < n {
        let bits = next();
        let f = f64::from_bits(bits);
        if f.is_finite() {
            out.push(f);
        }
        // also uniform in [0, 1) and in a human range, where parsers err most
        let u = (next() >> 11) as f64 / (1u64 << 53) as f64;
        out.push(u);
        out.push(u * 1e9);
    }
    out
}

fn number_list(values: &[f64]) -> Vec<prost_types::Value> {
    values
        .iter()
        .map(|&f| prost_types::Value {
            kind: Some(Kind::NumberValue(f)),
        })
        .collect()
}

/// The doubles of a JSON list, as bit patterns.
fn bits_of(values: &[prost_types::Value]) -> Vec<u64> {
    values
        .iter()
        .map(|v| match v.kind {
            Some(Kind::NumberValue(f)) => f.to_bits(),
            ref other => panic!("not a number: {other:?}"),
        })
        .collect()
}

fn list_of(v: Option<prost_types::Value>) -> Vec<prost_types::Value> {
    match v.and_then(|v| v.kind) {
        Some(Kind::ListValue(l)) => l.values,
        other => panic!("not a list: {other:?}"),
    }
}

/// Asserts two lists of doubles are identical bit for bit, naming the first
/// difference.
fn same_bits(what: &str, want: &[f64], got: &[u64]) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    for (w, g) in want.iter().zip(got) {
        assert_eq!(
            w.to_bits(),
            *g,
            "{what}: {w:e} came back as {:e}",
            f64::from_bits(*g)
        );
    }
}

/// Scenario: thousands of random doubles (and subnormals, ±0, 2^53±1,
/// f64::MAX, MIN_POSITIVE) come back bit for bit through cache Set/Get,
/// task args read with GetTask, args leased by an external worker, and the
/// result it completes with.
async fn doubles_round_trip_exactly(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let values = doubles(3000);
    let mut c = koo.server.cache();
    c.set(cpb::SetRequest {
        key: "doubles".into(),
        value: Some(cpb::CacheValue {
            kind: Some(cpb::cache_value::Kind::Json(prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: number_list(&values),
                })),
            })),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = c
        .get(cpb::GetRequest {
            key: "doubles".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let json = match got.value.and_then(|v| v.kind) {
        Some(cpb::cache_value::Kind::Json(j)) => Some(j),
        other => panic!("not JSON: {other:?}"),
    };
    same_bits("cache", &values, &bits_of(&list_of(json)));

    let mut t = client(&koo.server);
    let task = submit_ok(
        &mut t,
        pb::SubmitTaskRequest {
            args: number_list(&values),
            ..research("test.echo_doubles")
        },
    )
    .await;
    same_bits(
        "GetTask args",
        &values,
        &bits_of(&get_ok(&mut t, &task.id).await.args),
    );
    let mut w = workers(&koo);
    let leased = w
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "echo".into(),
            task_names: vec!["test.echo_doubles".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let held = leased.task.expect("a task to lease");
    same_bits("leased args", &values, &bits_of(&held.args));
    w.complete_task(wpb::CompleteTaskRequest {
        task_id: held.id.clone(),
        lease_token: leased.lease_token,
        lease_secret: String::new(),
        result: Some(prost_types::Value {
            kind: Some(Kind::ListValue(prost_types::ListValue {
                values: held.args,
            })),
        }),
    })
    .await
    .unwrap();
    let done = get_ok(&mut t, &task.id).await;
    same_bits("result", &values, &bits_of(&list_of(done.result)));
}

/// A JSON value nested `depth` lists deep.
fn nested_list(depth: usize) -> prost_types::Value {
    let mut v = prost_types::Value {
        kind: Some(Kind::NumberValue(1.0)),
    };
    for _ in 0..depth {
        v = prost_types::Value {
            kind: Some(Kind::ListValue(prost_types::ListValue { values: vec![v] })),
        };
    }
    v
}

/// A JSON value nested `depth` objects deep.
fn nested_object(depth: usize) -> prost_types::Value {
    let mut v = prost_types::Value {
        kind: Some(Kind::NumberValue(1.0)),
    };
    for _ in 0..depth {
        v = prost_types::Value {
            kind: Some(Kind::StructValue(prost_types::Struct {
                fields: [("a".to_owned(), v)].into(),
            })),
        };
    }
    v
}

fn json_set(v: prost_types::Value) -> cpb::SetRequest {
    cpb::SetRequest {
        key: "deep".into(),
        value: Some(cpb::CacheValue {
            kind: Some(cpb::cache_value::Kind::Json(v)),
        }),
        ..Default::default()
    }
}

/// Scenario: JSON nested deeper than koo's documented limit (32 levels) is
/// refused with a message naming the limit, whether prost's own recursion
/// limit trips first (50 levels) or not (33 levels); 32 levels are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_is_refused_naming_the_limit() {
    let koo = start_on(Backend::Memory, 0).await;
    let mut c = koo.server.cache();
    for (what, v) in [
        ("lists 50", nested_list(50)),
        ("objects 50", nested_object(50)),
        ("lists 33", nested_list(33)),
        ("objects 33", nested_object(33)),
    ] {
        let e = c.set(json_set(v)).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.message());
        assert!(e.message().contains("32 levels"), "{what}: {}", e.message());
    }
    c.set(json_set(nested_list(32))).await.unwrap();
    c.set(json_set(nested_object(32))).await.unwrap();
    let mut t = client(&koo.server);
    let e = t
        .submit_task(pb::SubmitTaskRequest {
            args: vec![nested_object(40)],
            ..research("x")
        })
        .await
        .expect_err("deep args");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("32 levels"), "{}", e.message());
}

/// Scenario: task names with NUL or other control characters are refused
/// (names end up in logs, metrics labels and dashboards), on submit and in
/// a schedule's template; printable non-ASCII names are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_names_must_be_printable() {
    let koo = start_on(Backend::Memory, 0).await;
    let mut t = client(&koo.server);
    let mut s = schedules(&koo);
    for bad in ["a\0b", "line\nbreak", "tab\there", "del\u{7f}", "c1\u{85}"] {
        let r = t.submit_task(research(bad)).await;
        refused(&format!("{bad:?}"), r, "name");
        let r = s
            .create_schedule(spb::CreateScheduleRequest {
                schedule: Some(spb::Schedule {
                    name: "bad-name".into(),
                    cron: "0 * * * *".into(),
                    task: Some(spb::TaskTemplate {
                        name: bad.into(),
                        category: pb::TaskCategory::Research as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                paused: false,
            })
            .await;
        refused(&format!("template {bad:?}"), r, "task.name");
    }
    submit_ok(&mut t, research("tâche.été-✓")).await;
}

/// Scenario: ListSchedules refuses a page token it did not issue, as the
/// other listings do, and still pages with the tokens it issues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_schedules_refuses_garbage_tokens() {
    let koo = start_on(Backend::Memory, 0).await;
    let mut s = schedules(&koo);
    for name in ["page-a", "page-b"] {
        s.create_schedule(spb::CreateScheduleRequest {
            schedule: Some(spb::Schedule {
                name: name.into(),
                cron: "0 * * * *".into(),
                task: Some(spb::TaskTemplate {
                    name: "x".into(),
                    category: pb::TaskCategory::Research as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            paused: false,
        })
        .await
        .unwrap();
    }
    for bad in ["garbage token!", "\u{1}", "zzz"] {
        let r = s
            .list_schedules(spb::ListSchedulesRequest {
                page_token: bad.into(),
                ..Default::default()
            })
            .await;
        refused(bad, r, "page_token");
    }
    let first = s
        .list_schedules(spb::ListSchedulesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.schedules.len(), 1);
    assert!(!first.next_page_token.is_empty());
    let second = s
        .list_schedules(spb::ListSchedulesRequest {
            page_size: 1,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.schedules.len(), 1);
    assert_ne!(second.schedules[0].name, first.schedules[0].name);
}
