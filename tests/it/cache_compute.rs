//! Compute on miss, once (issue 19): GetOrLock, Fill and GetOrCompute end
//! to end, on each store in one process and on one Redis shared by two
//! `koo serve` binaries. Computations are counted by the test (who got a
//! token, what the external worker ran), so "exactly once" is checked, not
//! assumed. Waits are on replies; the only sleeps are a holder's "work" and
//! lock leases passing.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::Env;
use common::chaos::{KooProc, lazy_channel};
use koo::pb::cache::v1::{self as pb, cache_service_client::CacheServiceClient, cache_value::Kind};
use koo::pb::worker::v1::{self as wpb, worker_service_client::WorkerServiceClient};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

on_both_stores!(
    a_late_fill_stores_when_nobody_took_over,
    wait_and_deadline_end_a_wait,
    bad_input_is_refused_naming_the_field,
    get_or_compute_runs_one_task_for_ten_callers,
);
// (GetOrCompute on a Cluster needs the task engine there: the tasks slice.)
on_all_stores!(
    a_holder_that_never_fills_hands_over_after_lock_ttl,
    a_fill_without_value_hands_over_at_once,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_are_served_to_all_and_refreshed_once_memory() {
    stale_entries_are_served_to_all_and_refreshed_once(Env::memory().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_are_served_to_all_and_refreshed_once_redis() {
    stale_entries_are_served_to_all_and_refreshed_once(Env::redis().await).await;
}

fn ms(n: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: (n / 1000) as i64,
        nanos: ((n % 1000) * 1_000_000) as i32,
    })
}

fn text(s: &str) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(Kind::Text(s.into())),
    })
}

fn text_of(r: &pb::GetResponse) -> String {
    match r.value.as_ref().and_then(|v| v.kind.clone()) {
        Some(Kind::Text(t)) => t,
        other => panic!("unexpected value {other:?}"),
    }
}

/// Sets `key` in the app level to the text `value`, with `(ttl, soft_ttl)`
/// in milliseconds when given.
async fn set_app(
    c: &mut CacheServiceClient<Channel>,
    key: &str,
    value: &str,
    ttls: Option<(u64, u64)>,
) {
    let (ttl, soft_ttl) = ttls.map_or((None, None), |(t, s)| (ms(t), ms(s)));
    c.set(pb::SetRequest {
        level: pb::CacheLevel::App as i32,
        key: key.into(),
        value: text(value),
        ttl,
        soft_ttl,
        ..Default::default()
    })
    .await
    .expect("Set");
}

fn lock_req(key: &str, lock_ttl_ms: u64, wait_ms: Option<u64>) -> pb::GetOrLockRequest {
    pb::GetOrLockRequest {
        level: pb::CacheLevel::App as i32,
        key: key.into(),
        lock_ttl: ms(lock_ttl_ms),
        wait: wait_ms.and_then(ms),
    }
}

fn fill_req(key: &str, token: &str, value: Option<&str>) -> pb::FillRequest {
    pb::FillRequest {
        level: pb::CacheLevel::App as i32,
        key: key.into(),
        lock_token: token.into(),
        value: value.and_then(text),
        ttl: ms(60_000),
        ..Default::default()
    }
}

async fn get_or_lock(
    c: &mut CacheServiceClient<Channel>,
    req: pb::GetOrLockRequest,
) -> pb::GetOrLockResponse {
    c.get_or_lock(req).await.expect("GetOrLock").into_inner()
}

/// The PTTL of a lock key in Redis (`-2` when absent).
async fn lock_pttl(redis_url: &str, key: &str) -> i64 {
    let mut pttl = redis::cmd("PTTL");
    pttl.arg(format!("koo:v1:clock:app:{key}"));
    if let Some(seeds) = redis_url.strip_prefix("redis+cluster://") {
        let nodes = seeds
            .trim_end_matches('/')
            .split(',')
            .map(|n| format!("redis://{n}/"));
        let mut conn = redis::cluster::ClusterClient::new(nodes)
            .unwrap()
            .get_async_connection()
            .await
            .expect("connect to the test cluster");
        return pttl.query_async(&mut conn).await.expect("PTTL");
    }
    let mut conn = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis");
    pttl.query_async(&mut conn).await.expect("PTTL")
}

