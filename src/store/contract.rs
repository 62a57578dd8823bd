//! The [`super::CacheBackend`] and [`ScheduleBackend`] contracts, run
//! against both backends: the embedded store and a `redis-server` started for
//! the test. A behaviour the cache or the scheduler relies on is pinned here
//! once, for every backend.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;

use crate::domain::schedule::{MissedPolicy, Run, Schedule, Source, Template};
use crate::domain::task::Category;

use super::schedules::{Put, ScheduleStore};
use super::{
    BackendKind, Deadline, MemoryConfig, MemoryStore, RedisConfig, RedisStore, Store, StoreError,
    Write,
};

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

fn v(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

const MINUTE: Duration = Duration::from_secs(60);

/// Every case of the contract, on an empty `store` of `kind`.
async fn contract(store: &Store, kind: BackendKind) {
    assert_eq!(store.kind(), kind);
    keys_and_batches(store).await;
    listing_and_removal(store).await;
    expiry_and_records(store).await;
    compute_locks(store).await;
    tag_versions(store).await;
}

/// Reads and writes, one key and in batches.
async fn keys_and_batches(store: &Store) {
    let d = later();
    // get / set / overwrite, with the TTL left
    assert_eq!(store.get("c:a", d).await.unwrap(), None);
    store.set("c:a", v("1"), MINUTE, d).await.unwrap();
    store.set("c:a", v("22"), MINUTE, d).await.unwrap();
    let got = store.get("c:a", d).await.unwrap().unwrap();
    assert_eq!(got.value, v("22"));
    let ttl = got.ttl.expect("every key koo writes has a TTL");
    assert!(
        ttl <= MINUTE && ttl > MINUTE - Duration::from_secs(5),
        "{ttl:?}"
    );
    // batches: answers in order, absent keys as None / 0
    let writes = ["c:b", "c:c", "d:x"].map(|key| Write {
        key: key.to_owned(),
        value: v("333"),
        ttl: MINUTE,
    });
    store.set_many(writes.to_vec(), d).await.unwrap();
    let keys = ["c:b", "c:none", "d:x"].map(str::to_owned);
    let many = store.get_many(&keys, d).await.unwrap();
    let values: Vec<Option<Bytes>> = many.into_iter().map(|e| e.map(|e| e.value)).collect();
    assert_eq!(values, [Some(v("333")), None, Some(v("333"))]);
    assert_eq!(store.sizes(&keys, d).await.unwrap(), [3, 0, 3]);
    assert!(store.get_many(&[], d).await.unwrap().is_empty());
    store.set_many(Vec::new(), d).await.unwrap();
}

/// Listing, counting and removing by pattern (after [`keys_and_batches`]).
async fn listing_and_removal(store: &Store) {
    let d = later();
    // listing: pages of at most the size asked, every matching key once
    let mut listed = BTreeSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let page = store.scan("c:*", cursor.as_deref(), 2, d).await.unwrap();
        assert!(page.keys.len() <= 2, "{page:?}");
        for key in page.keys {
            assert!(listed.insert(key.clone()), "{key} listed twice");
        }
        cursor = page.cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(cursor, None, "the listing never ended");
    assert_eq!(
        listed,
        BTreeSet::from(["c:a", "c:b", "c:c"].map(str::to_owned))
    );
    let foreign = store.scan("c:*", Some("x:not-a-cursor"), 2, d).await;
    assert!(
        matches!(foreign, Err(StoreError::InvalidCursor(_))),
        "{foreign:?}"
    );
    let prefixes = ["c:a".to_owned(), "c:".to_owned()];
    assert_eq!(
        store.count_by_prefix("c:*", &prefixes, d).await.unwrap(),
        [1, 2]
    );
    // delete counts what existed; clear what matched
    let gone = ["c:a".to_owned(), "c:none".to_owned()];
    assert_eq!(store.delete(&gone, d).await.unwrap(), 1);
    assert_eq!(store.get("c:a", d).await.unwrap(), None);
    assert_eq!(store.clear("c:*", d).await.unwrap(), 2);
    assert!(
        store
            .scan("c:*", None, 10, d)
            .await
            .unwrap()
            .keys
            .is_empty()
    );
    assert!(
        store.get("d:x", d).await.unwrap().is_some(),
        "clear went past its pattern"
    );
}

/// TTLs end keys; instance records read back.
async fn expiry_and_records(store: &Store) {
    let d = later();
    // a key is gone once its TTL has passed
    store
        .set("e:short", v("x"), Duration::from_millis(30), d)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(store.get("e:short", d).await.unwrap(), None);
    // records: published ones are read back by member
    let key_of = |m: &str| format!("r:{m}");
    let since = std::time::SystemTime::now() - Duration::from_secs(1);
    store
        .publish_record("r:index", "r:one", "one", v("fig"), MINUTE, d)
        .await
        .unwrap();
    let records = store
        .read_records("r:index", since, &key_of, d)
        .await
        .unwrap();
    assert_eq!(records, [("one".to_owned(), v("fig"))]);
    assert!(store.probe(d).await.is_ok());
}

/// A schedule named `name` created at `ms`.
/// Compute locks: one holder until its TTL passes; only the holder's token
/// replaces or releases it; a released or lapsed lock can be taken again.
async fn compute_locks(store: &Store) {
    use super::LockState;
    let d = later();
    let short = Duration::from_millis(200);
    assert_eq!(
        store.lock_acquire("l:a", "tok1", short, d).await.unwrap(),
        LockState::Acquired
    );
    match store.lock_acquire("l:a", "tok2", MINUTE, d).await.unwrap() {
        LockState::Held { value, left } => {
            assert_eq!(value, "tok1");
            assert!(left <= short && left > Duration::ZERO, "{left:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!store.lock_update("l:a", "tok2", "tok2|x", d).await.unwrap());
    assert!(
        store
            .lock_update("l:a", "tok1", "tok1|t~1", d)
            .await
            .unwrap()
    );
    let (value, left) = store.lock_read("l:a", d).await.unwrap().unwrap();
    assert_eq!(value, "tok1|t~1");
    assert!(left <= short, "an update keeps the expiry: {left:?}");
    assert!(!store.lock_release("l:a", "tok2", d).await.unwrap());
    assert!(
        !store.lock_release("l:a", "tok", d).await.unwrap(),
        "a prefix is not the token"
    );
    // the lease passing is the scenario
    tokio::time::sleep(short + Duration::from_millis(50)).await;
    assert_eq!(store.lock_read("l:a", d).await.unwrap(), None);
    assert_eq!(
        store.lock_acquire("l:a", "tok2", MINUTE, d).await.unwrap(),
        LockState::Acquired
    );
    assert!(store.lock_release("l:a", "tok2", d).await.unwrap());
    assert_eq!(store.lock_read("l:a", d).await.unwrap(), None);
    assert_eq!(
        store.get("l:a", d).await.unwrap(),
        None,
        "locks are not entries"
    );
}

fn schedule(name: &str, ms: i64) -> Schedule {
    Schedule {
        name: name.to_owned(),
        cron: "* * * * *".to_owned(),
        zone: String::new(),
        task: Template::new("koo.diagnostics.noop", Category::Research),
        policy: MissedPolicy::Skip,
        paused: false,
        source: Source::Api,
        config_hash: None,
        created_ms: ms,
        updated_ms: ms,
    }
}

fn run(fired_ms: i64) -> Run {
    Run {
        tick_ms: Some(fired_ms),
        task_id: format!("t{fired_ms}"),
        triggered: false,
        fired_ms,
    }
}

/// Tag versions: created once and then read back the same by every
/// writer; their TTL only ever lengthened; a bump changes the version of
/// the keys that exist (keeping their TTL) and creates none.
async fn tag_versions(store: &Store) {
    let d = later();
    let t = |k: &str, ms: u64| (k.to_owned(), Duration::from_millis(ms));
    let first = store
        .tag_versions_for_write(&[t("t:a", 60_000), t("t:b", 30_000)], d)
        .await
        .unwrap();
    let again = store
        .tag_versions_for_write(&[t("t:b", 1_000), t("t:a", 90_000)], d)
        .await
        .unwrap();
    assert_eq!((again[1], again[0]), (first[0], first[1]));
    let ttl = |e: Option<super::Entry>| e.unwrap().ttl.unwrap();
    let b_ttl = ttl(store.get("t:b", d).await.unwrap());
    assert!(b_ttl > Duration::from_secs(25), "not shortened: {b_ttl:?}");
    let a_ttl = ttl(store.get("t:a", d).await.unwrap());
    assert!(a_ttl > Duration::from_secs(85), "lengthened: {a_ttl:?}");
    let keys = ["t:a", "t:none"].map(str::to_owned);
    assert_eq!(
        store.tag_versions(&keys, d).await.unwrap(),
        [Some(first[0]), None]
    );
    assert_eq!(store.bump_tags(&keys, d).await.unwrap(), 1);
    let now = store.tag_versions(&keys, d).await.unwrap();
    assert!(
        now[0].is_some_and(|v| v != first[0]) && now[1].is_none(),
        "{now:?}"
    );
    assert!(ttl(store.get("t:a", d).await.unwrap()) > Duration::from_secs(85));
    store.set("t:bad", v("nope"), MINUTE, d).await.unwrap();
    assert!(
        store
            .tag_versions_for_write(&[t("t:bad", 1_000)], d)
            .await
            .is_err(),
        "a foreign value under a tag key is refused, not replaced"
    );
}

/// Puts under each condition, the version moving with every change (and
/// only then), runs recorded newest-wins and only for a stored schedule,
/// delete taking the run along.
async fn schedule_contract(store: &ScheduleStore) {
    let d = later();
    let v0 = store.version(d).await.unwrap();
    assert!(
        !store
            .put(&schedule("a", 1), Put::Existing, d)
            .await
            .unwrap()
    );
    assert_eq!(
        store.version(d).await.unwrap(),
        v0,
        "a refused put moved it"
    );
    assert!(store.put(&schedule("a", 1), Put::New, d).await.unwrap());
    assert!(!store.put(&schedule("a", 2), Put::New, d).await.unwrap());
    let v1 = store.version(d).await.unwrap();
    assert!(v1 > v0);
    assert!(
        store
            .put(&schedule("a", 3), Put::Existing, d)
            .await
            .unwrap()
    );
    assert!(store.put(&schedule("b", 4), Put::Any, d).await.unwrap());
    assert!(store.version(d).await.unwrap() > v1);
    store.record_run("a", &run(20), d).await.unwrap();
    store.record_run("a", &run(10), d).await.unwrap();
    store.record_run("gone", &run(30), d).await.unwrap();
    let (a, a_run) = store.get("a", d).await.unwrap().unwrap();
    assert_eq!((a.created_ms, a_run), (3, Some(run(20))));
    assert_eq!(store.get("gone", d).await.unwrap(), None);
    let snap = store.snapshot(d).await.unwrap();
    assert_eq!(snap.version, store.version(d).await.unwrap());
    assert_eq!(snap.schedules.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(snap.runs.len(), 1, "{:?}", snap.runs);
    let v2 = snap.version;
    assert!(store.delete("a", d).await.unwrap());
    assert!(!store.delete("a", d).await.unwrap());
    assert!(store.version(d).await.unwrap() > v2);
    assert!(store.snapshot(d).await.unwrap().runs.is_empty());
}

/// A `redis-server` on a free port, stopped on drop.
struct Server(Child, u16);

impl Server {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let bin = std::env::var("KOO_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let server = Self(child, port);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < until, "{bin} did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The embedded stores keep the contracts.
#[tokio::test]
async fn the_embedded_store_keeps_the_contract() {
    let store = Store::from(MemoryStore::new(MemoryConfig::default()));
    contract(&store, BackendKind::Memory).await;
    assert!(store.as_memory().is_some() && store.as_redis().is_none());
    schedule_contract(&ScheduleStore::memory()).await;
}

/// Redis keeps the same contracts.
#[tokio::test]
async fn redis_keeps_the_contract() {
    let server = Server::start().await;
    let url = format!("redis://127.0.0.1:{}/0", server.1);
    let redis = RedisStore::connect(&RedisConfig::new(url)).unwrap();
    let store = Store::from(redis.clone());
    contract(&store, BackendKind::Redis).await;
    assert!(store.as_redis().is_some() && store.as_memory().is_none());
    schedule_contract(&ScheduleStore::redis(redis, "koo")).await;
}
