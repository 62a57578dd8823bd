//! The connections a [`RedisStore`](super::RedisStore) calls through, whatever
//! the deployment: [`Conn`] is one pooled, multiplexed connection (to one
//! server, or a Cluster client that routes each command to its slot's
//! master and follows MOVED/ASK and failovers), and [`Connector`] makes them
//! and the connections of their own that blocking reads and Pub/Sub need.
//!
//! Every call site is written once against [`Conn`]; what differs on a
//! Cluster (a pipeline must stay in one slot; a walk of the keyspace visits
//! every master) is asked of [`Connector::is_cluster`] and handled where the
//! keys are known.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::{RedisConfig, is_tls, redact};
use crate::store::{Result, StoreError};

use super::sentinel::{SentinelConn, SentinelLink, SentinelSettings};
use super::topology::Topology;

/// One pooled connection (cheap to clone: clones share it).
#[derive(Clone)]
pub(crate) enum Conn {
    /// To one server; reconnects itself after an I/O error.
    Single(ConnectionManager),
    /// To a Redis Cluster: a connection per node, commands routed by slot.
    Cluster(ClusterConnection),
    /// To one server, of a caller's own (see [`Connector::dedicated`]): not
    /// reconnected; its owner makes a new one after an error.
    Own(MultiplexedConnection),
    /// To the primary the Sentinels name; follows a failover.
    Sentinel(SentinelConn),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Own(c) => c.req_packed_command(cmd),
            Self::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Own(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(_) => 0,
            Self::Own(c) => c.get_db(),
            Self::Sentinel(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Runs `cmd` on the node at `addr` (`host:port`, as
    /// [`Connector::masters`] names it); on a single server, on it.
    pub(crate) async fn query_node<T: redis::FromRedisValue>(
        &mut self,
        addr: &str,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match self {
            Self::Single(c) => cmd.query_async(c).await,
            Self::Own(c) => cmd.query_async(c).await,
            Self::Sentinel(c) => cmd.query_async(c).await,
            Self::Cluster(c) => {
                let (host, port) = split_addr(addr)?;
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                });
                let value = c.route_command(cmd.clone(), routing).await?;
                redis::from_redis_value(value).map_err(Into::into)
            }
        }
    }
}

impl Conn {
    /// `PING` to one node: the server, or any node of a Cluster. (The
    /// Cluster client sends a plain `PING` to every master, which one
    /// master down fails, while the Cluster still serves the other slots:
    /// the probe must not say "Redis is down" then.)
    pub(crate) async fn ping_any(&mut self) -> RedisResult<String> {
        let ping = redis::cmd("PING");
        match self {
            Self::Cluster(c) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                let value = c.route_command(ping, routing).await?;
                redis::from_redis_value(value).map_err(Into::into)
            }
            _ => ping.query_async(self).await,
        }
    }
}

fn split_addr(addr: &str) -> RedisResult<(&str, u16)> {
    addr.rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse().ok()?)))
        .ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "not a node address",
                addr.to_owned(),
            ))
        })
}

/// What makes connections: the client of one server or of a Cluster.
// One per store, built once and never moved on a hot path: the size of the
// Cluster client costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Connector {
    Single(redis::Client),
    Cluster {
        client: ClusterClient,
        /// The seed nodes' clients, for Pub/Sub (a message published on any
        /// node of a Cluster reaches subscribers on every node).
        seeds: Vec<redis::Client>,
    },
    /// The primary the Sentinels name (see [`super::sentinel`]).
    Sentinel(Arc<SentinelLink>),
}