fn redis_url(env: &Env) -> Option<String> {
    match &env.backend {
        common::Backend::Redis(r) => Some(r.url()),
        common::Backend::Cluster(c) => Some(c.url()),
        common::Backend::Memory => None,
    }
}

/// A holder that never fills keeps the key for its lock_ttl (300 ms), then
/// a waiter takes it over; the lock key expires in Redis; the first
/// holder's late Fill is refused, the new holder's stores the value.
async fn a_holder_that_never_fills_hands_over_after_lock_ttl(env: Env) {
    let mut c = env.cache();
    let first = get_or_lock(&mut c, lock_req("slow", 300, None)).await;
    assert!(!first.found);
    assert_eq!(first.lock_token.len(), 32, "{first:?}");
    assert!(first.lock_expire_time.is_some());
    if let Some(url) = redis_url(&env) {
        let pttl = lock_pttl(&url, "slow").await;
        assert!((1..=300).contains(&pttl), "lock PTTL {pttl}");
    }
    let started = Instant::now();
    let second = get_or_lock(&mut c, lock_req("slow", 30_000, Some(5_000))).await;
    let waited = started.elapsed();
    assert!(!second.found);
    assert_eq!(second.lock_token.len(), 32, "{second:?}");
    assert_ne!(second.lock_token, first.lock_token);
    assert!(
        waited >= Duration::from_millis(200),
        "took over after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "took over after {waited:?}"
    );
    let late = c
        .fill(fill_req("slow", &first.lock_token, Some("late")))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("lock was lost"), "{late:?}");
    let stored = c
        .fill(fill_req("slow", &second.lock_token, Some("v2")))
        .await
        .expect("Fill")
        .into_inner();
    assert!(stored.stored.is_some());
    if let Some(url) = redis_url(&env) {
        assert_eq!(
            lock_pttl(&url, "slow").await,
            -2,
            "a fill releases the lock"
        );
    }
    let hit = get_or_lock(&mut c, lock_req("slow", 300, None)).await;
    assert!(hit.found && hit.lock_token.is_empty(), "{hit:?}");
    assert_eq!(text_of(hit.entry.as_ref().unwrap()), "v2");
    // the same token again: the lock is gone
    let again = c
        .fill(fill_req("slow", &second.lock_token, Some("v3")))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
}

/// A holder slower than its lock_ttl (100 ms) whose lock nobody took over
/// still stores its value (else a computation slower than lock_ttl would
/// never be cached); one whose entry another caller stored meanwhile is
/// refused and leaves that entry; a give-up of a lapsed lock is a no-op.
async fn a_late_fill_stores_when_nobody_took_over(env: Env) {
    let mut c = env.cache();
    let slow = get_or_lock(&mut c, lock_req("late", 100, None)).await;
    let beaten = get_or_lock(&mut c, lock_req("beaten", 100, None)).await;
    let quitter = get_or_lock(&mut c, lock_req("quitter", 100, None)).await;
    // the "computation" outlasts the locks
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = c
        .fill(fill_req("late", &slow.lock_token, Some("slow but done")))
        .await
        .expect("a late Fill nobody raced")
        .into_inner();
    assert!(stored.stored.is_some(), "{stored:?}");
    let hit = get_or_lock(&mut c, lock_req("late", 100, None)).await;
    assert!(hit.found && hit.lock_token.is_empty(), "{hit:?}");
    assert_eq!(text_of(hit.entry.as_ref().unwrap()), "slow but done");
    if let Some(url) = redis_url(&env) {
        assert_eq!(
            lock_pttl(&url, "late").await,
            -2,
            "the retaken lock is released"
        );
    }
    // someone stored the entry after the lock lapsed: the late value loses
    set_app(&mut c, "beaten", "fresher", None).await;
    let late = c
        .fill(fill_req("beaten", &beaten.lock_token, Some("stale")))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert!(late.message().contains("stored the entry"), "{late:?}");
    let kept = get_or_lock(&mut c, lock_req("beaten", 100, None)).await;
    assert_eq!(text_of(kept.entry.as_ref().unwrap()), "fresher");
    // a stale entry too is another caller's newer value: refused as well
    let stale_one = get_or_lock(&mut c, lock_req("staled", 100, None)).await;
    set_app(&mut c, "staled", "newer, stale soon", Some((60_000, 1))).await;
    tokio::time::sleep(Duration::from_millis(150)).await; // the lock lapses, the entry goes stale
    let late = c
        .fill(fill_req("staled", &stale_one.lock_token, Some("older")))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    // giving up a lock that already lapsed: nothing to do, and no error
    let given = c
        .fill(fill_req("quitter", &quitter.lock_token, None))
        .await
        .expect("a give-up of a lapsed lock")
        .into_inner();
    assert_eq!(given.stored, None);
}

