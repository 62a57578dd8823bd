//! A Redis Cluster partly down: one master lost (until its replica is
//! promoted, `cluster-node-timeout` and an election later) fails the calls
//! on its slots, while the other masters serve theirs.
//!
//! koo's breaker stands for "Redis is down": once open, every call fails at
//! once. Counting a lost master's failures against it would stop the whole
//! cache for one master's slots. So on a Cluster a failed call counts only
//! if no node answers a `PING` either; otherwise it fails on its own
//! (`UNAVAILABLE`, naming the error) and the breaker stays as it was. The
//! check costs a round trip on the failure path only.

use std::time::Duration;

use super::RedisStore;

impl RedisStore {
    /// Whether some node of this Cluster answers a `PING` within `bound`
    /// (never on one server: its failures always count).
    pub(super) async fn cluster_answers(&self, bound: Duration) -> bool {
        if !self.is_cluster() {
            return false;
        }
        let mut conn = self.conn();
        matches!(
            tokio::time::timeout(bound, conn.ping_any()).await,
            Ok(Ok(_))
        )
    }
}