impl Connector {
    /// The connector for `config`'s URL (which may name a Cluster).
    pub(crate) fn new(config: &RedisConfig) -> Result<Self> {
        let setting = config.setting;
        let bad = |e: RedisError| StoreError::InvalidConfig(format!("{setting}: {e}"));
        let topology = Topology::parse(&config.url)
            .map_err(|e| StoreError::InvalidConfig(format!("{setting}: {e}")))?;
        let tcp = tcp_settings(config);
        match topology {
            Topology::Single(url) => {
                let info = url.as_str().into_connection_info().map_err(bad)?;
                let info = info.set_tcp_settings(tcp);
                Ok(Self::Single(client(info, config, &url)?))
            }
            Topology::Cluster { nodes, tls } => {
                let mut builder = ClusterClientBuilder::new(nodes.clone())
                    .tcp_settings(tcp.clone())
                    .connection_timeout(config.connect_timeout)
                    // MOVED/ASK and a failover's reconnections; koo's own
                    // deadline and retries bound the call as a whole.
                    .retries(config.retries.max(1))
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if tls {
                    builder = builder.tls(redis::TlsMode::Secure);
                    if let Some(t) = &config.tls {
                        builder = builder.certs(t.certificates());
                    }
                } else if config.tls.is_some() {
                    return Err(plaintext_with_tls(config));
                }
                let client = builder.build().map_err(bad)?;
                let seeds = nodes
                    .iter()
                    .map(|n| {
                        let info = n.as_str().into_connection_info().map_err(bad)?;
                        client_with(info.set_tcp_settings(tcp.clone()), config, tls)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Self::Cluster { client, seeds })
            }
            Topology::Sentinel { .. } => {
                let link = Arc::new(sentinel_link(topology, tcp, config)?);
                link.follow_switches();
                Ok(Self::Sentinel(link))
            }
        }
    }

    /// Whether commands go to a Redis Cluster (pipelines must then stay
    /// within one slot, and walks must visit every master).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// `n` pooled connections, made lazily: koo starts (and reports
    /// NOT_SERVING) while Redis is down.
    pub(crate) fn pooled(&self, n: usize, config: &RedisConfig) -> Result<Vec<Conn>> {
        match self {
            Self::Single(client) => {
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(None)
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(100));
                (0..n.max(1))
                    .map(|_| {
                        ConnectionManager::new_lazy_with_config(
                            client.clone(),
                            manager_config.clone(),
                        )
                        .map(Conn::Single)
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| StoreError::InvalidConfig(format!("{}: {e}", config.setting)))
            }
            // A Cluster connection already holds one multiplexed connection
            // per node; a few of them spread the work of routing replies.
            Self::Cluster { client, .. } => Ok((0..n.clamp(1, 4))
                .map(|_| {
                    Conn::Cluster(client.get_pending_async_connection_with_config(
                        ClusterConfig::new().set_connection_timeout(config.connect_timeout),
                    ))
                })
                .collect()),
            Self::Sentinel(link) => Ok((0..n.max(1))
                .map(|_| Conn::Sentinel(SentinelConn::lazy(link.clone())))
                .collect()),
        }
    }

    /// Says that the current primary may be gone without an error (the
    /// recovery prober calls this while the breaker is open): with Sentinels,
    /// the next connection asks them again and follows a new primary, even
    /// if the old one only went silent. Nothing to do otherwise.
    pub(crate) fn suspect(&self) {
        if let Self::Sentinel(link) = self {
            link.suspect_current();
        }
    }

    /// A connection of its own (not shared with other calls), for commands
    /// that block it (`XREAD BLOCK`); replies wait up to `response_timeout`.
    pub(crate) async fn dedicated(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Conn> {
        match self {
            Self::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Conn::Own(conn))
            }
            Self::Cluster { client, .. } => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(response_timeout);
                Ok(Conn::Cluster(
                    client.get_async_connection_with_config(config).await?,
                ))
            }
            Self::Sentinel(link) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                Ok(Conn::Own(link.dedicated(&config).await?))
            }
        }
    }

    /// A Pub/Sub connection: to the server, or to the first seed node of a
    /// Cluster that answers.
    pub(crate) async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match self {
            Self::Single(client) => client.get_async_pubsub().await,
            Self::Cluster { seeds, .. } => {
                let mut last = None;
                for seed in seeds {
                    match seed.get_async_pubsub().await {
                        Ok(p) => return Ok(p),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RedisError::from((redis::ErrorKind::Io, "no seed node to subscribe on"))
                }))
            }
            Self::Sentinel(link) => link.pubsub().await,
        }
    }

    /// The database koo's URL selects (0 on a Cluster).
    pub(crate) fn db(&self) -> i64 {
        match self {
            Self::Single(client) => client.get_connection_info().redis_settings().db(),
            Self::Cluster { .. } => 0,
            Self::Sentinel(link) => link.db(),
        }
    }
}

/// The masters of a Cluster as `host:port` (from `CLUSTER SHARDS`, Redis 7,
/// else `CLUSTER NODES`); on a single server, `[""]` (one node, the server).
pub(crate) async fn masters(conn: &mut Conn) -> RedisResult<Vec<String>> {
    let Conn::Cluster(c) = conn else {
        return Ok(vec![String::new()]);
    };
    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
    let nodes = c
        .route_command(redis::cmd("CLUSTER").arg("NODES").clone(), routing)
        .await?;
    let text: String = redis::from_redis_value(nodes)?;
    Ok(parse_masters(&text))
}