/// A Fill without a value gives the lock up: a waiter gets the token at
/// once, long before the 30 s lease would have passed.
async fn a_fill_without_value_hands_over_at_once(env: Env) {
    let mut c = env.cache();
    let first = get_or_lock(&mut c, lock_req("giveup", 30_000, None)).await;
    assert!(!first.lock_token.is_empty());
    let mut waiter = env.cache();
    let started = Instant::now();
    let waiting = tokio::spawn(async move {
        get_or_lock(&mut waiter, lock_req("giveup", 30_000, Some(10_000))).await
    });
    let given = c
        .fill(fill_req("giveup", &first.lock_token, None))
        .await
        .expect("Fill")
        .into_inner();
    assert_eq!(given.stored, None);
    let second = waiting.await.unwrap();
    assert_eq!(second.lock_token.len(), 32, "{second:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let miss = c
        .get(pb::GetRequest {
            level: pb::CacheLevel::App as i32,
            key: "giveup".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!miss.found, "a given-up lock stores nothing");
}

/// `wait` ends a wait with neither value nor token; without `wait`, the
/// call's deadline ends it with DEADLINE_EXCEEDED.
async fn wait_and_deadline_end_a_wait(env: Env) {
    let mut c = env.cache();
    let held = get_or_lock(&mut c, lock_req("held", 30_000, None)).await;
    assert!(!held.lock_token.is_empty());
    let started = Instant::now();
    let neither = get_or_lock(&mut c, lock_req("held", 30_000, Some(200))).await;
    assert!(
        !neither.found && neither.lock_token.is_empty(),
        "{neither:?}"
    );
    assert!(neither.entry.is_none());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(190), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    let mut req = tonic::Request::new(lock_req("held", 30_000, None));
    req.set_timeout(Duration::from_millis(300));
    let e = c.get_or_lock(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    // a call is one read, however often its wait looked: the holder's miss
    // and the two that gave up waiting (their `wait`, their deadline)
    assert_eq!(reads(&mut c).await, (0, 3), "(hits, misses)");
}

/// This koo's cache reads so far: (hits, misses) of every level.
async fn reads(c: &mut CacheServiceClient<Channel>) -> (i64, i64) {
    let m = c
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .expect("GetMetrics")
        .into_inner();
    let total = m.metrics.and_then(|m| m.total).expect("the total");
    (total.hits, total.misses)
}

/// An entry past its soft TTL (200 ms) is answered, stale, to each of 20
/// concurrent callers, and exactly one of them also gets a token; its Fill
/// makes the entry fresh again.
async fn stale_entries_are_served_to_all_and_refreshed_once(env: Env) {
    let mut c = env.cache();
    set_app(&mut c, "soft", "old", Some((60_000, 200))).await;
    // the soft TTL passing is the scenario
    tokio::time::sleep(Duration::from_millis(250)).await;
    let callers = (0..20).map(|_| {
        let mut c = env.cache();
        tokio::spawn(async move { get_or_lock(&mut c, lock_req("soft", 10_000, None)).await })
    });
    let replies: Vec<_> = futures::future::join_all(callers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let tokens: Vec<_> = replies
        .iter()
        .filter(|r| !r.lock_token.is_empty())
        .collect();
    assert_eq!(tokens.len(), 1, "refreshes: {replies:?}");
    for r in &replies {
        assert!(r.found, "{r:?}");
        let entry = r.entry.as_ref().unwrap();
        assert!(entry.stale, "{r:?}");
        assert_eq!(text_of(entry), "old");
    }
    c.fill(fill_req("soft", &tokens[0].lock_token, Some("new")))
        .await
        .expect("Fill");
    let fresh = get_or_lock(&mut c, lock_req("soft", 10_000, None)).await;
    assert!(fresh.lock_token.is_empty(), "{fresh:?}");
    let entry = fresh.entry.unwrap();
    assert!(!entry.stale);
    assert_eq!(text_of(&entry), "new");
}

/// GetOrCompute in one koo (each store): 10 concurrent callers, one task
/// (run by the test's external worker), its result for all.
async fn get_or_compute_runs_one_task_for_ten_callers(env: Env) {
    let ran = Arc::new(AtomicUsize::new(0));
    let worker = external_worker(env.server.channel.clone(), ran.clone());
    let callers = (0..10).map(|_| {
        let mut c = env.cache();
        tokio::spawn(async move {
            c.get_or_compute(pb::GetOrComputeRequest {
                key: "single".into(),
                task: Some(pb::ComputeTask {
                    name: EXT.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("GetOrCompute")
            .into_inner()
        })
    });
    let replies = futures::future::join_all(callers).await;
    worker.abort();
    assert_eq!(ran.load(Ordering::SeqCst), 1, "tasks run");
    let mut submitted = 0;
    for r in replies {
        let r = r.unwrap();
        submitted += usize::from(r.computed);
        assert!(!r.task_id.is_empty(), "every caller names the task: {r:?}");
        let value = r.entry.unwrap().value.and_then(|v| v.kind);
        let Some(Kind::Json(v)) = value else {
            panic!("{value:?}")
        };
        assert_eq!(v.kind, Some(prost_types::value::Kind::NumberValue(1.0)));
    }
    assert_eq!(submitted, 1);
    // one read per call: the caller that computed missed, the others got
    // the value (not a miss per poll of their wait, nor the computing
    // caller's read of what its task stored)
    assert_eq!(reads(&mut env.cache()).await, (9, 1), "(hits, misses)");
}

fn bad_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_else(|| panic!("no BadRequest detail in {status:?}"))
}

/// Every bad field is INVALID_ARGUMENT naming it.
async fn bad_input_is_refused_naming_the_field(env: Env) {
    let mut c = env.cache();
    let cases = [
        (lock_req("", 1000, None), "key"),
        (lock_req("k", 0, None), "lock_ttl"),
        (lock_req("k", 3_600_001, None), "lock_ttl"),
        (lock_req("k", 1000, Some(3_600_001)), "wait"),
    ];
    for (req, field) in cases {
        let e = c.get_or_lock(req).await.unwrap_err();
        assert_eq!(bad_field(&e), field);
    }
    let e = c.fill(fill_req("k", "nope", Some("v"))).await.unwrap_err();
    assert_eq!(bad_field(&e), "lock_token");
    assert!(e.message().contains("nope"), "{e:?}");
    // tokens are handed out in lower case; an upper-case copy is refused as
    // malformed, not reported as a lost lock
    let upper = c.fill(fill_req("k", &"A".repeat(32), Some("v"))).await;
    assert_eq!(bad_field(&upper.unwrap_err()), "lock_token");
    let mut no_ttl = fill_req("k", &"a".repeat(32), Some("v"));
    no_ttl.ttl = ms(0);
    assert_eq!(bad_field(&c.fill(no_ttl).await.unwrap_err()), "ttl");
    // well-formed, but no lock is held under it and the entry is there:
    // refused (without an entry it is taken for a lapsed holder's late
    // Fill and stores, as a Set would: a_late_fill_stores_when_nobody_took_over)
    set_app(&mut c, "k", "there", None).await;
    let e = c
        .fill(fill_req("k", &"a".repeat(32), Some("v")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let compute = |task: Option<pb::ComputeTask>, lock_ttl| pb::GetOrComputeRequest {
        key: "k".into(),
        task,
        lock_ttl,
        ..Default::default()
    };
    let named = |name: &str| {
        Some(pb::ComputeTask {
            name: name.into(),
            ..Default::default()
        })
    };
    for (req, field) in [
        (compute(None, None), "task"),
        (compute(named(""), None), "task.name"),
        (compute(named("t"), ms(500)), "lock_ttl"),
    ] {
        let e = c.get_or_compute(req).await.unwrap_err();
        assert_eq!(bad_field(&e), field);
    }
    // What only the compute task's end would have refused (its entry's
    // tags and soft TTL, its name's length, its queue) is refused before
    // the entry is read: on a miss nothing is submitted (the key's lock
    // stays free), and on a hit the same request fails too.
    let with = |key: &str, edit: &dyn Fn(&mut pb::GetOrComputeRequest)| {
        let mut r = compute(named("koo.diagnostics.echo"), None);
        r.key = key.into();
        edit(&mut r);
        r
    };
    type Edit<'a> = &'a dyn Fn(&mut pb::GetOrComputeRequest);
    let cases: [(Edit, &str); 6] = [
        (&|r| r.tags = vec![String::new()], "tags[0]"),
        (
            &|r| r.tags = (0..40).map(|i| format!("t{i}")).collect(),
            "tags",
        ),
        (
            &|r| (r.ttl, r.soft_ttl) = (ms(5_000), ms(6_000)),
            "soft_ttl",
        ),
        (&|r| r.task = named(&"n".repeat(300)), "task.name"),
        (
            &|r| r.task.as_mut().unwrap().queue = "nope".into(),
            "task.queue",
        ),
        (
            &|r| r.task.as_mut().unwrap().queue = "Bad Queue".into(),
            "task.queue",
        ),
    ];
    // the key is the request's own field, not the task's cache_result.key
    let e = c.get_or_compute(with("", &|_| {})).await.unwrap_err();
    assert_eq!(bad_field(&e), "key");
    c.set(pb::SetRequest {
        key: "hit".into(),
        value: text("v"),
        ..Default::default()
    })
    .await
    .unwrap();
    for (edit, field) in cases {
        for key in ["miss", "hit"] {
            let e = c.get_or_compute(with(key, edit)).await.unwrap_err();
            assert_eq!(bad_field(&e), field, "{key}: {e:?}");
        }
        let token = get_or_lock(&mut c, lock_req("miss", 1000, Some(0)))
            .await
            .lock_token;
        assert!(!token.is_empty(), "{field}: the miss's lock was taken");
        let filled = c.fill(fill_req("miss", &token, None)).await;
        assert!(filled.is_ok(), "{filled:?}");
    }
}

// ---------------------------------------------------------------------------
// Two koo instances on one Redis
// ---------------------------------------------------------------------------

/// Two `koo serve` binaries on one fresh Redis.
struct Pair {
    procs: Vec<KooProc>,
    channels: Vec<Channel>,
    redis: common::TestRedis,
    _logs: tempfile::TempDir,
}

impl Pair {
    async fn start() -> Self {
        let redis = common::TestRedis::start().await;
        let dir = tempfile::tempdir().expect("a log directory");
        let procs = common::chaos::serve_pair(redis.url(), 1, dir.path()).await;
        let channels = procs
            .iter()
            .map(|p| lazy_channel(p.port.expect("a serve port")))
            .collect();
        Self {
            procs,
            channels,
            redis,
            _logs: dir,
        }
    }

    fn cache(&self, i: usize) -> CacheServiceClient<Channel> {
        CacheServiceClient::new(self.channels[i % 2].clone())
    }
}

/// 50 concurrent callers of a cold key, alternating between two koo
/// instances, compute it once (the test counts who got a token) and all
/// receive the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_cold_callers_on_two_instances_compute_once() {
    let pair = Pair::start().await;
    let computed = Arc::new(AtomicUsize::new(0));
    let callers = (0..50).map(|i| {
        let mut c = pair.cache(i);
        let computed = computed.clone();
        tokio::spawn(async move {
            let r = get_or_lock(&mut c, lock_req("cold", 10_000, Some(20_000))).await;
            if r.found {
                return text_of(r.entry.as_ref().unwrap());
            }
            assert!(!r.lock_token.is_empty(), "neither value nor token: {r:?}");
            computed.fetch_add(1, Ordering::SeqCst);
            // the computation
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.fill(fill_req("cold", &r.lock_token, Some("computed")))
                .await
                .expect("Fill");
            "computed".to_owned()
        })
    });
    let values = futures::future::join_all(callers).await;
    assert_eq!(computed.load(Ordering::SeqCst), 1, "computations");
    for v in values {
        assert_eq!(v.unwrap(), "computed");
    }
}

/// The koo whose client holds the lock is killed (`kill -9`: its client's
/// computation dies with it); a waiter on the other koo takes over once
/// the lease (1 s) passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_holders_koo_hands_over_to_the_other() {
    let mut pair = Pair::start().await;
    let mut a = pair.cache(0);
    let held = get_or_lock(&mut a, lock_req("dies", 1_000, None)).await;
    assert!(!held.lock_token.is_empty());
    let mut b = pair.cache(1);
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let r = get_or_lock(&mut b, lock_req("dies", 5_000, Some(10_000))).await;
        (r, started.elapsed())
    });
    pair.procs[0].kill9();
    let (taken, waited) = waiting.await.unwrap();
    assert_eq!(taken.lock_token.len(), 32, "{taken:?}");
    assert_ne!(taken.lock_token, held.lock_token);
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    let pttl = lock_pttl(&pair.redis.url(), "dies").await;
    assert!(
        (1..=5_000).contains(&pttl),
        "the new lock expires: PTTL {pttl}"
    );
}

/// A task name no built-in worker serves: only the test's worker runs it.
const EXT: &str = "test.cache.compute";

/// GetOrCompute with a real task (run by an external worker over unary
/// LeaseTask on the second koo): 20 callers across both instances submit
/// it once and all get its result; then, for another key, the koo that
/// submitted the task is killed while it runs, and the task's success
/// still fills the entry for a caller on the other koo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_compute_runs_one_task_for_twenty_callers_and_outlives_its_koo() {
    let mut pair = Pair::start().await;
    let ran = Arc::new(AtomicUsize::new(0));
    let worker = external_worker(pair.channels[1].clone(), ran.clone());
    let req = |key: &str| pb::GetOrComputeRequest {
        level: pb::CacheLevel::App as i32,
        key: key.into(),
        task: Some(pb::ComputeTask {
            name: EXT.into(),
            ..Default::default()
        }),
        ttl: ms(60_000),
        ..Default::default()
    };
    let callers = (0..20).map(|i| {
        let mut c = pair.cache(i);
        let r = req("report");
        tokio::spawn(async move {
            c.get_or_compute(r)
                .await
                .expect("GetOrCompute")
                .into_inner()
        })
    });
    let replies = futures::future::join_all(callers).await;
    assert_eq!(ran.load(Ordering::SeqCst), 1, "tasks run");
    let mut computed = 0;
    for r in replies {
        let r = r.unwrap();
        computed += usize::from(r.computed);
        let entry = r.entry.expect("an entry");
        assert!(entry.found);
        assert!(matches!(
            entry.value.and_then(|v| v.kind),
            Some(Kind::Json(_))
        ));
    }
    assert_eq!(computed, 1, "one caller submitted the task");
    // its submit's idempotency key lives as long as the lock could (its
    // lock_ttl, 5 min by default; at least a minute), not
    // KOO_IDEMPOTENCY_TTL's day per computed entry
    let mut conn = pair.redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("koo:v1:idem:koo.cache.compute:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=300_000).contains(&pttl), "PTTL {pttl} ms");

    // The submitting koo dies while the task runs; the task still fills.
    let mut a = pair.cache(0);
    let submitting = tokio::spawn(async move { a.get_or_compute(req("orphan")).await });
    // the task is running once the worker has leased it
    while ran.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pair.procs[0].kill9();
    assert!(submitting.await.unwrap().is_err(), "its koo died");
    let mut b = pair.cache(1);
    let r = b
        .get_or_compute(req("orphan"))
        .await
        .expect("GetOrCompute")
        .into_inner();
    assert!(r.entry.unwrap().found);
    assert!(!r.computed, "the first task's result, not a second task");
    assert_eq!(ran.load(Ordering::SeqCst), 2, "tasks run");
    worker.abort();
}

/// An external worker over unary LeaseTask serving [`EXT`]: it counts the
/// tasks it ran, takes 300 ms over each, and completes each with
/// `{"n": <count>}`.
fn external_worker(channel: Channel, ran: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    let mut w = WorkerServiceClient::new(channel);
    tokio::spawn(async move {
        loop {
            let lease = w
                .lease_task(wpb::LeaseTaskRequest {
                    worker_name: "compute-ext".into(),
                    task_names: vec![EXT.into()],
                    queues: vec![],
                    wait: ms(500),
                })
                .await;
            let Some((task, r)) = lease
                .ok()
                .map(|r| r.into_inner())
                .and_then(|r| Some((r.task.clone()?, r)))
            else {
                // koo refused or the wait ran out: pace the retry
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let n = ran.fetch_add(1, Ordering::SeqCst) + 1;
            // the handler's work
            tokio::time::sleep(Duration::from_millis(300)).await;
            let result = prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(n as f64)),
            };
            let _ = w
                .complete_task(wpb::CompleteTaskRequest {
                    task_id: task.id.clone(),
                    lease_token: r.lease_token,
                    lease_secret: r.lease_secret.clone(),
                    result: Some(result),
                })
                .await;
        }
    })
}
