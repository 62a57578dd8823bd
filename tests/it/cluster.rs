//! koo on a real Redis Cluster (six `redis-server` processes started by the
//! test): the cache and the task engine through a real gRPC channel.

use crate::common;

use common::Env;
use koo::pb::cache::v1::{self as pb, CacheLevel, cache_value::Kind};

fn text(s: &str) -> Option<pb::CacheValue> {
    Some(pb::CacheValue {
        kind: Some(Kind::Text(s.into())),
    })
}

/// Entries land on every master and read back through any slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_set_get_spreads_over_masters() {
    let env = Env::cluster().await;
    let mut cache = env.cache();
    for i in 0..60 {
        cache
            .set(pb::SetRequest {
                level: CacheLevel::Api as i32,
                key: format!("k{i}"),
                value: text(&format!("v{i}")),
                ttl: None,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for i in 0..60 {
        let got = cache
            .get(pb::GetRequest {
                level: CacheLevel::Api as i32,
                key: format!("k{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.value, text(&format!("v{i}")), "k{i}");
    }
    let common::Backend::Cluster(cluster) = &env.backend else {
        unreachable!()
    };
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3);
    let mut holding = 0;
    for port in masters {
        let node = cluster.nodes.iter().find(|n| n.port == port).unwrap();
        let mut c = node.conn().await;
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
        holding += usize::from(n > 0);
    }
    assert_eq!(holding, 3, "60 keys spread over all three masters");
}
