//! The Redis circuit breaker under the faults of RELIABILITY.md that test it:
//! impatient clients while Redis is slow but up (fault 23), and recovery
//! after a Redis restart in every process kind (fault 26).

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::tasks::{KOO, client, is_final, short_intervals, submit, submit_ok, wait_task};
use common::{EVENT_TIMEOUT, TestRedis, TestServer, test_settings};
use koo::pb::cache::v1::cache_service_client::CacheServiceClient;
use koo::pb::cache::v1::{self as pb, CacheLevel, cache_value::Kind};
use koo::pb::tasks::v1::{self as tasks_pb, task_service_client::TaskServiceClient};
use koo::server::StoreSettings;
use koo::store::RedisConfig;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

/// The bound on recovery the tests assert: generous, so that a loaded
/// machine does not fail them; the promise is a second, and each test prints
/// what it measured.
const RECOVERY_BOUND: Duration = Duration::from_secs(3);

fn set_req(key: &str, text: &str) -> pb::SetRequest {
    pb::SetRequest {
        level: CacheLevel::App as i32,
        key: key.into(),
        value: Some(pb::CacheValue {
            kind: Some(Kind::Text(text.into())),
        }),
        ttl: None,
        ..Default::default()
    }
}

fn get_req(key: &str) -> pb::GetRequest {
    pb::GetRequest {
        level: CacheLevel::App as i32,
        key: key.into(),
    }
}

/// Redis settings as in production (5 s cool-down, 1 s connect bound, five
/// failures), with a small pool.
fn production_redis(url: &str) -> RedisConfig {
    RedisConfig {
        max_connections: 4,
        ..RedisConfig::new(url)
    }
}

/// Keeps Redis slow but up: `DEBUG SLEEP 0.02` back to back on a connection
/// of its own, until `stop`.
fn slow_down(mut conn: redis::aio::MultiplexedConnection, stop: CancellationToken) {
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let slept: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("0.02")
                .query_async(&mut conn)
                .await;
            if slept.is_err() {
                return; // the test is over and its Redis gone
            }
        }
    });
}

/// Calls that the test does not wait for: Gets and Sets with `deadline`,
/// paced by `pause`, until `stop`. The load a restart meets.
fn background_load(server: &TestServer, deadline: Duration, stop: CancellationToken) {
    let mut cache = server.cache();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let mut req = tonic::Request::new(get_req("load"));
            req.set_timeout(deadline);
            let _ = cache.get(req).await;
            // pacing of the load generator, not synchronisation
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

/// A SubmitTask and a Get with `deadline`: their error codes.
async fn impatient_calls(channel: Channel, deadline: Duration) -> Vec<Code> {
    let mut req = tonic::Request::new(submit("koo.diagnostics.noop", serde_json::json!({})));
    req.set_timeout(deadline);
    let submitted = TaskServiceClient::new(channel.clone())
        .submit_task(req)
        .await;
    let mut req = tonic::Request::new(get_req("k"));
    req.set_timeout(deadline);
    let got = CacheServiceClient::new(channel).get(req).await;
    [submitted.err(), got.err()]
        .into_iter()
        .flatten()
        .map(|e| e.code())
        .collect()
}

/// Health of `service` as one Check reads it now.
async fn health_now(server: &TestServer, service: &str) -> i32 {
    server
        .health()
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

/// Fault 23: bursts of SubmitTask and Get with 1-2 ms deadlines while Redis
/// answers in about 20 ms (a DEBUG SLEEP loop). Impatience is not an outage:
/// no call is refused UNAVAILABLE, the breaker stays closed with no failure
/// recorded, health stays SERVING, and the next patient caller succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impatient_clients_do_not_open_the_breaker() {
    let redis = TestRedis::start_with(&["--enable-debug-command", "local"]).await;
    // A long cool-down and a rare probe: had the breaker opened, the patient
    // calls below would be refused.
    let mut settings = test_settings(StoreSettings::Redis(RedisConfig {
        breaker_cooldown: Duration::from_secs(60),
        ..production_redis(&redis.url())
    }));
    settings.health_check_interval = Duration::from_secs(30);
    short_intervals(&mut settings, 0);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    let mut cache = server.cache();
    cache.set(set_req("k", "v")).await.unwrap();

    let stop = CancellationToken::new();
    slow_down(redis.conn().await, stop.clone());
    // The burst has a connection of its own: HTTP/2 servers close a
    // connection that sees many streams reset, and that is not under test.
    let burst = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Rounds of callers at once, so that their failures, if counted, would
    // be consecutive.
    let mut codes = Vec::new();
    for round in 0..4u64 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..10u64 {
            let deadline = Duration::from_millis(1 + (round + i) % 2);
            calls.spawn(impatient_calls(burst.clone(), deadline));
        }
        while let Some(results) = calls.join_next().await {
            codes.extend(results.unwrap());
        }
    }
    assert!(!codes.contains(&Code::Unavailable), "{codes:?}");

    // Redis is still slow: the patient callers succeed.
    assert_eq!(health_now(&server, "").await, ServingStatus::Serving as i32);
    let h = cache
        .get_health(pb::GetHealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.circuit_state, pb::CircuitState::Closed as i32, "{h:?}");
    assert!(h.last_error.is_empty(), "a failure was counted: {h:?}");
    let task = client(&server)
        .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .expect("a patient SubmitTask");
    assert!(task.into_inner().task.is_some());
    let got = cache.get(get_req("k")).await.expect("a patient Get");
    assert!(got.into_inner().found);
    stop.cancel();
}

