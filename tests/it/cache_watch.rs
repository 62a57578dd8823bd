//! `WatchInvalidations` end to end (issue 19): a watcher on one koo
//! receives every change made on another koo of the same Redis, filtered
//! by level and key prefix, READY first; a consumer that stops reading is
//! told RESET and then continues; nothing is published while nobody
//! watches; the embedded store does the same in one process; Redis
//! keyspace notifications (enabled on the test's own redis-server only)
//! become EXPIRED.

use crate::common;

use std::time::Duration;

use common::chaos::{KooProc, lazy_channel};
use common::{EVENT_TIMEOUT, Env, TestRedis, TestServer};
use koo::pb::cache::v1::{
    self as pb, CacheLevel, InvalidationKind, cache_service_client::CacheServiceClient,
    cache_value::Kind,
};
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

on_both_stores!(a_stalled_consumer_is_reset_then_continues);

type Client = CacheServiceClient<Channel>;

fn text(s: &str) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(Kind::Text(s.into())),
    })
}

fn entry(level: CacheLevel, key: &str) -> pb::CacheEntry {
    pb::CacheEntry {
        level: level as i32,
        key: key.into(),
        value: text("v"),
        ..Default::default()
    }
}

async fn set(c: &mut Client, level: CacheLevel, key: &str) {
    c.set(pb::SetRequest {
        level: level as i32,
        key: key.into(),
        value: text("v"),
        ..Default::default()
    })
    .await
    .expect("set");
}

async fn watch(
    c: &mut Client,
    levels: &[CacheLevel],
    prefix: &str,
) -> Streaming<pb::WatchInvalidationsResponse> {
    c.watch_invalidations(pb::WatchInvalidationsRequest {
        levels: levels.iter().map(|l| *l as i32).collect(),
        key_prefix: prefix.into(),
        heartbeat_interval: None,
    })
    .await
    .expect("watch")
    .into_inner()
}

