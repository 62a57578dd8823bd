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
        let mut c = cluster
            .nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap()
            .conn()
            .await;
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

/// The port of the master that holds `key`'s slot (the one that does not
/// answer MOVED).
async fn owner(cluster: &TestCluster, key: &str) -> u16 {
    for port in cluster.masters().await {
        let mut c = cluster
            .nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap()
            .conn()
            .await;
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

/// ClearLevel, the key counts of GetMetrics and the cleanup of keys without
/// a TTL (written behind koo's back on every master) see every master.
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
    let cluster = cluster(&env);
    let nodes: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("redis://{}/", n.addr()))
        .collect();
    let mut direct = redis::cluster::ClusterClient::new(nodes)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
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
    let report = c
        .start_maintenance(pb::StartMaintenanceRequest { wait: true })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    let cleanup = report.cleanup.unwrap();
    assert_eq!(cleanup.removed_without_ttl, 30, "{cleanup:?}");
    assert!(cleanup.scanned_keys >= 121, "{cleanup:?}");
    assert_eq!(report.sampled_keys, 91, "{report:?}");
    let left = keys_per_master(cluster, "koo:cache:db:persistent:*").await;
    assert!(left.iter().all(|(_, n)| *n == 0), "{left:?}");

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
    let mut node = cluster
        .nodes
        .iter()
        .find(|n| n.port == doomed)
        .unwrap()
        .conn()
        .await;
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
        assert!(
            killed.elapsed() < EVENT_TIMEOUT,
            "the lost master's slots were not served again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(reads > 0);
    assert!(
        back < Duration::from_secs(15),
        "served again after {back:?}"
    );
    // and the walks see every master again
    let cl = cluster(&env);
    cl.wait_ok().await;
    assert_eq!(cl.masters().await.len(), 3);
    let m = c
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert!(m.total.unwrap().keys >= others.len() as i64 + 1);
}
