//! koo on a primary found through Redis Sentinel (real `redis-server`
//! primary, replica and three Sentinels started by the test): the cache and
//! the task engine keep serving across a failover, whether the primary dies
//! (`kill -9`) or is demoted (`SENTINEL FAILOVER`, the old primary becomes
//! a replica and refuses writes with `READONLY`); a wrong master name or no
//! Sentinel at all gives NOT_SERVING and a clear UNAVAILABLE, not a hang.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::sentinel::{MASTER, TestSentinels};
use common::tasks::{client, is_final, short_intervals, submit, wait_task};
use common::{ChildGuard, EVENT_TIMEOUT, TestServer, redis_settings, test_settings};
use koo::pb::cache::v1::{self as pb, CacheLevel, cache_value::Kind};
use koo::pb::tasks::v1 as tpb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn text(s: &str) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(Kind::Text(s.into())),
    })
}

fn set(key: &str, value: &str) -> pb::SetRequest {
    pb::SetRequest {
        level: CacheLevel::Api as i32,
        key: key.into(),
        value: text(value),
        ttl: None,
        ..Default::default()
    }
}

fn get(key: &str) -> pb::GetRequest {
    pb::GetRequest {
        level: CacheLevel::Api as i32,
        key: key.into(),
    }
}

/// koo on `url` with `workers` built-in worker slots, once SERVING.
async fn koo_on(url: &str, workers: usize) -> TestServer {
    let mut settings = test_settings(redis_settings(url));
    short_intervals(&mut settings, workers);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    server
}