/// The next message, within the event timeout.
async fn next(s: &mut Streaming<pb::WatchInvalidationsResponse>) -> pb::WatchInvalidationsResponse {
    tokio::time::timeout(EVENT_TIMEOUT, s.message())
        .await
        .expect("a message within the timeout")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

/// A message as (kind, level, keys, tags), for comparing.
type Seen = (InvalidationKind, CacheLevel, Vec<String>, Vec<String>);

fn seen(m: &pb::WatchInvalidationsResponse) -> Seen {
    (m.kind(), m.level(), m.keys.clone(), m.tags.clone())
}

fn want(kind: InvalidationKind, level: CacheLevel, keys: &[&str]) -> Seen {
    (
        kind,
        level,
        keys.iter().map(|k| k.to_string()).collect(),
        vec![],
    )
}

/// The scenario of every change kind: made through `a`, watched through
/// `b` with levels {app, db} and prefix `u:`; what the filter leaves out is
/// interleaved with what it lets through, and the watcher must see exactly
/// the latter, in order.
async fn every_change_reaches_the_watcher(mut a: Client, mut b: Client) {
    use CacheLevel::{Api, App, Db};
    use InvalidationKind as K;
    let mut w = watch(&mut b, &[App, Db], "u:").await;
    assert_eq!(next(&mut w).await.kind(), K::Ready, "READY comes first");
    set(&mut a, App, "u:1").await;
    set(&mut a, Api, "u:2").await; // level filtered out
    set(&mut a, App, "x:1").await; // prefix filtered out
    a.set_many(pb::SetManyRequest {
        entries: vec![entry(App, "u:3"), entry(Db, "u:4"), entry(App, "x:2")],
    })
    .await
    .unwrap();
    // a warm-up's writes are announced as SetMany's are
    let warmed = a
        .warm(pb::WarmRequest {
            entries: vec![entry(App, "u:w"), entry(Api, "u:w2")],
            skip_file: true,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(warmed.report.map(|r| r.loaded), Some(2), "warmed");
    a.delete(pb::DeleteRequest {
        level: App as i32,
        key: "u:1".into(),
    })
    .await
    .unwrap();
    a.delete_many(pb::DeleteManyRequest {
        level: Db as i32,
        keys: vec!["u:4".into(), "x:9".into()],
    })
    .await
    .unwrap();
    for level in [Api, Db] {
        a.clear_level(pb::ClearLevelRequest {
            level: level as i32,
        })
        .await
        .unwrap();
    }
    // tags: one level (filtered out, then let through) and every level
    for (level, tag) in [(Some(Api), "t:api"), (Some(App), "t:app"), (None, "t:all")] {
        a.invalidate_tags(pb::InvalidateTagsRequest {
            level: level.map_or(0, |l| l as i32),
            tags: vec![tag.into()],
        })
        .await
        .unwrap();
    }
    set(&mut a, App, "u:end").await;
    let tags = |level: CacheLevel, tag: &str| (K::Tags, level, vec![], vec![tag.to_owned()]);
    let expected = vec![
        want(K::Set, App, &["u:1"]),
        want(K::Set, App, &["u:3"]),
        want(K::Set, Db, &["u:4"]),
        want(K::Set, App, &["u:w"]),
        want(K::Delete, App, &["u:1"]),
        want(K::Delete, Db, &["u:4"]),
        want(K::ClearLevel, Db, &[]),
        tags(App, "t:app"),
        tags(CacheLevel::Unspecified, "t:all"),
        want(K::Set, App, &["u:end"]),
    ];
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let m = next(&mut w).await;
        assert!(m.time.is_some(), "{m:?}");
        got.push(seen(&m));
    }
    assert_eq!(got, expected);
}

/// `INFO commandstats`' count of PUBLISH calls.
async fn publishes(redis: &TestRedis) -> u64 {
    redis.command_calls(&["publish"]).await
}

/// Two `koo serve` binaries on one fresh Redis, a worker slot each (for
/// the scenario's warm-up task).
async fn two_koos(redis: &TestRedis, dir: &std::path::Path) -> Vec<KooProc> {
    common::chaos::serve_pair(redis.url(), 1, dir).await
}

/// Two koo processes on one Redis: nothing is published while nobody
/// watches; a watcher on B receives every change made on A, filtered;
/// once the watcher is gone and the flag lapsed, publishing stops again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_b_sees_every_change_made_on_a() {
    let redis = TestRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let procs = two_koos(&redis, dir.path()).await;
    let client = |i: usize| Client::new(lazy_channel(procs[i].port.unwrap()));
    let mut a = client(0);
    for i in 0..20 {
        set(&mut a, CacheLevel::App, &format!("quiet:{i}")).await;
    }
    assert_eq!(publishes(&redis).await, 0, "published while nobody watched");

    every_change_reaches_the_watcher(client(0), client(1)).await;
    assert!(publishes(&redis).await >= 7);

    // The watcher is gone: the flag lapses (3 s), every koo reads it within
    // a second, then writes cost no PUBLISH.
    let mut conn = redis.conn().await;
    let gone = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let set: bool = redis::cmd("EXISTS")
            .arg("koo:v1:cache:watched")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !set {
            break;
        }
        assert!(
            tokio::time::Instant::now() < gone,
            "the watch flag never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await; // one read interval and a margin
    let before = publishes(&redis).await;
    for i in 0..20 {
        set(&mut a, CacheLevel::App, &format!("quiet-again:{i}")).await;
    }
    assert_eq!(
        publishes(&redis).await,
        before,
        "published after the watchers left"
    );
}

/// Two koo processes on a Redis Cluster: a change published on whichever
/// node A's connection reaches arrives at B's subscription on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_b_sees_every_change_made_on_a_on_a_cluster() {
    let cluster = common::cluster::TestCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let procs = common::chaos::serve_pair(cluster.url(), 1, dir.path()).await;
    let client = |i: usize| Client::new(lazy_channel(procs[i].port.unwrap()));
    every_change_reaches_the_watcher(client(0), client(1)).await;
}

/// The embedded store: the same scenario in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_delivers_every_change() {
    let env = Env::memory().await;
    every_change_reaches_the_watcher(env.cache(), env.cache()).await;
}

/// A watcher that asks for heartbeats is told the interval on READY and
/// gets a HEARTBEAT whenever the stream is quiet that long, changes still
/// arriving between them; one that does not ask gets none; an interval out
/// of range is refused, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_sends_heartbeats_when_asked() {
    let millis = |ms: i32| {
        Some(prost_types::Duration {
            seconds: 0,
            nanos: ms * 1_000_000,
        })
    };
    let beating = |ms: i32| pb::WatchInvalidationsRequest {
        heartbeat_interval: millis(ms),
        ..Default::default()
    };
    let env = Env::memory().await;
    let mut c = env.cache();
    let mut s = c
        .watch_invalidations(beating(100))
        .await
        .expect("watch")
        .into_inner();
    let ready = next(&mut s).await;
    assert_eq!(ready.kind(), InvalidationKind::Ready, "{ready:?}");
    assert_eq!(ready.heartbeat_interval, millis(100));
    for _ in 0..2 {
        assert_eq!(next(&mut s).await.kind(), InvalidationKind::Heartbeat);
    }
    set(&mut c, CacheLevel::App, "hb:1").await;
    loop {
        let m = next(&mut s).await;
        if m.kind() != InvalidationKind::Heartbeat {
            assert_eq!(
                seen(&m),
                want(InvalidationKind::Set, CacheLevel::App, &["hb:1"])
            );
            break;
        }
    }
    let mut quiet = watch(&mut c, &[], "").await;
    let ready = next(&mut quiet).await;
    assert_eq!(ready.heartbeat_interval, None, "{ready:?}");
    set(&mut c, CacheLevel::App, "hb:2").await;
    assert_eq!(
        seen(&next(&mut quiet).await),
        want(InvalidationKind::Set, CacheLevel::App, &["hb:2"]),
        "no heartbeat before the change when none was asked for"
    );
    let e = c
        .watch_invalidations(beating(1))
        .await
        .expect_err("1 ms is under the floor");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("heartbeat_interval"), "{e:?}");
}

