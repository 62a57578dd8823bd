//! The nodes a walk of the keyspace visits, and one `SCAN` step on one of
//! them: the server itself, or every master of a Cluster (`SCAN` is per
//! node; a Cluster client would send it to a random one).
//!
//! A walk that cannot see every slot fails rather than answer a silent
//! part: before it starts, the Cluster must report every slot assigned and
//! none failed (a master that died is only replaced once a replica is
//! promoted, `cluster-node-timeout` later), and a master failing during
//! the walk fails its `SCAN`, so the call, `UNAVAILABLE`.

use super::RedisStore;
use super::conn;
use crate::store::{Deadline, Result, StoreError};

/// Slots of a Redis Cluster.
const SLOTS: &str = "16384";

impl RedisStore {
    /// The nodes to walk, sorted: `[""]` (the server; no round trip) on one
    /// server, the masters' `host:port` on a Cluster whose slots are all
    /// served.
    pub(super) async fn walk_nodes(&self, deadline: Deadline) -> Result<Vec<String>> {
        if !self.is_cluster() {
            return Ok(vec![String::new()]);
        }
        let (masters, info) = self
            .run(deadline, |mut c| async move {
                let masters = conn::masters(&mut c).await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await?;
                Ok((masters, info))
            })
            .await?;
        check_coverage(&info)?;
        if masters.is_empty() {
            return Err(StoreError::Unavailable(
                "the Redis Cluster reports no master serving slots".into(),
            ));
        }
        Ok(masters)
    }

    /// One `SCAN` step on `node` (`""`: the server). Keys come back as
    /// bytes: anything can write into a shared Redis, and a key that is not
    /// UTF-8 must not fail the walk.
    pub(super) async fn scan_node(
        &self,
        node: &str,
        pattern: &str,
        cursor: u64,
        count: usize,
        deadline: Deadline,
    ) -> Result<(u64, Vec<Vec<u8>>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        if node.is_empty() {
            return self.query(&cmd, deadline).await;
        }
        let cmd = &cmd;
        self.run(
            deadline,
            |mut c| async move { c.query_node(node, cmd).await },
        )
        .await
        .map_err(|e| match e {
            StoreError::Unavailable(why) => {
                StoreError::Unavailable(format!("Cluster master {node}: {why}"))
            }
            other => other,
        })
    }
}

/// Every slot assigned and none failed, by `CLUSTER INFO`; else why not.
fn check_coverage(info: &str) -> Result<()> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or("?")
    };
    let (assigned, failed) = (field("cluster_slots_assigned"), field("cluster_slots_fail"));
    if assigned == SLOTS && failed == "0" {
        return Ok(());
    }
    Err(StoreError::Unavailable(format!(
        "the Redis Cluster does not serve every slot ({assigned} of {SLOTS} assigned, \
         {failed} failed; a failover may be under way): a walk of the keys would miss some"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A walk starts only when every slot has a live master.
    #[test]
    fn coverage_from_cluster_info() {
        let ok = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\n";
        assert!(check_coverage(ok).is_ok());
        let failing = ok.replace("cluster_slots_fail:0", "cluster_slots_fail:5461");
        let e = check_coverage(&failing).unwrap_err().to_string();
        assert!(e.contains("5461 failed"), "{e}");
        let partial = ok.replace("assigned:16384", "assigned:10923");
        assert!(check_coverage(&partial).is_err());
        assert!(check_coverage("").is_err());
    }
}
