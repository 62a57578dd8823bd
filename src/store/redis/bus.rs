//! The cache change bus on Redis: `PUBLISH` of changes on one channel, the
//! "someone watches" flag, and the Pub/Sub connection a koo with watchers
//! holds (see `crate::cache::bus` for the protocol).
//!
//! The subscription is a connection of its own (a subscribed connection
//! cannot serve other commands), made by the pool's client, so it has the
//! pool's TLS and credentials. With an ACL, koo's user needs the channels
//! (`&{prefix}:v1:cache:changes`, and for expiries
//! `&__keyevent@{db}__:expired &__keyevent@{db}__:evicted`).

use std::time::Duration;

use redis::Script;
use redis::aio::PubSubSink;

use super::RedisStore;
use super::keyevents::Messages;
use super::kv::ttl_millis;
use crate::store::{Deadline, Result, StoreError};

/// The channels of Redis keyspace notifications that say a key expired or
/// was evicted, in database `db` (only sent when the operator enabled
/// `notify-keyspace-events` with `Ex` / `Exe`).
pub fn keyevent_channels(db: i64) -> [String; 2] {
    [
        format!("__keyevent@{db}__:expired"),
        format!("__keyevent@{db}__:evicted"),
    ]
}

impl RedisStore {
    /// Publishes a change's payload on `channel`. A retry may publish it
    /// twice, which is harmless: a change says only what to drop.
    pub async fn publish_change(
        &self,
        channel: &str,
        payload: &[u8],
        deadline: Deadline,
    ) -> Result<()> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload);
        self.query::<u64>(&cmd, deadline).await.map(|_| ())
    }

    /// Sets the flag `key` (for `ttl`) or keeps it alive; answers its age
    /// by Redis's clock (zero when this call set it).
    pub async fn hold_flag(
        &self,
        key: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<Duration> {
        let script = Script::new(include_str!("lua/watch_flag.lua"));
        let mut invocation = script.prepare_invoke();
        invocation.key(key).arg(ttl_millis(ttl));
        let invocation = &invocation;
        let age: u64 = self
            .run(deadline, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(Duration::from_millis(age))
    }

    /// Whether the flag `key` is set.
    pub async fn flag_is_set(&self, key: &str, deadline: Deadline) -> Result<bool> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(key);
        self.query::<u64>(&cmd, deadline).await.map(|n| n > 0)
    }

    /// The database koo's URL selects (keyspace notifications name it).
    pub fn db(&self) -> i64 {
        self.inner.connector.db()
    }

    /// Opens a Pub/Sub connection subscribed to `channels`: its sink (to
    /// ping it) and its messages, until the connection is lost (then the
    /// stream ends). On a Cluster, keyspace notification channels are
    /// subscribed on every master (see [`super::keyevents`]).
    pub async fn subscribe(&self, channels: &[String]) -> Result<(PubSubSink, Messages)> {
        let open = async {
            if self.is_cluster() {
                return self.subscribe_cluster(channels).await;
            }
            let mut pubsub = self.inner.connector.pubsub().await?;
            pubsub.subscribe(channels).await?;
            let (sink, messages) = pubsub.split();
            Ok::<_, redis::RedisError>((sink, Box::pin(messages) as Messages))
        };
        match tokio::time::timeout(self.inner.connect_timeout * 2, open).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("subscribe: {e}"))),
            Err(_) => Err(StoreError::Unavailable("subscribe: timed out".into())),
        }
    }
}
