//! Backend-specific behaviour and the faults of RELIABILITY.md that concern
//! the cache: Redis killed, down at start-up, paused, full; several koo
//! instances on one Redis; cleanup; and the embedded store's expiry purge.

use crate::common;

use std::time::{Duration, Instant};

use common::{Env, TestRedis, TestServer, redis_settings, test_settings};
use koo::pb::cache::v1::{self as pb, CacheLevel, cache_value::Kind};
use redis::AsyncCommands;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn text(s: &str) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(Kind::Text(s.into())),
    })
}

fn set_req(level: CacheLevel, key: &str, value: Option<pb::CacheValue>) -> pb::SetRequest {
    pb::SetRequest {
        level: level as i32,
        key: key.into(),
        value,
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

/// A Get with a client deadline: returns the status and how long it took.
async fn timed_get(
    env: &Env,
    key: &str,
    deadline: Duration,
) -> (Result<pb::GetResponse, tonic::Status>, Duration) {
    let mut req = tonic::Request::new(get_req(key));
    req.set_timeout(deadline);
    let started = Instant::now();
    let r = env.cache().get(req).await.map(|r| r.into_inner());
    (r, started.elapsed())
}

/// Redis killed mid-run: health goes NOT_SERVING, calls answer UNAVAILABLE
/// within their deadline; Redis back: koo serves again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let mut env = Env::redis().await;
    env.cache()
        .set(set_req(CacheLevel::App, "k", text("v")))
        .await
        .unwrap();
    env.kill_redis().await;
    env.server
        .wait_health("koo.cache.v1.CacheService", ServingStatus::NotServing)
        .await;
    for _ in 0..5 {
        let (r, took) = timed_get(&env, "k", Duration::from_secs(1)).await;
        let err = r.unwrap_err();
        assert!(
            matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{err:?}"
        );
        assert!(took < Duration::from_secs(2), "call hung for {took:?}");
    }
    let h = env
        .cache()
        .get_health(pb::GetHealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!h.healthy);
    assert!(!h.last_error.is_empty());
    env.restart_redis().await;
    let mut c = env.cache();
    c.set(set_req(CacheLevel::App, "k2", text("back")))
        .await
        .unwrap();
    let got = c.get(get_req("k2")).await.unwrap().into_inner();
    assert_eq!(got.value, text("back"));
}

/// Redis down when koo starts: koo starts anyway, reports NOT_SERVING,
/// answers UNAVAILABLE fast, and serves once Redis comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_startup() {
    let mut redis = TestRedis::start().await;
    redis.kill();
    let server = TestServer::spawn(test_settings(redis_settings(&redis.url()))).await;
    server.wait_health("", ServingStatus::NotServing).await;
    let mut req = tonic::Request::new(get_req("k"));
    req.set_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let err = server.cache().get(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    redis.restart().await;
    server.wait_health("", ServingStatus::Serving).await;
    server
        .cache()
        .set(set_req(CacheLevel::App, "k", text("v")))
        .await
        .unwrap();
}

/// Redis paused (SIGSTOP): callers get DEADLINE_EXCEEDED or UNAVAILABLE
/// within their deadline; after SIGCONT calls succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_answers_within_the_deadline() {
    let env = Env::redis().await;
    let redis = env.redis_server().unwrap();
    redis.signal("STOP");
    let (r, took) = timed_get(&env, "k", Duration::from_millis(500)).await;
    let err = r.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Unavailable),
        "{err:?}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    redis.signal("CONT");
    env.server.wait_health("", ServingStatus::Serving).await;
    let deadline = Instant::now() + common::EVENT_TIMEOUT;
    // the breaker may still be cooling down for a moment
    loop {
        match env
            .cache()
            .set(set_req(CacheLevel::App, "k", text("v")))
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// Redis full under noeviction: writes are RESOURCE_EXHAUSTED and nothing
/// already written is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_full_is_resource_exhausted() {
    let redis =
        TestRedis::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]).await;
    let server = TestServer::spawn(test_settings(redis_settings(&redis.url()))).await;
    server.wait_health("", ServingStatus::Serving).await;
    let mut c = server.cache();
    let mut value = vec![0u8; 256 * 1024];
    rand::Rng::fill(&mut rand::rng(), &mut value[..]);
    let raw = Some(pb::CacheValue {
        kind: Some(Kind::Raw(value.into())),
    });
    let mut written = 0;
    let err = loop {
        match c
            .set(set_req(
                CacheLevel::App,
                &format!("k{written}"),
                raw.clone(),
            ))
            .await
        {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 100, "Redis never filled up");
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(written > 0);
    for i in 0..written {
        assert!(
            c.get(get_req(&format!("k{i}")))
                .await
                .unwrap()
                .into_inner()
                .found,
            "k{i} lost"
        );
    }
}