/// The live masters' `host:port` in a `CLUSTER NODES` reply.
fn parse_masters(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let flags = fields.get(2)?;
            let is_master = flags.split(',').any(|f| f == "master");
            let failed = flags.split(',').any(|f| f == "fail" || f == "noaddr");
            // a master with no slots holds no keys
            let has_slots = fields.len() > 8;
            if !is_master || failed || !has_slots {
                return None;
            }
            // ip:port@cport[,hostname]
            let addr = fields.get(1)?.split('@').next()?;
            Some(addr.to_owned())
        })
        .collect();
    out.sort();
    out
}

/// The Sentinels' link for a `redis+sentinel://` URL, with koo's TLS files
/// and TCP settings.
fn sentinel_link(
    topology: Topology,
    tcp: redis::io::tcp::TcpSettings,
    config: &RedisConfig,
) -> Result<SentinelLink> {
    let Topology::Sentinel {
        sentinels,
        master,
        db,
        username,
        password,
        tls,
        sentinel_username,
        sentinel_password,
    } = topology
    else {
        unreachable!("called for a Sentinel URL")
    };
    let bad = |e: RedisError| {
        StoreError::InvalidConfig(format!("{}: {}: {e}", config.setting, redact(&config.url)))
    };
    if config.tls.is_some() && !tls {
        return Err(plaintext_with_tls(config));
    }
    let addrs = sentinels
        .iter()
        .map(|s| {
            Ok(s.as_str()
                .into_connection_info()
                .map_err(bad)?
                .addr()
                .clone())
        })
        .collect::<Result<Vec<_>>>()?;
    SentinelLink::new(SentinelSettings {
        addrs,
        master,
        db,
        username,
        password,
        sentinel_username,
        sentinel_password,
        tls: tls.then(|| config.tls.as_ref().map(super::RedisTls::certificates)),
        tcp,
        connect_timeout: config.connect_timeout,
    })
    .map_err(bad)
}

fn tcp_settings(config: &RedisConfig) -> redis::io::tcp::TcpSettings {
    // Small commands should not wait for Nagle, keepalive or not.
    let mut tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
    if config.keepalive {
        tcp = tcp.set_keepalive(
            redis::io::tcp::socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(30))
                .with_interval(Duration::from_secs(10)),
        );
    }
    tcp
}

/// The one place a single-server client is built: the cache's, the tasks',
/// the watchers' and those of `koo worker` and `koo scheduler`.
fn client(info: redis::ConnectionInfo, config: &RedisConfig, url: &str) -> Result<redis::Client> {
    match &config.tls {
        Some(_) if !is_tls(url) => Err(plaintext_with_tls(config)),
        _ => client_with(info, config, is_tls(url)),
    }
}

fn client_with(
    info: redis::ConnectionInfo,
    config: &RedisConfig,
    tls: bool,
) -> Result<redis::Client> {
    let bad = |e: RedisError| StoreError::InvalidConfig(format!("{}: {e}", config.setting));
    match &config.tls {
        Some(t) if tls => redis::Client::build_with_tls(info, t.certificates()).map_err(bad),
        _ => redis::Client::open(info).map_err(bad),
    }
}

fn plaintext_with_tls(config: &RedisConfig) -> StoreError {
    StoreError::InvalidConfig(format!(
        "{}: {} is plaintext but TLS files are set; use rediss://",
        config.setting,
        redact(&config.url)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_are_the_live_masters_with_slots() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 slave a1 0 0 1 connected
d4 127.0.0.1:7002@17002 master,fail - 0 0 3 connected 10923-16383
e5 127.0.0.1:7005@17005 master - 0 0 4 connected
";
        assert_eq!(
            parse_masters(text),
            vec!["127.0.0.1:7000", "127.0.0.1:7001"]
        );
    }

    #[test]
    fn node_addresses_split_with_ipv6() {
        assert_eq!(split_addr("127.0.0.1:7000").unwrap(), ("127.0.0.1", 7000));
        assert_eq!(split_addr("[::1]:7000").unwrap(), ("::1", 7000));
        assert!(split_addr("nowhere").is_err());
    }
}