/// Sets `key` until koo accepts it (calls during the switch fail with
/// UNAVAILABLE and nothing else); returns how long that took.
async fn set_until_ok(server: &TestServer, key: &str, value: &str) -> Duration {
    let started = Instant::now();
    let mut cache = server.cache();
    loop {
        match cache.set(set(key, value)).await {
            Ok(_) => return started.elapsed(),
            Err(s) => assert!(
                matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded),
                "during a failover only UNAVAILABLE / DEADLINE_EXCEEDED: {s:?}"
            ),
        }
        assert!(started.elapsed() < EVENT_TIMEOUT, "koo never served again");
        // a retry loop of the client's own: there is no event to await
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits a no-op task and waits until it succeeded.
async fn run_task(server: &TestServer) {
    let mut tasks = client(server);
    let task = tasks
        .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .expect("submit")
        .into_inner()
        .task
        .unwrap();
    let done = wait_task(&mut tasks, &task.id, is_final).await;
    assert_eq!(done.state, tpb::TaskState::Succeeded as i32, "{done:?}");
}

/// A new `WatchInvalidations` stream (Redis Pub/Sub on the primary)
/// reports READY, then a change made through koo.
async fn watch_sees_a_change(server: &TestServer) {
    use pb::InvalidationKind;
    let mut cache = server.cache();
    let mut stream = cache
        .watch_invalidations(pb::WatchInvalidationsRequest {
            levels: vec![CacheLevel::Api as i32],
            key_prefix: "w:".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(EVENT_TIMEOUT, stream.message())
            .await
            .expect("a message within the timeout")
            .expect("the stream is healthy")
            .expect("the stream is open")
    };
    assert_eq!(next().await.kind(), InvalidationKind::Ready);
    cache.set(set("w:1", "v")).await.unwrap();
    let change = next().await;
    assert_eq!(change.kind(), InvalidationKind::Set, "{change:?}");
    assert_eq!(change.keys, ["w:1"]);
}

/// A `koo worker` process on `url`.
fn worker(url: &str) -> ChildGuard {
    ChildGuard(
        common::koo_command()
            .arg("worker")
            .env("REDIS_URL", url)
            .env("KOO_WORKER_CONCURRENCY", "1")
            .env("KOO_TASK_LEASE", "1s")
            .env("KOO_TASK_SWEEP_INTERVAL", "100ms")
            .env("KOO_WORKER_POLL_INTERVAL", "20ms")
            .env("KOO_REDIS_CONNECT_TIMEOUT", "500ms")
            .env("KOO_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn koo worker"),
    )
}

/// The primary is killed (`kill -9`): once the Sentinels promote the
/// replica, koo serves the cache again (with what was replicated before)
/// and a `koo worker` on the same URL runs tasks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_fails_over_and_koo_keeps_serving() {
    let mut deployment = TestSentinels::start().await;
    let url = deployment.url();
    let server = koo_on(&url, 0).await;
    let _worker = worker(&url);
    let mut cache = server.cache();
    cache.set(set("before", "v1")).await.unwrap();
    run_task(&server).await;
    deployment.wait_replicated(0).await;

    let old = deployment.redis[0].port;
    deployment.redis[0].kill();
    let took = set_until_ok(&server, "after", "v2").await;
    let promoted = deployment.wait_failover(old).await;
    assert_eq!(promoted, 1, "the replica is the new primary");
    eprintln!("koo served again {} ms after the kill", took.as_millis());

    let got = cache.get(get("before")).await.unwrap().into_inner();
    assert_eq!(got.value, text("v1"), "a replicated write survives");
    let got = cache.get(get("after")).await.unwrap().into_inner();
    assert_eq!(got.value, text("v2"));
    // the write went to the new primary
    let mut c = deployment.redis[1].conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*after*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the new primary holds the new entry");
    run_task(&server).await;
    watch_sees_a_change(&server).await;
    server.wait_health("", ServingStatus::Serving).await;
}

/// `SENTINEL FAILOVER`: the primary is demoted while running. It keeps
/// accepting writes until the Sentinels reconfigure it (about 8 s later),
/// so koo must not wait for an error: it follows the `+switch-master`
/// announcement, and its writes reach the new primary within moments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demoted_primary_is_followed() {
    let deployment = TestSentinels::start().await;
    let server = koo_on(&deployment.url(), 1).await;
    let mut cache = server.cache();
    cache.set(set("before", "v1")).await.unwrap();
    run_task(&server).await;
    deployment.wait_replicated(0).await;

    let old = deployment.redis[0].port;
    let mut s = deployment.sentinels[0].conn().await;
    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query_async(&mut s)
        .await
        .unwrap();
    let promoted = deployment.wait_failover(old).await;
    assert_eq!(promoted, 1);
    let switched = Instant::now();
    let mut new_primary = deployment.redis[1].conn().await;
    let mut i = 0;
    loop {
        let key = format!("after{i}");
        set_until_ok(&server, &key, "v2").await;
        let there: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*{key}"))
            .query_async(&mut new_primary)
            .await
            .unwrap();
        if !there.is_empty() {
            break;
        }
        assert!(
            switched.elapsed() < Duration::from_secs(3),
            "koo still writes to the demoted primary {:?} after the switch",
            switched.elapsed()
        );
        i += 1;
        // the announcement is being handled; nothing of koo's to await
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "koo wrote to the new primary {} ms after the Sentinels agreed",
        switched.elapsed().as_millis()
    );
    let got = cache.get(get("before")).await.unwrap().into_inner();
    assert_eq!(got.value, text("v1"));
    run_task(&server).await;
}

/// A master name the Sentinels do not know, or Sentinels that do not
/// answer: koo starts, reports NOT_SERVING, and a call fails fast with
/// UNAVAILABLE naming the master and the Sentinels (never a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_master_or_no_sentinel_is_not_serving() {
    let deployment = TestSentinels::start_with(0, 1).await;
    let nowhere = format!("redis+sentinel://127.0.0.1:{}/m", common::free_port());
    for (url, needle) in [
        (deployment.url_for("nope"), "\"nope\""),
        (nowhere, "Sentinels at"),
    ] {
        let settings = test_settings(redis_settings(&url));
        let server = TestServer::spawn(settings).await;
        server.wait_health("", ServingStatus::NotServing).await;
        let started = Instant::now();
        let err = server.cache().set(set("k", "v")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains(needle), "{url}: {err:?}");
        eprintln!("{url}: {}", err.message());
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "bounded by the request deadline: {:?}",
            started.elapsed()
        );
        // (not `shutdown`: a koo whose Redis never answered takes its
        // whole shutdown grace to stop, on a single server too)
        drop(server);
    }
}