/// Two koo instances on one Redis see each other's values, and either one's
/// metrics sum both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_values_and_metrics() {
    let redis = TestRedis::start().await;
    let a = TestServer::spawn(test_settings(redis_settings(&redis.url()))).await;
    let b = TestServer::spawn(test_settings(redis_settings(&redis.url()))).await;
    a.wait_health("", ServingStatus::Serving).await;
    b.wait_health("", ServingStatus::Serving).await;
    for i in 0..3 {
        a.cache()
            .set(set_req(CacheLevel::Db, &format!("k{i}"), text("v")))
            .await
            .unwrap();
    }
    for i in 0..2 {
        let got = b
            .cache()
            .get(pb::GetRequest {
                level: CacheLevel::Db as i32,
                key: format!("k{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.value, text("v"));
    }
    // Each instance publishes every 100 ms; wait for B to see A's figures.
    let deadline = Instant::now() + common::EVENT_TIMEOUT;
    for server in [&a, &b] {
        loop {
            let m = server
                .cache()
                .get_metrics(pb::GetMetricsRequest {})
                .await
                .unwrap()
                .into_inner()
                .metrics
                .unwrap();
            let t = m.total.unwrap();
            if m.instance_count == 2 && t.sets == 3 && t.hits == 2 {
                assert_eq!(t.keys, 3);
                assert!(!m.partial);
                break;
            }
            assert!(Instant::now() < deadline, "metrics never summed: {m:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every key koo writes to Redis has a TTL, except the task queues' own
/// structures, which are bounded by caps instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_koo_writes_has_a_ttl() {
    let env = Env::redis().await;
    let mut c = env.cache();
    c.set(set_req(CacheLevel::App, "a", text("v")))
        .await
        .unwrap();
    c.set_many(pb::SetManyRequest {
        entries: vec![pb::CacheEntry {
            level: CacheLevel::Session as i32,
            key: "b".into(),
            value: text("v"),
            ttl: None,
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    c.warm(pb::WarmRequest {
        entries: vec![pb::CacheEntry {
            level: CacheLevel::Api as i32,
            key: "c".into(),
            value: text("v"),
            ttl: None,
            ..Default::default()
        }],
        skip_file: true,
        wait: true,
    })
    .await
    .unwrap();
    c.get_metrics(pb::GetMetricsRequest {}).await.unwrap();
    let mut conn = env.redis_server().unwrap().conn().await;
    // wait for at least one metrics publication
    let deadline = Instant::now() + common::EVENT_TIMEOUT;
    while !conn
        .exists::<_, bool>("koo:stats:cache:instances")
        .await
        .unwrap()
    {
        assert!(Instant::now() < deadline, "metrics never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.len() >= 5, "{keys:?}");
    for key in keys {
        assert!(key.starts_with("koo:"), "{key}");
        // The warm-up ran as a task: a queue's structures are bounded by
        // caps (history, events, dead letters) or by what is in flight,
        // not by a TTL; an ended task's hash and log expire.
        let queue_structure = key.starts_with("koo:v1:{t:")
            && [
                ":history",
                ":history:data",
                ":dead",
                ":events",
                ":stats",
                ":ready",
                ":scheduled",
                ":leases",
                ":wake",
            ]
            .iter()
            .any(|s| key.ends_with(s));
        // Schedules are data users manage (the defaults included): they
        // live until deleted.
        let schedules = key.starts_with("koo:v1:{schedules}:");
        if queue_structure || schedules {
            continue;
        }
        let ttl: i64 = conn.pttl(&key).await.unwrap();
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
    }
}

/// Cleanup removes keys without a TTL and stale instance records inside
/// koo's namespace, and nothing outside it; a foreign value in the namespace
/// reads as DATA_LOSS, not as garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_only_koos_strays() {
    // no scheduler: the default cache cleanup (every 10 minutes) would race
    // this one for the strays when the test runs on the minute
    let env = Env::redis_with(|s| s.schedule.enabled = false).await;
    let mut conn = env.redis_server().unwrap().conn().await;
    let _: () = conn.set("koo:cache:app:orphan", "no ttl").await.unwrap();
    let _: () = conn.set("someone-else:key", "no ttl").await.unwrap();
    let _: () = conn
        .zadd("koo:stats:cache:instances", "ghost", 1)
        .await
        .unwrap();
    let _: () = conn
        .set("koo:stats:cache:instance:ghost", "{}")
        .await
        .unwrap();
    let err = env.cache().get(get_req("orphan")).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    env.cache()
        .set(set_req(CacheLevel::App, "kept", text("v")))
        .await
        .unwrap();
    let report = env
        .cache()
        .cleanup(pb::CleanupRequest { wait: true })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(report.removed_without_ttl, 1, "{report:?}");
    assert_eq!(report.removed_stale_instances, 1, "{report:?}");
    assert!(report.scanned_keys >= 2);
    assert!(
        !conn
            .exists::<_, bool>("koo:cache:app:orphan")
            .await
            .unwrap()
    );
    assert!(
        !conn
            .exists::<_, bool>("koo:stats:cache:instance:ghost")
            .await
            .unwrap()
    );
    assert!(conn.exists::<_, bool>("someone-else:key").await.unwrap());
    assert!(
        env.cache()
            .get(get_req("kept"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
}

/// Two deployments with different prefixes share one Redis without seeing or
/// clearing each other's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_isolate_deployments() {
    let redis = TestRedis::start().await;
    let with_prefix = |p: &str| {
        let mut s = test_settings(redis_settings(&redis.url()));
        s.cache.prefix = p.into();
        s
    };
    let a = TestServer::spawn(with_prefix("alpha")).await;
    let b = TestServer::spawn(with_prefix("beta")).await;
    a.wait_health("", ServingStatus::Serving).await;
    b.wait_health("", ServingStatus::Serving).await;
    a.cache()
        .set(set_req(CacheLevel::App, "k", text("a")))
        .await
        .unwrap();
    b.cache()
        .set(set_req(CacheLevel::App, "k", text("b")))
        .await
        .unwrap();
    let cleared = a
        .cache()
        .clear_level(pb::ClearLevelRequest {
            level: CacheLevel::App as i32,
        })
        .await
        .unwrap();
    assert_eq!(cleared.into_inner().deleted_count, 1);
    assert_eq!(
        b.cache()
            .get(get_req("k"))
            .await
            .unwrap()
            .into_inner()
            .value,
        text("b")
    );
    let mut conn = redis.conn().await;
    assert!(conn.exists::<_, bool>("beta:cache:app:k").await.unwrap());
}

/// The embedded store's cleanup purges expired entries and counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_cleanup_purges_expired_entries() {
    let env = Env::memory().await;
    let mut c = env.cache();
    for i in 0..3 {
        let mut req = set_req(CacheLevel::Session, &format!("k{i}"), text("v"));
        req.ttl = Some(prost_types::Duration {
            seconds: 0,
            nanos: 50_000_000,
        });
        c.set(req).await.unwrap();
    }
    c.set(set_req(CacheLevel::Session, "stays", text("v")))
        .await
        .unwrap();
    // wait until all three read as expired
    let deadline = Instant::now() + common::EVENT_TIMEOUT;
    for i in 0..3 {
        while c
            .get(pb::GetRequest {
                level: CacheLevel::Session as i32,
                key: format!("k{i}"),
            })
            .await
            .unwrap()
            .into_inner()
            .found
        {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let report = c
        .cleanup(pb::CleanupRequest { wait: true })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(report.removed_expired, 3, "{report:?}");
    assert_eq!(report.removed_without_ttl, 0);
    let again = c
        .cleanup(pb::CleanupRequest { wait: true })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(again.removed_expired, 0);
}

/// With the default pool (20 connections, 5 s cool-down), killing every
/// client connection (as a Redis restart or failover does) costs no more than
/// a retry: calls keep succeeding and the breaker stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_recover_at_once_with_default_pool() {
    let redis = TestRedis::start().await;
    let mut settings = test_settings(koo::server::StoreSettings::Redis(
        koo::store::RedisConfig::new(redis.url()),
    ));
    settings.health_check_interval = Duration::from_secs(30);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    let mut c = server.cache();
    // touch every pooled connection
    for i in 0..40 {
        c.set(set_req(CacheLevel::App, &format!("k{i}"), text("v")))
            .await
            .unwrap();
    }
    let mut conn = redis.conn().await;
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut conn)
        .await
        .unwrap_or(0);
    for i in 0..40 {
        let mut req = tonic::Request::new(get_req(&format!("k{i}")));
        req.set_timeout(Duration::from_secs(2));
        let got = c
            .get(req)
            .await
            .unwrap_or_else(|e| panic!("call {i} after CLIENT KILL: {e:?}"));
        assert!(got.into_inner().found);
    }
    let h = c
        .get_health(pb::GetHealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.circuit_state, pb::CircuitState::Closed as i32);
}

/// Foreign data in koo's namespace (a key that is not UTF-8, a list under a
/// cache key) is handled, not mistaken for an outage: bulk calls succeed,
/// the foreign value reads as DATA_LOSS, and the breaker stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_do_not_break_anything() {
    let env = Env::redis().await;
    let mut conn = env.redis_server().unwrap().conn().await;
    let _: () = redis::cmd("SET")
        .arg(b"koo:cache:app:\xff\xfe".as_slice())
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = conn.rpush("koo:cache:app:list", "x").await.unwrap();
    let mut c = env.cache();
    c.set(set_req(CacheLevel::App, "mine", text("v")))
        .await
        .unwrap();
    let err = c.get(get_req("list")).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    let listed = c
        .list_keys(pb::ListKeysRequest {
            level: CacheLevel::App as i32,
            pattern: String::new(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.keys.contains(&"mine".to_string()), "{listed:?}");
    let m = c
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert!(!m.partial, "{}", m.partial_reason);
    // both foreign keys lack a TTL, so cleanup removes them
    let report = c
        .cleanup(pb::CleanupRequest { wait: true })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(report.removed_without_ttl, 2, "{report:?}");
    let cleared = c
        .clear_level(pb::ClearLevelRequest {
            level: CacheLevel::App as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.deleted_count, 1);
    let h = c
        .get_health(pb::GetHealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.circuit_state, pb::CircuitState::Closed as i32);
    assert!(h.healthy);
}

/// Callers with deadlines shorter than a Redis stall get DEADLINE_EXCEEDED,
/// but their impatience is not taken as an outage: once the stall ends, the
/// next call succeeds (the breaker did not open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tight_deadlines_do_not_open_the_breaker() {
    let redis = TestRedis::start_with(&["--enable-debug-command", "local"]).await;
    // A long cool-down: had the breaker opened, the last call would be refused.
    let mut settings = test_settings(koo::server::StoreSettings::Redis(koo::store::RedisConfig {
        breaker_cooldown: Duration::from_secs(60),
        connect_timeout: Duration::from_millis(500),
        ..koo::store::RedisConfig::new(redis.url())
    }));
    settings.health_check_interval = Duration::from_secs(30);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    let env = Env {
        server,
        backend: common::Backend::Redis(redis),
    };
    let mut c = env.cache();
    c.set(set_req(CacheLevel::App, "k", text("v")))
        .await
        .unwrap();
    let mut sleeper = env.redis_server().unwrap().conn().await;
    let stall = tokio::spawn(async move {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("0.5")
            .query_async(&mut sleeper)
            .await
            .unwrap();
    });
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = env.cache();
        tasks.push(tokio::spawn(async move {
            let mut req = tonic::Request::new(get_req("k"));
            req.set_timeout(Duration::from_millis(60));
            c.get(req).await.map(|_| ()).map_err(|e| e.code())
        }));
    }
    // CANCELLED is tonic's own timer on the caller's deadline, which can win
    // the race with koo's DEADLINE_EXCEEDED on a loaded machine.
    for t in tasks {
        let r = t.await.unwrap();
        assert!(
            matches!(r, Ok(()) | Err(Code::DeadlineExceeded | Code::Cancelled)),
            "{r:?}"
        );
    }
    stall.await.unwrap();
    let got = c
        .get(get_req("k"))
        .await
        .expect("breaker must not have opened");
    assert!(got.into_inner().found);
}

/// Redis out of memory during a SetMany is RESOURCE_EXHAUSTED, like a Set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_full_set_many_is_resource_exhausted() {
    let redis =
        TestRedis::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]).await;
    let server = TestServer::spawn(test_settings(redis_settings(&redis.url()))).await;
    server.wait_health("", ServingStatus::Serving).await;
    let mut value = vec![0u8; 512 * 1024];
    rand::Rng::fill(&mut rand::rng(), &mut value[..]);
    let raw = Some(pb::CacheValue {
        kind: Some(Kind::Raw(value.into())),
    });
    let entries = (0..8)
        .map(|i| pb::CacheEntry {
            level: 0,
            key: format!("k{i}"),
            value: raw.clone(),
            ttl: None,
            ..Default::default()
        })
        .collect();
    let err = server
        .cache()
        .set_many(pb::SetManyRequest { entries })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

/// While Redis is down, GetMetrics still answers with this instance's own
/// counters, marked partial with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_partial_while_redis_is_down() {
    let mut env = Env::redis().await;
    env.cache()
        .set(set_req(CacheLevel::App, "k", text("v")))
        .await
        .unwrap();
    env.kill_redis().await;
    let mut req = tonic::Request::new(pb::GetMetricsRequest {});
    req.set_timeout(Duration::from_secs(2));
    let m = env
        .cache()
        .get_metrics(req)
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert!(m.partial);
    assert!(!m.partial_reason.is_empty());
    assert_eq!(m.total.unwrap().sets, 1);
}
