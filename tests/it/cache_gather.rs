//! Concurrent cache reads gathered into one pipeline (the Redis store's
//! `gather`), against a real Redis and a real Redis Cluster: every read gets
//! its own key's answer, one pipeline carries them, a lone read is sent on
//! its own, and no read outlives its deadline or waits forever when Redis
//! stops or dies, or when another reader gives up.

use crate::common;

use std::time::Duration;

use common::TestRedis;
use common::cluster::TestCluster;
use futures::FutureExt;
use futures::future::join_all;
use koo::store::{CacheBackend, Deadline, RedisConfig, RedisStore, StoreError};

fn deadline() -> Deadline {
    Deadline::after(common::EVENT_TIMEOUT)
}

/// Stores `key:i = value:i` with a TTL for even `i`; odd keys are missing.
async fn fill(store: &RedisStore, n: usize) {
    for i in (0..n).step_by(2) {
        let value = format!("value:{i}").into_bytes().into();
        store
            .set(
                &format!("key:{i}"),
                value,
                Duration::from_secs(600),
                deadline(),
            )
            .await
            .unwrap();
    }
}

/// `n` reads started together: each answers its own key (a hit with its
/// value and TTL, or a miss).
async fn read_together(store: &RedisStore, n: usize) {
    let keys: Vec<String> = (0..n).map(|i| format!("key:{i}")).collect();
    let replies = join_all(keys.iter().map(|k| store.get(k, deadline()))).await;
    for (i, reply) in replies.into_iter().enumerate() {
        let entry = reply.unwrap_or_else(|e| panic!("read {i}: {e}"));
        if i % 2 == 1 {
            assert!(entry.is_none(), "key:{i} was never set: {entry:?}");
            continue;
        }
        let entry = entry.unwrap_or_else(|| panic!("key:{i} was set"));
        assert_eq!(entry.value, format!("value:{i}").as_bytes());
        assert!(
            entry.ttl.is_some_and(|t| t > Duration::from_secs(500)),
            "{entry:?}"
        );
    }
}

/// Redis's count of reads from its clients' sockets.
async fn reads_processed(redis: &TestRedis) -> u64 {
    let reads = redis.info_field("stats", "total_reads_processed").await;
    reads.parse().expect("a count")
}

/// 32 reads started in one tick (a current-thread runtime): the first goes
/// out alone, the other 31 in one pipeline, so Redis reads the lot from its
/// sockets a few times instead of once per read (the pool has 20
/// connections, which ungathered reads would take in turn).
#[tokio::test]
async fn concurrent_reads_share_one_pipeline() {
    let redis = TestRedis::start().await;
    let store = RedisStore::connect(&RedisConfig::new(redis.url())).unwrap();
    fill(&store, 32).await;
    let before = reads_processed(&redis).await;
    read_together(&store, 32).await;
    let reads = reads_processed(&redis).await - before;
    // the lone read, the pipeline, this check's own connection and INFO
    // (7 here); ungathered, the 32 reads take the pool's 20 connections in
    // turn, at least one socket read each (27 here)
    assert!(
        reads < 16,
        "Redis read its sockets {reads} times for 32 reads"
    );
    assert_eq!(store.gathered_flushes(), 1);
}

/// On a Cluster the gathered reads go out per slot, and still each gets its
/// own key's answer.
#[tokio::test]
async fn gathered_reads_on_a_cluster_answer_per_key() {
    let cluster = TestCluster::start_with(3, 0).await;
    let store = RedisStore::connect(&RedisConfig::new(cluster.url())).unwrap();
    fill(&store, 40).await;
    read_together(&store, 40).await;
    assert_eq!(store.gathered_flushes(), 1);
}

/// Reads one after another are sent as they come: nothing is gathered.
#[tokio::test]
async fn a_lone_read_is_sent_on_its_own() {
    let redis = TestRedis::start().await;
    let store = RedisStore::connect(&RedisConfig::new(redis.url())).unwrap();
    fill(&store, 4).await;
    for i in 0..4 {
        store.get(&format!("key:{i}"), deadline()).await.unwrap();
    }
    assert_eq!(store.gathered_flushes(), 0);
}

/// A reader that gives up (its future dropped after it joined the queue)
/// leaves the others answered.
#[tokio::test]
async fn a_reader_that_gives_up_leaves_the_others_answered() {
    let redis = TestRedis::start().await;
    let store = RedisStore::connect(&RedisConfig::new(redis.url())).unwrap();
    fill(&store, 4).await;
    let mut first = Box::pin(store.get("key:0", deadline()));
    let mut quitter = Box::pin(store.get("key:2", deadline()));
    let mut other = Box::pin(store.get("key:0", deadline()));
    assert!(
        (&mut first).now_or_never().is_none(),
        "the lone read waits on Redis"
    );
    assert!((&mut quitter).now_or_never().is_none(), "joined the queue");
    assert!((&mut other).now_or_never().is_none(), "joined the queue");
    drop(quitter);
    let within = common::EVENT_TIMEOUT;
    let first = tokio::time::timeout(within, first).await.expect("answered");
    let other = tokio::time::timeout(within, other).await.expect("answered");
    assert_eq!(first.unwrap().unwrap().value, "value:0".as_bytes());
    assert_eq!(other.unwrap().unwrap().value, "value:0".as_bytes());
    assert_eq!(store.gathered_flushes(), 1);
}

/// Redis stopped (SIGSTOP): a gathered read with a short deadline ends with
/// DEADLINE_EXCEEDED while one with a longer deadline still waits, and that
/// one is answered once Redis goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gathered_read_keeps_its_own_deadline() {
    let redis = TestRedis::start().await;
    let store = RedisStore::connect(&RedisConfig::new(redis.url())).unwrap();
    fill(&store, 2).await;
    redis.signal("STOP");
    let patient = tokio::spawn({
        let store = store.clone();
        async move { store.get("key:0", deadline()).await }
    });
    // joins the queue behind the patient read (in flight, unanswered)
    let hurried = store
        .get("key:0", Deadline::after(Duration::from_millis(300)))
        .await;
    assert!(
        matches!(hurried, Err(StoreError::DeadlineExceeded)),
        "{hurried:?}"
    );
    assert!(!patient.is_finished(), "the patient read waits for Redis");
    redis.signal("CONT");
    let patient = tokio::time::timeout(common::EVENT_TIMEOUT, patient)
        .await
        .expect("answered after SIGCONT")
        .unwrap();
    assert_eq!(patient.unwrap().unwrap().value, "value:0".as_bytes());
}

/// Redis killed under 16 concurrent reads: every one ends with an error, none
/// waits forever (bounded here by the test's own timeout).
#[tokio::test]
async fn gathered_reads_fail_when_redis_dies() {
    let mut redis = TestRedis::start().await;
    let store = RedisStore::connect(&RedisConfig::new(redis.url())).unwrap();
    fill(&store, 2).await;
    redis.kill();
    let short = || Deadline::after(Duration::from_secs(2));
    let reads = join_all((0..16).map(|_| store.get("key:0", short())));
    let replies = tokio::time::timeout(common::EVENT_TIMEOUT, reads)
        .await
        .expect("every read ended");
    for reply in replies {
        assert!(reply.is_err(), "{reply:?}");
    }
}
