//! Subscribing on a Redis Cluster. A `PUBLISH` reaches subscribers on every
//! node, so koo's own channels need one subscription (on a seed node); but
//! keyspace notifications (`__keyevent@0__:expired`...) are sent only by the
//! node holding the key, so those channels are subscribed on every master.
//!
//! The messages of all the connections come as one stream, which ends as
//! soon as any connection is lost or the set of masters changes (checked
//! every second: a failover promoted a replica, a resharding added a
//! master), so that the subscriber (the cache's bus) resubscribes on the
//! masters of the moment and tells its watchers that changes may have been
//! missed.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt, future, stream};
use redis::aio::PubSubSink;
use redis::{ConnectionAddr, RedisError, RedisResult};

use super::RedisStore;
use super::conn::{self, Connector};

/// Messages of one subscription, until it is lost.
pub type Messages = Pin<Box<dyn Stream<Item = redis::Msg> + Send>>;

/// How often the masters of a subscribed Cluster are read again.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// Whether `channel` is a keyspace notification channel (local to a node).
fn is_keyevent(channel: &str) -> bool {
    channel.starts_with("__keyevent@") || channel.starts_with("__keyspace@")
}

impl RedisStore {
    /// Subscribes `channels` on a Cluster: see the module documentation.
    pub(super) async fn subscribe_cluster(
        &self,
        channels: &[String],
    ) -> RedisResult<(PubSubSink, Messages)> {
        let (local, global): (Vec<&String>, Vec<&String>) =
            channels.iter().partition(|c| is_keyevent(c));
        let connector = &self.inner.connector;
        let mut pubsub = connector.pubsub().await?;
        pubsub.subscribe(&global).await?;
        let (sink, first) = pubsub.split();
        if local.is_empty() {
            return Ok((sink, Box::pin(first)));
        }
        let masters = conn::masters(&mut self.conn()).await?;
        let mut streams: Vec<Messages> = vec![Box::pin(first)];
        for master in &masters {
            let mut pubsub = pubsub_at(connector, master)?.get_async_pubsub().await?;
            pubsub.subscribe(&local).await?;
            let (node_sink, messages) = pubsub.split();
            // the sink lives as long as its stream
            streams.push(Box::pin(messages.map(move |m| {
                let _ = &node_sink;
                m
            })));
        }
        streams.push(Box::pin(until_masters_change(self.clone(), masters)));
        // each stream says when it ends; the first end ends them all
        let ends = streams
            .into_iter()
            .map(|s| s.map(Some).chain(stream::once(future::ready(None))));
        let merged = stream::select_all(ends)
            .take_while(|m| future::ready(m.is_some()))
            .filter_map(future::ready);
        Ok((sink, Box::pin(merged)))
    }
}

/// A stream of nothing that ends when the masters differ from `masters`.
fn until_masters_change(
    store: RedisStore,
    masters: Vec<String>,
) -> impl Stream<Item = redis::Msg> + Send {
    stream::once(async move {
        let mut tick = tokio::time::interval(TOPOLOGY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = tokio::time::timeout(TOPOLOGY_EVERY, conn::masters(&mut store.conn())).await;
            match now {
                Ok(Ok(now)) if now != masters => {
                    tracing::info!(before = ?masters, now = ?now, "the Redis Cluster's masters changed; subscribing again");
                    return;
                }
                // a failed read proves nothing: the connections' own end
                // tells of a lost node
                _ => {}
            }
        }
    })
    .filter_map(|()| future::ready(None))
}

/// A client of the node at `addr` (`host:port`), with the seed nodes'
/// credentials and TLS.
fn pubsub_at(connector: &Connector, addr: &str) -> RedisResult<redis::Client> {
    let Connector::Cluster { seeds, .. } = connector else {
        return Err(not_a_node(addr));
    };
    let seed = seeds.first().ok_or_else(|| not_a_node(addr))?;
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse().ok()?)))
        .ok_or_else(|| not_a_node(addr))?;
    let info = seed.get_connection_info().clone();
    let node = match info.addr().clone() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            tls_params,
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    redis::Client::open(info.set_addr(node))
}

fn not_a_node(addr: &str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "not a Cluster node address",
        addr.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keyspace notifications are per node; koo's channels are not.
    #[test]
    fn keyevent_channels_are_local() {
        assert!(is_keyevent("__keyevent@0__:expired"));
        assert!(is_keyevent("__keyspace@0__:koo:x"));
        assert!(!is_keyevent("koo:v1:cache:changes"));
    }
}