/// Fault 26 for `koo serve` with production breaker settings and a rare
/// probe: Redis is killed under a load of impatient and patient calls, stays
/// down past a breaker cool-down's start, and comes back empty. koo reports
/// SERVING and answers a patient call well within the bound of Redis
/// answering again (a half-open trial cut short by its caller's deadline
/// must not hold recovery up for another cool-down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_recovers_promptly_after_a_redis_restart() {
    let mut redis = TestRedis::start().await;
    let mut settings = test_settings(StoreSettings::Redis(production_redis(&redis.url())));
    settings.health_check_interval = Duration::from_secs(30);
    short_intervals(&mut settings, 0);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    let stop = CancellationToken::new();
    background_load(&server, Duration::from_millis(2), stop.clone());
    background_load(&server, Duration::from_millis(100), stop.clone());

    redis.kill();
    server.wait_health("", ServingStatus::NotServing).await;
    // Liveness probes (Kubernetes) ask "liveness": an outage of Redis is no
    // reason to restart koo.
    assert_eq!(
        health_now(&server, koo::health::LIVENESS).await,
        ServingStatus::Serving as i32
    );
    // Down long enough for calls to meet the open breaker.
    let mut req = tonic::Request::new(get_req("k"));
    req.set_timeout(Duration::from_secs(1));
    let err = server.cache().get(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    redis.restart().await;
    let answering = Instant::now();
    server.wait_health("", ServingStatus::Serving).await;
    let serving = answering.elapsed();
    server
        .cache()
        .set(set_req("k", "back"))
        .await
        .expect("a patient Set after recovery");
    let recovered = answering.elapsed();
    println!("koo serve: SERVING {serving:?} and a call served {recovered:?} after Redis answered");
    assert!(recovered < RECOVERY_BOUND, "recovery took {recovered:?}");
    stop.cancel();
}

/// A `koo worker` or `koo scheduler` process (`kind`) on `redis` with its
/// production breaker settings, `env`, and its log lines sent to a channel.
fn koo_process(
    kind: &str,
    redis: &TestRedis,
    env: &[(&str, &str)],
) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(KOO)
        .arg(kind)
        .env("REDIS_URL", redis.url())
        .env("KOO_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn koo {kind}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // keep draining after the test stops listening
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Waits (off the runtime) for a log line containing `needle`; hands the
/// receiver back.
async fn wait_log(
    rx: std::sync::mpsc::Receiver<String>,
    needle: &'static str,
) -> std::sync::mpsc::Receiver<String> {
    tokio::task::spawn_blocking(move || {
        let until = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return rx,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?}: {e}"),
            }
        }
    })
    .await
    .unwrap()
}

/// Fault 26 for `koo worker`: its Redis is killed until the worker's own
/// breaker is open, then restarted; a task submitted once koo serve is back
/// runs on that worker (koo serve has no worker slots) within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_recovers_promptly_after_a_redis_restart() {
    let mut redis = TestRedis::start().await;
    let mut settings = test_settings(StoreSettings::Redis(production_redis(&redis.url())));
    short_intervals(&mut settings, 0);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    let worker_env = [
        ("KOO_WORKER_CONCURRENCY", "1"),
        ("KOO_WORKER_POLL_INTERVAL", "20ms"),
    ];
    let (mut worker, log) = koo_process("worker", &redis, &worker_env);
    let mut c = client(&server);
    let first = submit_ok(
        &mut c,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await;
    wait_task(&mut c, &first.id, is_final).await;

    redis.kill();
    let _log = wait_log(log, "circuit breaker is open").await;
    redis.restart().await;
    let answering = Instant::now();
    server.wait_health("", ServingStatus::Serving).await;
    let task = c
        .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .expect("submit after recovery")
        .into_inner()
        .task
        .unwrap();
    let done = wait_task(&mut c, &task.id, is_final).await;
    let recovered = answering.elapsed();
    assert_eq!(done.state, tasks_pb::TaskState::Succeeded as i32);
    println!("koo worker: a task ran {recovered:?} after Redis answered");
    assert!(recovered < RECOVERY_BOUND, "recovery took {recovered:?}");
    let _ = worker.kill();
    let _ = worker.wait();
}