/// Sentinels with a password of their own, and a primary with another:
/// the URL's user info is the primary's, `?sentinel_password=` the
/// Sentinels'; without it koo reports NOT_SERVING and says the Sentinels
/// refused, never showing a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_password_is_a_parameter() {
    let deployment = TestSentinels::start_secured(0, 1, Some("pr1mary"), Some("s3nt")).await;
    let hosts = format!("127.0.0.1:{}", deployment.sentinels[0].port);
    let url = format!("redis+sentinel://:pr1mary@{hosts}/{MASTER}/2?sentinel_password=s3nt");
    let server = koo_on(&url, 0).await;
    server.cache().set(set("k", "v")).await.unwrap();
    let mut c = deployment.redis[0].conn().await;
    let _: () = redis::cmd("AUTH")
        .arg("pr1mary")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("SELECT")
        .arg(2)
        .query_async(&mut c)
        .await
        .unwrap();
    let n: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert!(n > 0, "the entry is in database 2 of the primary");
    server.shutdown().await;

    let url = format!("redis+sentinel://:pr1mary@{hosts}/{MASTER}?sentinel_password=wrong");
    let server = TestServer::spawn(test_settings(redis_settings(&url))).await;
    server.wait_health("", ServingStatus::NotServing).await;
    let err = server.cache().set(set("k", "v")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("Sentinels at"), "{err:?}");
    for secret in ["wrong", "pr1mary", "s3nt"] {
        assert!(!err.message().contains(secret), "{err:?}");
    }
}

/// `koo worker` refuses a Sentinel URL it cannot parse, naming the setting
/// and never the password.
#[test]
fn bad_sentinel_url_is_refused_without_the_password() {
    let out = common::koo_command()
        .arg("worker")
        .env("REDIS_URL", "redis+sentinel://:secret@127.0.0.1:1/")
        .env("KOO_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
    assert!(stderr.contains("name the primary"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}

/// `rediss+sentinel://`: the Sentinel and the primary listen only on TLS
/// (`--port 0`); koo reaches both with the CA of `KOO_REDIS_TLS_CA`, serves
/// the cache and runs a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_sentinels_and_the_primary() {
    use common::certs::{Ca, CertDir};
    let ca = Ca::new("koo sentinel test CA");
    let dir = CertDir::new();
    let (cert, key) = dir.write_pair("redis", &ca.server("redis"));
    let ca_path = dir.write("ca.pem", &ca.cert);
    let path = |p: &std::path::Path| p.display().to_string();
    let bin = std::env::var("KOO_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let primary_port = common::free_port();
    let _primary = ChildGuard(
        std::process::Command::new(&bin)
            .args(["--port", "0", "--tls-port", &primary_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args([
                "--tls-cert-file",
                &path(&cert),
                "--tls-key-file",
                &path(&key),
            ])
            .args(["--tls-ca-cert-file", &path(&ca_path)])
            .args(["--tls-auth-clients", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a TLS redis-server"),
    );
    let sentinel_port = common::free_port();
    let conf = dir.write(
        "sentinel.conf",
        &format!(
            "port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\nprotected-mode no\ndir {d}\n\
             tls-cert-file {c}\ntls-key-file {k}\ntls-ca-cert-file {a}\n\
             tls-auth-clients no\ntls-replication yes\n\
             sentinel monitor {MASTER} 127.0.0.1 {primary_port} 1\n",
            d = path(dir.dir()),
            c = path(&cert),
            k = path(&key),
            a = path(&ca_path),
        ),
    );
    let _sentinel = ChildGuard(
        std::process::Command::new(&bin)
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a TLS Sentinel"),
    );
    let url = format!("rediss+sentinel://127.0.0.1:{sentinel_port}/{MASTER}");
    let koo::server::StoreSettings::Redis(mut redis) = redis_settings(&url) else {
        unreachable!()
    };
    redis.tls = Some(
        koo::store::redis::RedisTls::from_pem(Some(ca.cert.clone().into_bytes()), None, None)
            .unwrap(),
    );
    let mut settings = test_settings(koo::server::StoreSettings::Redis(redis));
    short_intervals(&mut settings, 1);
    let server = TestServer::spawn(settings).await;
    // the processes start and the Sentinel meets its primary meanwhile
    server.wait_health("", ServingStatus::Serving).await;
    let mut cache = server.cache();
    cache.set(set("k", "over TLS")).await.unwrap();
    let got = cache.get(get("k")).await.unwrap().into_inner();
    assert_eq!(got.value, text("over TLS"));
    run_task(&server).await;
}
