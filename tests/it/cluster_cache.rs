//! The cache on a real Redis Cluster (three masters, three replicas, started
//! by the test) through a real gRPC channel: listings page across every
//! master, walks (ClearLevel, key counts, cleanup) see every master, SetMany
//! is all-or-nothing per slot, and a master killed with SIGKILL leaves koo
//! serving the other masters' keys, then all of them after the failover.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::TestCluster;
use common::{EVENT_TIMEOUT, Env};
use koo::pb::cache::v1::{self as pb, CacheLevel, cache_value::Kind};
use koo::store::{CacheBackend, Deadline, RedisConfig, RedisStore};
use tonic::Code;

type Client = pb::cache_service_client::CacheServiceClient<tonic::transport::Channel>;

fn text(s: &str) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(Kind::Text(s.into())),
    })
}

fn entry(level: CacheLevel, key: &str) -> pb::CacheEntry {
    pb::CacheEntry {
        level: level as i32,
        key: key.into(),
        value: text(key),
        ..Default::default()
    }
}

fn cluster(env: &Env) -> &TestCluster {
    match &env.backend {
        common::Backend::Cluster(c) => c,
        _ => unreachable!("a cluster env"),
    }
}

async fn found(c: &mut Client, level: CacheLevel, key: &str) -> bool {
    c.get(pb::GetRequest {
        level: level as i32,
        key: key.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .found
}

/// How many keys matching `pattern` each master holds, by master port.
async fn keys_per_master(cluster: &TestCluster, pattern: &str) -> Vec<(u16, usize)> {
    let mut out = Vec::new();
    for port in cluster.masters().await {
        let mut c = cluster.conn_at(port).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .unwrap();
        out.push((port, keys.len()));
    }
    out.sort();
    out
}

/// A Cluster connection of the test's own, to write behind koo's back.
async fn direct(cluster: &TestCluster) -> redis::cluster_async::ClusterConnection {
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("redis://{}/", n.addr()))
        .collect();
    redis::cluster::ClusterClient::new(nodes)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

/// `field` of a node's `INFO replication`.
async fn replication(node: &common::cluster::Node, field: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut node.conn().await)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_default()
        .to_owned()
}

/// Waits until the replica of the master on `port` has synced with it and
/// holds everything it was sent (a replica that never synced cannot be
/// promoted; a fresh cluster's replicas sync a moment after it is made).
async fn wait_replicated(cluster: &TestCluster, port: u16) {
    let master = cluster.nodes.iter().find(|n| n.port == port).unwrap();
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let sent: u64 = replication(master, "master_repl_offset")
            .await
            .parse()
            .unwrap();
        let mut synced = false;
        for node in &cluster.nodes {
            if node.port != port
                && replication(node, "master_port").await == port.to_string()
                && replication(node, "master_link_status").await == "up"
            {
                let held: u64 = replication(node, "slave_repl_offset")
                    .await
                    .parse()
                    .unwrap_or(0);
                synced |= held >= sent;
            }
        }
        if synced {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica of {port} never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The port of the master that holds `key`'s slot (the one that does not
/// answer MOVED).
async fn owner(cluster: &TestCluster, key: &str) -> u16 {
    for port in cluster.masters().await {
        let mut c = cluster.conn_at(port).await;
        let owns: redis::RedisResult<u64> = redis::cmd("EXISTS").arg(key).query_async(&mut c).await;
        if owns.is_ok() {
            return port;
        }
    }
    panic!("no master owns {key}");
}

/// ListKeys pages, with a cursor, through keys held by all three masters:
/// every key once at least, nothing else, then an empty token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_pages_through_every_master() {
    let env = Env::cluster().await;
    let mut c = env.cache();
    let entries = (0..300)
        .map(|i| entry(CacheLevel::Db, &format!("item:{i:03}")))
        .collect();
    c.set_many(pb::SetManyRequest { entries }).await.unwrap();
    let spread = keys_per_master(cluster(&env), "koo:cache:db:item:*").await;
    assert!(spread.iter().all(|(_, n)| *n > 0), "{spread:?}");
    assert_eq!(spread.iter().map(|(_, n)| n).sum::<usize>(), 300);
    let mut seen = BTreeSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_keys(pb::ListKeysRequest {
                level: CacheLevel::Db as i32,
                pattern: "item:*".into(),
                page_size: 25,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= 25);
        seen.extend(page.keys);
        pages += 1;
        assert!(pages < 100, "listing never ended");
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: BTreeSet<String> = (0..300).map(|i| format!("item:{i:03}")).collect();
    assert_eq!(seen, expected);
    assert!(pages >= 12, "{pages} pages of 25 for 300 keys");
}

/// ClearLevel, the key counts of GetMetrics, the cleanup of keys without a
/// TTL (written behind koo's back on every master), the sampling of the
/// largest keys and the memory figures see every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walks_see_every_master() {
    let env = Env::cluster().await;
    let mut c = env.cache();
    let entries = (0..90)
        .map(|i| entry(CacheLevel::Api, &format!("k{i}")))
        .collect();
    c.set_many(pb::SetManyRequest { entries }).await.unwrap();
    c.set(pb::SetRequest {
        level: CacheLevel::App as i32,
        key: "keep".into(),
        value: text("v"),
        ..Default::default()
    })
    .await
    .unwrap();
    let m = c
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert_eq!(m.total.unwrap().keys, 91);
    let api = m
        .levels
        .iter()
        .find(|l| l.level == CacheLevel::Api as i32)
        .unwrap();
    assert_eq!(api.counters.unwrap().keys, 90);
    assert!(m.backend_used_memory_bytes > 0);

    // keys without a TTL on every master: the cleanup removes them all
    // (the store's own walk: StartMaintenance runs it as a task)
    let cluster = cluster(&env);
    let mut direct = direct(cluster).await;
    for i in 0..30 {
        let _: () = redis::cmd("SET")
            .arg(format!("koo:cache:db:persistent:{i}"))
            .arg("x")
            .query_async(&mut direct)
            .await
            .unwrap();
    }
    let spread = keys_per_master(cluster, "koo:cache:db:persistent:*").await;
    assert!(spread.iter().all(|(_, n)| *n > 0), "{spread:?}");
    let store = RedisStore::connect(&RedisConfig::new(cluster.url())).unwrap();
    let deadline = || Deadline::after(EVENT_TIMEOUT);
    let cleanup = store.cleanup("koo:cache:*", deadline()).await.unwrap();
    assert_eq!(cleanup.removed_without_ttl, 30, "{cleanup:?}");
    assert_eq!(cleanup.scanned, 121, "{cleanup:?}");
    let left = keys_per_master(cluster, "koo:cache:db:persistent:*").await;
    assert!(left.iter().all(|(_, n)| *n == 0), "{left:?}");
    // the largest keys, sampled on every master (MEMORY USAGE per slot)
    let big = "x".repeat(10_000);
    let _: () = redis::cmd("SET")
        .arg("koo:cache:db:big")
        .arg(&big)
        .arg("EX")
        .arg(60)
        .query_async(&mut direct)
        .await
        .unwrap();
    let (sampled, largest) = store
        .largest_keys("koo:cache:*", 1000, 3, deadline())
        .await
        .unwrap();
    assert_eq!(sampled, 92);
    assert_eq!(largest[0].key, "koo:cache:db:big");
    assert!(largest[0].bytes >= 10_000);
    let memory = store.memory(deadline()).await.unwrap();
    assert!(
        memory.used > 0 && memory.unavailable.is_none(),
        "{memory:?}"
    );

    let cleared = c
        .clear_level(pb::ClearLevelRequest {
            level: CacheLevel::Api as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.deleted_count, 90);
    let left = keys_per_master(cluster, "koo:cache:api:*").await;
    assert!(left.iter().all(|(_, n)| *n == 0), "{left:?}");
    assert!(found(&mut c, CacheLevel::App, "keep").await);
}

/// SetMany is one MULTI/EXEC per slot: when one master refuses writes (out
/// of memory), the entries of its slot are all absent, even with several
/// keys sharing a `{hash tag}`, while another slot's entries are written;
/// the call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_many_is_all_or_nothing_per_slot() {
    let env = Env::cluster().await;
    let cluster = cluster(&env);
    let mut c = env.cache();
    let doomed = owner(cluster, "koo:cache:app:{doomed}:1").await;
    let mut safe_tag = None;
    for i in 0..100 {
        let tag = format!("safe{i}");
        if owner(cluster, &format!("koo:cache:app:{{{tag}}}:1")).await != doomed {
            safe_tag = Some(tag);
            break;
        }
    }
    let safe_tag = safe_tag.expect("a tag on another master");
    let mut node = cluster.conn_at(doomed).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut node)
        .await
        .unwrap();
    let doomed_keys: Vec<String> = (1..=3).map(|i| format!("{{doomed}}:{i}")).collect();
    let safe_keys: Vec<String> = (1..=2).map(|i| format!("{{{safe_tag}}}:{i}")).collect();
    let entries = doomed_keys
        .iter()
        .chain(&safe_keys)
        .map(|k| entry(CacheLevel::App, k))
        .collect();
    let err = c
        .set_many(pb::SetManyRequest { entries })
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    for k in &doomed_keys {
        assert!(!found(&mut c, CacheLevel::App, k).await, "{k} was written");
    }
    for k in &safe_keys {
        assert!(
            found(&mut c, CacheLevel::App, k).await,
            "{k} was not written"
        );
    }
    // the master takes writes again: the whole batch goes through
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut node)
        .await
        .unwrap();
    let entries = doomed_keys
        .iter()
        .map(|k| entry(CacheLevel::App, k))
        .collect();
    c.set_many(pb::SetManyRequest { entries }).await.unwrap();
    for k in &doomed_keys {
        assert!(found(&mut c, CacheLevel::App, k).await, "{k}");
    }
}