/// Fault 26 for `koo serve` with its tasks on a Redis of their own
/// (`TASK_BROKER_URL`): that Redis is watched too. Killed, TaskService and
/// the server as a whole report NOT_SERVING while the cache keeps serving;
/// restarted, TaskService serves again and a patient SubmitTask succeeds
/// within the bound, with no call made in between to notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_task_redis_is_watched_and_recovers_promptly() {
    let cache_redis = TestRedis::start().await;
    let mut task_redis = TestRedis::start().await;
    let mut settings = test_settings(StoreSettings::Redis(production_redis(&cache_redis.url())));
    settings.tasks.redis = Some(production_redis(&task_redis.url()));
    settings.health_check_interval = Duration::from_secs(30);
    short_intervals(&mut settings, 0);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    server
        .wait_health("koo.tasks.v1.TaskService", ServingStatus::Serving)
        .await;

    task_redis.kill();
    server
        .wait_health("koo.tasks.v1.TaskService", ServingStatus::NotServing)
        .await;
    server.wait_health("", ServingStatus::NotServing).await;
    assert_eq!(
        health_now(&server, "koo.cache.v1.CacheService").await,
        ServingStatus::Serving as i32
    );

    task_redis.restart().await;
    let answering = Instant::now();
    server
        .wait_health("koo.tasks.v1.TaskService", ServingStatus::Serving)
        .await;
    let serving = answering.elapsed();
    client(&server)
        .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .expect("a patient SubmitTask after recovery");
    let recovered = answering.elapsed();
    println!(
        "task Redis: TaskService SERVING {serving:?}, a submit served {recovered:?} after Redis answered"
    );
    assert!(recovered < RECOVERY_BOUND, "recovery took {recovered:?}");
    assert_eq!(health_now(&server, "").await, ServingStatus::Serving as i32);
}

/// The next event of a task named `name` on a fresh WatchTasks stream.
async fn next_task_event(server: &TestServer, name: &str) {
    let mut events = client(server)
        .watch_tasks(tasks_pb::WatchTasksRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .expect("WatchTasks")
        .into_inner();
    let event = tokio::time::timeout(EVENT_TIMEOUT, events.message())
        .await
        .unwrap_or_else(|_| panic!("no task {name} within {EVENT_TIMEOUT:?}"));
    assert!(matches!(event, Ok(Some(_))), "{event:?}");
}

/// Fault 26 for `koo scheduler`: a per-second schedule fires; its Redis is
/// killed until the scheduler's own breaker is open, then restarted empty;
/// the scheduler stores its schedule again and a tick's task appears within
/// the bound (a tick comes every second, so up to a second of that is the
/// schedule's own wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_recovers_promptly_after_a_redis_restart() {
    const TICK: &str = "koo.tasks.health_check.run";
    let mut redis = TestRedis::start().await;
    let mut settings = test_settings(StoreSettings::Redis(production_redis(&redis.url())));
    settings.schedule.enabled = false;
    short_intervals(&mut settings, 0);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    let env = [
        ("KOO_SCHEDULE_HEALTH_CHECK", "* * * * * *"),
        ("KOO_SCHEDULE_CACHE_CLEANUP", "off"),
        ("KOO_SCHEDULE_CACHE_WARM", "off"),
        ("KOO_SCHEDULE_DATABASE_MAINTENANCE", "off"),
    ];
    let (mut scheduler, log) = koo_process("scheduler", &redis, &env);
    next_task_event(&server, TICK).await;

    redis.kill();
    let _log = wait_log(log, "circuit breaker is open").await;
    redis.restart().await;
    let answering = Instant::now();
    server.wait_health("", ServingStatus::Serving).await;
    next_task_event(&server, TICK).await;
    let recovered = answering.elapsed();
    println!("koo scheduler: a tick's task {recovered:?} after Redis answered");
    assert!(recovered < RECOVERY_BOUND, "recovery took {recovered:?}");
    let _ = scheduler.kill();
    let _ = scheduler.wait();
}