/// A watcher that stops reading while thousands of changes happen is told
/// RESET (never silently skipped), then READY, and then sees changes again.
async fn a_stalled_consumer_is_reset_then_continues(env: Env) {
    // A connection of its own with a small HTTP/2 window, so that the
    // stalled stream backs up into koo quickly.
    let channel = Endpoint::from_shared(format!("http://{}", env.server.addr))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut stalled = watch(&mut Client::new(channel), &[], "").await;
    assert_eq!(next(&mut stalled).await.kind(), InvalidationKind::Ready);
    let long = "k".repeat(400);
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let mut c = env.cache();
            let long = long.clone();
            tokio::spawn(async move {
                for i in 0..400 {
                    c.delete(pb::DeleteRequest {
                        level: CacheLevel::App as i32,
                        key: format!("{long}:{w}:{i}"),
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let mut deletes = 0;
    loop {
        let m = next(&mut stalled).await;
        match m.kind() {
            InvalidationKind::Delete => deletes += 1,
            InvalidationKind::Reset => break,
            other => panic!("unexpected {other:?} after {deletes} deletes"),
        }
    }
    assert!(deletes < 6400, "RESET came after {deletes} of 6400 deletes");
    assert_eq!(next(&mut stalled).await.kind(), InvalidationKind::Ready);
    set(&mut env.cache(), CacheLevel::Db, "after").await;
    // Deletes still buffered in koo when the stream was reset were dropped
    // at READY; on Redis, some published before READY may still have been
    // on their way from Redis then, and arrive after it (harmless: a near
    // cache that drops a key twice is never stale). Nothing else comes
    // before the write made after READY.
    let mut late = 0;
    let m = loop {
        let m = next(&mut stalled).await;
        if m.kind() == InvalidationKind::Delete && m.keys.iter().all(|k| k.starts_with(&long)) {
            late += 1;
            assert!(late < 6400, "more deletes than were made");
            continue;
        }
        break m;
    };
    assert_eq!(
        seen(&m),
        want(InvalidationKind::Set, CacheLevel::Db, &["after"]),
        "after {late} late deletes"
    );
}

/// A key that expires in a Redis whose operator enabled keyspace
/// notifications is reported EXPIRED; bad filters are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiries_are_reported_when_redis_notifies_them() {
    let redis = TestRedis::start_with(&["--notify-keyspace-events", "Ex"]).await;
    let server =
        TestServer::spawn(common::test_settings(common::redis_settings(&redis.url()))).await;
    let mut c = server.cache();
    let refused = c
        .watch_invalidations(pb::WatchInvalidationsRequest {
            levels: vec![99],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("levels[0]"), "{refused:?}");

    let mut w = watch(&mut c, &[CacheLevel::Session], "").await;
    assert_eq!(next(&mut w).await.kind(), InvalidationKind::Ready);
    c.set(pb::SetRequest {
        level: CacheLevel::Session as i32,
        key: "short".into(),
        value: text("v"),
        ttl: Some(prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let kinds = [next(&mut w).await, next(&mut w).await];
    assert_eq!(
        kinds.iter().map(seen).collect::<Vec<_>>(),
        vec![
            want(InvalidationKind::Set, CacheLevel::Session, &["short"]),
            want(InvalidationKind::Expired, CacheLevel::Session, &["short"]),
        ]
    );
}

/// On a Redis Cluster whose nodes notify expiries, keys expiring on every
/// master are reported EXPIRED (koo subscribes to the notifications on each
/// master: they are local to the node holding the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiries_on_every_master_of_a_cluster_are_reported() {
    let cluster = common::cluster::TestCluster::start().await;
    for node in &cluster.nodes {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("Ex")
            .query_async(&mut node.conn().await)
            .await
            .unwrap();
    }
    let server = TestServer::spawn(common::test_settings(common::redis_settings(
        &cluster.url(),
    )))
    .await;
    let mut c = server.cache();
    let mut w = watch(&mut c, &[CacheLevel::Session], "").await;
    assert_eq!(next(&mut w).await.kind(), InvalidationKind::Ready);
    let keys: std::collections::BTreeSet<String> = (0..30).map(|i| format!("short:{i}")).collect();
    for key in &keys {
        c.set(pb::SetRequest {
            level: CacheLevel::Session as i32,
            key: key.clone(),
            value: text("v"),
            ttl: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut masters_holding = 0;
    for port in cluster.masters().await {
        let node = cluster.nodes.iter().find(|n| n.port == port).unwrap();
        let n: u64 = redis::cmd("DBSIZE")
            .query_async(&mut node.conn().await)
            .await
            .unwrap();
        masters_holding += usize::from(n > 0);
    }
    assert_eq!(masters_holding, 3, "the keys spread over the masters");
    let mut expired = std::collections::BTreeSet::new();
    while expired != keys {
        let m = next(&mut w).await;
        match m.kind() {
            InvalidationKind::Set => {}
            InvalidationKind::Expired => expired.extend(m.keys),
            other => panic!("unexpected {other:?} after {} expiries", expired.len()),
        }
    }
}

/// `koo cache watch` prints READY, then a line per change it is filtered
/// for, until it is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn koo_cache_watch_prints_changes() {
    use std::io::BufRead as _;
    let env = Env::memory().await;
    let child = common::koo_command()
        .env("KOO_TARGET", env.server.addr.to_string())
        .args(["cache", "watch", "--level", "app", "--prefix", "u:"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run koo cache watch");
    let mut guard = common::ChildGuard(child);
    let stdout = guard.0.stdout.take().expect("a stdout pipe");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.expect("a line")).is_err() {
                return;
            }
        }
    });
    let line = move || {
        rx.recv_timeout(EVENT_TIMEOUT)
            .expect("a line within the timeout")
    };
    assert_eq!(line(), "READY");
    let mut c = env.cache();
    set(&mut c, CacheLevel::Db, "u:0").await;
    set(&mut c, CacheLevel::App, "x:0").await;
    set(&mut c, CacheLevel::App, "u:1").await;
    assert_eq!(line(), r#"SET app "u:1""#);
    // koo shutting down ends the watch: not a normal end (exit 3, said)
    env.server.shutdown().await;
    let status = tokio::task::spawn_blocking(move || guard.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(3), "{status:?}");
}

/// `koo cache watch` against a koo that stops answering without closing
/// the connection (SIGSTOP: a hung process, or a network path that drops
/// without a reset) ends after three missed heartbeats, exit 3, saying
/// so, rather than waiting for ever while changes go unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn koo_cache_watch_ends_when_koo_stalls() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut koo = common::chaos::KooProc::new("stalls", &["serve"], Some(port), vec![], dir.path());
    koo.start().await;
    let mut child = common::koo_command()
        .env("KOO_TARGET", format!("127.0.0.1:{port}"))
        .args(["cache", "watch", "--heartbeat", "200ms"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run koo cache watch");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let guard = common::ChildGuard(child);
    let (ready, stdout) = tokio::task::spawn_blocking(move || {
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        (first, stdout)
    })
    .await
    .unwrap();
    assert_eq!(ready.trim(), "READY");
    koo.signal("STOP");
    let ended = tokio::time::timeout(
        EVENT_TIMEOUT,
        tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            let mut err = String::new();
            std::io::Read::read_to_string(guard.0.stderr.as_mut().unwrap(), &mut err).unwrap();
            (guard.0.wait().unwrap(), err)
        }),
    )
    .await;
    koo.signal("CONT");
    let (status, err) = ended.expect("the watch did not end").unwrap();
    assert_eq!(status.code(), Some(3), "{status:?}: {err}");
    assert!(err.contains("not even a heartbeat"), "{err}");
    let rest: Vec<String> = stdout.lines().map(Result::unwrap).collect();
    assert!(rest.is_empty(), "heartbeats are not printed: {rest:?}");
}

/// koo's Redis user with exactly the documented ACL rules and channels
/// (README, "Watching invalidations"): a watcher hears a write, through
/// the user's own Pub/Sub connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_channels_suffice() {
    let redis = TestRedis::start().await;
    let mut admin = redis.conn().await;
    let rules: Vec<&str> = koo::store::redis::REDIS_ACL_RULES
        .split_whitespace()
        .collect();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("koo")
        .arg("reset")
        .arg("on")
        .arg(">koo-secret")
        .arg("~koo:*")
        .arg("resetchannels")
        .arg("&koo:v1:cache:changes")
        .arg("&__keyevent@0__:expired")
        .arg("&__keyevent@0__:evicted")
        .arg(&rules)
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://koo:koo-secret@127.0.0.1:{}/0", redis.port);
    let server = TestServer::spawn(common::test_settings(common::redis_settings(&url))).await;
    let mut c = server.cache();
    let mut w = watch(&mut c, &[], "").await;
    assert_eq!(next(&mut w).await.kind(), InvalidationKind::Ready);
    set(&mut c, CacheLevel::Api, "acl").await;
    assert_eq!(
        seen(&next(&mut w).await),
        want(InvalidationKind::Set, CacheLevel::Api, &["acl"])
    );
}