/// A master killed with SIGKILL: reads of keys on the other masters keep
/// working while its replica is not yet promoted, and once it is (about
/// cluster-node-timeout, 1 s, later) koo serves the lost master's slots
/// again within a bounded time, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_leaves_the_cache_serving_after_failover() {
    let mut env = Env::cluster().await;
    // Redis's default stops the whole Cluster (CLUSTERDOWN) while any slot
    // has no master; the README advises this for reads to go on meanwhile.
    for node in &cluster(&env).nodes {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-require-full-coverage")
            .arg("no")
            .query_async(&mut node.conn().await)
            .await
            .unwrap();
    }
    let mut c = env.cache();
    let entries = (0..30)
        .map(|i| entry(CacheLevel::App, &format!("k{i}")))
        .collect();
    c.set_many(pb::SetManyRequest { entries }).await.unwrap();
    let victim = owner(cluster(&env), "koo:cache:app:k0").await;
    let mut others = Vec::new();
    for i in 1..30 {
        let key = format!("k{i}");
        if owner(cluster(&env), &format!("koo:cache:app:{key}")).await != victim {
            others.push(key);
        }
    }
    assert!(others.len() >= 10, "{others:?}");
    wait_replicated(cluster(&env), victim).await;
    // a listing begun before the failover
    let list = |page_token: String| pb::ListKeysRequest {
        level: CacheLevel::App as i32,
        pattern: "k*".into(),
        page_size: 5,
        page_token,
    };
    let first = c.list_keys(list(String::new())).await.unwrap().into_inner();
    assert!(!first.next_page_token.is_empty());
    let common::Backend::Cluster(cl) = &mut env.backend else {
        unreachable!()
    };
    cl.node(victim).kill();
    let killed = Instant::now();
    // the other masters' keys are read throughout, until the lost slots are
    // served again (by the promoted replica)
    let mut reads = 0;
    let back = loop {
        for key in &others {
            let got = c
                .get(pb::GetRequest {
                    level: CacheLevel::App as i32,
                    key: key.clone(),
                })
                .await;
            let got = got.unwrap_or_else(|e| {
                panic!(
                    "{key} on a live master, {:?} after the kill: {e:?}",
                    killed.elapsed()
                )
            });
            assert!(got.into_inner().found, "{key}");
            reads += 1;
        }
        let set = c
            .set(pb::SetRequest {
                level: CacheLevel::App as i32,
                key: "k0".into(),
                value: text("again"),
                ..Default::default()
            })
            .await;
        if set.is_ok() && found(&mut c, CacheLevel::App, "k0").await {
            break killed.elapsed();
        }
        if killed.elapsed() >= EVENT_TIMEOUT {
            let masters = cluster(&env).masters().await;
            panic!(
                "the lost master's slots were not served again ({victim} killed; masters {masters:?}): {set:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "the lost master's slots served again {back:?} after the kill ({reads} reads meanwhile)"
    );
    assert!(reads > 0);
    assert!(
        back < Duration::from_secs(15),
        "served again after {back:?}"
    );
    // and the walks see every master again
    let cl = cluster(&env);
    cl.wait_ok().await;
    // (the promoted replica's slots reach every node's view by gossip)
    let until = Instant::now() + EVENT_TIMEOUT;
    while cl.masters().await.len() < 3 {
        assert!(Instant::now() < until, "no third master after the failover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (every node's view of the slots converges by gossip: until then a
    // walk is refused rather than partial, and the figures say so)
    loop {
        let m = c
            .get_metrics(pb::GetMetricsRequest {})
            .await
            .unwrap()
            .into_inner()
            .metrics
            .unwrap();
        let keys = m.total.unwrap().keys;
        if !m.partial && keys > others.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < until,
            "key counts after the failover: {keys}, partial: {}",
            m.partial_reason
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // the listing begun before cannot go on (a master it was to visit may
    // have been replaced): OUT_OF_RANGE, start again (while a node that
    // answers still sees the failed slots, a walk is UNAVAILABLE: that node
    // has not heard the gossip yet)
    let err = loop {
        let err = c
            .list_keys(list(first.next_page_token.clone()))
            .await
            .unwrap_err();
        let converging = err.code() == Code::Unavailable
            && err.message().contains("a failover may be under way");
        if !converging || Instant::now() > until {
            break err;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("start the listing again"), "{err:?}");
    let again = loop {
        match c.list_keys(list(String::new())).await {
            Err(e) if e.code() == Code::Unavailable && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => break other.unwrap().into_inner(),
        }
    };
    assert_eq!(again.keys.len(), 5);
}

/// koo's Redis user with exactly the documented ACL rules, created on every
/// node, is enough for the cache on a Cluster: the client's topology reads,
/// per-slot pipelines and transactions, the walks of every master and the
/// memory figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_rules_suffice_on_a_cluster() {
    let cluster = TestCluster::start().await;
    let rules: Vec<&str> = koo::store::redis::REDIS_ACL_RULES
        .split_whitespace()
        .collect();
    for node in &cluster.nodes {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("koo")
            .arg("reset")
            .arg("on")
            .arg(">koo-secret")
            .arg("~koo:*")
            .arg("resetchannels")
            .arg("&koo:v1:cache:changes")
            .arg(&rules)
            .query_async(&mut node.conn().await)
            .await
            .unwrap();
    }
    let url = cluster
        .url()
        .replace("redis+cluster://", "redis+cluster://koo:koo-secret@");
    let server =
        common::TestServer::spawn(common::test_settings(common::redis_settings(&url))).await;
    server
        .wait_health(
            "",
            tonic_health::pb::health_check_response::ServingStatus::Serving,
        )
        .await;
    let mut c = server.cache();
    let entries = (0..40)
        .map(|i| pb::CacheEntry {
            tags: vec![format!("t{}", i % 4)],
            ..entry(CacheLevel::Db, &format!("acl:{i}"))
        })
        .collect();
    c.set_many(pb::SetManyRequest { entries }).await.unwrap();
    let many = c
        .get_many(pb::GetManyRequest {
            level: CacheLevel::Db as i32,
            keys: (0..40).map(|i| format!("acl:{i}")).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(many.results.iter().all(|r| r.entry.as_ref().unwrap().found));
    let invalidated = c
        .invalidate_tags(pb::InvalidateTagsRequest {
            level: CacheLevel::Db as i32,
            tags: vec!["t0".into()],
        })
        .await
        .unwrap();
    assert_eq!(invalidated.into_inner().known_count, 1);
    assert!(!found(&mut c, CacheLevel::Db, "acl:0").await);
    assert!(found(&mut c, CacheLevel::Db, "acl:1").await);
    let listed = c
        .list_keys(pb::ListKeysRequest {
            level: CacheLevel::Db as i32,
            pattern: "acl:*".into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.keys.len() >= 30, "{}", listed.keys.len());
    let m = c
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert!(m.backend_used_memory_bytes > 0);
    assert!(m.total.unwrap().keys >= 30);
    let cleared = c
        .clear_level(pb::ClearLevelRequest {
            level: CacheLevel::Db as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.deleted_count >= 30);
}
