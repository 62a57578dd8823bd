//! Settings read from the environment by the koo processes themselves: the
//! seed's Celery `.env` starts `koo serve`, and `koo worker` writes task
//! results to the cache under the cache settings of its environment.

use crate::common;

use common::tasks::{client, spawn_on, submit, submit_ok, wait_task, worker_with};
use common::{ChildGuard as Guard, TestRedis, logged_addr, serve_logged};
use koo::pb::cache::v1 as cache_pb;
use koo::pb::tasks::v1 as pb;

/// Starts `koo serve` on an ephemeral port with `env` (and none of the
/// caller's configuration); its address and the log lines it wrote until it
/// announced it.
fn serve(env: &[(&str, &str)]) -> (Guard, String, Vec<String>) {
    let (served, lines) = serve_logged(env);
    let addr = logged_addr(&lines, "koo serving gRPC")
        .unwrap_or_else(|| panic!("koo serve did not start: {lines:#?}"));
    (served, addr, lines)
}

/// Keys of database `db` of `redis`.
async fn db_size(redis: &TestRedis, db: u8) -> i64 {
    let url = redis.url().replace("/0", &format!("/{db}"));
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap()
}

/// The seed's `.env`: CELERY_BROKER_URL on Redis db 1 and
/// CELERY_RESULT_BACKEND on db 2. koo starts, says once why results stay
/// beside their tasks, and a task and its result live on the broker (db 1),
/// nothing on db 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_env_with_separate_result_backend_starts() {
    let redis = TestRedis::start().await;
    let base = redis.url();
    let broker = base.replace("/0", "/1");
    let results = base.replace("/0", "/2");
    let (_koo, addr, lines) = serve(&[
        ("REDIS_URL", &base),
        ("CELERY_BROKER_URL", &broker),
        ("CELERY_RESULT_BACKEND", &results),
        ("KOO_NO_SCHEDULER", "true"),
    ]);
    let notes: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("RESULT_BACKEND"))
        .collect();
    assert_eq!(notes.len(), 1, "one note on the result backend: {lines:#?}");
    assert!(notes[0].contains("broker"), "{}", notes[0]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::task_service_client::TaskServiceClient::new(channel);
    let id = submit_ok(
        &mut c,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await
    .id;
    wait_task(&mut c, &id, |t| t.state == pb::TaskState::Succeeded as i32).await;
    assert!(db_size(&redis, 1).await > 0, "tasks live on the broker");
    assert_eq!(db_size(&redis, 2).await, 0, "nothing on the result backend");
}

/// A JSON result of `n` bytes or so that compresses well.
fn compressible(n: usize) -> serde_json::Value {
    serde_json::json!({ "text": "abc".repeat(n / 3) })
}

/// `koo worker` with CACHE_COMPRESSION_THRESHOLD=64 and
/// CACHE_MAX_VALUE_SIZE=2000 caches a task's 600-byte result compressed
/// (read back through a `koo serve` on the same Redis), and fails a task
/// whose result is larger than its value limit rather than caching it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_applies_cache_settings_from_env() {
    let redis = TestRedis::start().await;
    let server = spawn_on(&redis, 0).await;
    let _worker = Guard(worker_with(
        &redis,
        &[
            ("CACHE_COMPRESSION_THRESHOLD", "64"),
            ("CACHE_MAX_VALUE_SIZE", "2000"),
        ],
    ));
    let mut c = client(&server);
    let cached = |key: &str, n: usize| pb::SubmitTaskRequest {
        cache_result: Some(pb::CacheTarget {
            level: cache_pb::CacheLevel::App as i32,
            key: key.into(),
            ttl: None,
            ..Default::default()
        }),
        max_retries: Some(0),
        ..submit(
            "koo.diagnostics.echo",
            serde_json::json!({ "result": compressible(n) }),
        )
    };
    let small = c
        .submit_task(cached("small", 600))
        .await
        .unwrap()
        .into_inner();
    let large = c
        .submit_task(cached("large", 5000))
        .await
        .unwrap()
        .into_inner();
    let small = small.task.unwrap().id;
    let large = large.task.unwrap().id;
    wait_task(&mut c, &small, |t| {
        t.state == pb::TaskState::Succeeded as i32
    })
    .await;
    let got = server
        .cache()
        .get(cache_pb::GetRequest {
            level: cache_pb::CacheLevel::App as i32,
            key: "small".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
    assert!(
        got.stored_size_bytes < got.size_bytes,
        "compressed above 64 bytes: {} stored for {}",
        got.stored_size_bytes,
        got.size_bytes
    );
    let t = wait_task(&mut c, &large, |t| t.state == pb::TaskState::Failed as i32).await;
    let error = t.error.map(|e| e.message).unwrap_or_default();
    assert!(error.contains("could not be cached"), "{error}");
}

/// A Celery `.env`'s settings are read under their CELERY_* names: a bad
/// value is reported under the name the user wrote (not the koo name it
/// stands for), and Python's `True` is a boolean.
#[test]
fn celery_aliases_are_named_in_their_errors() {
    let refusal = |env: &[(&str, &str)]| {
        let out = common::koo_command()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .output()
            .expect("run koo serve");
        assert!(!out.status.success(), "koo served with {env:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let soft = refusal(&[("CELERY_TASK_SOFT_TIME_LIMIT", "2000")]);
    assert!(
        soft.contains("CELERY_TASK_SOFT_TIME_LIMIT: 2000s is longer than TASK_TIME_LIMIT"),
        "{soft}"
    );
    let prefetch = refusal(&[("CELERY_WORKER_PREFETCH_MULTIPLIER", "4")]);
    assert!(
        prefetch.contains("CELERY_WORKER_PREFETCH_MULTIPLIER: built-in workers"),
        "{prefetch}"
    );
    let acks = refusal(&[("CELERY_TASK_ACKS_LATE", "maybe")]);
    assert!(acks.contains("CELERY_TASK_ACKS_LATE: \"maybe\""), "{acks}");
    let (_koo, _addr, lines) = serve(&[("CELERY_TASK_ACKS_LATE", "True")]);
    assert!(!lines.iter().any(|l| l.contains("ERROR")), "{lines:#?}");
}
