//! A primary found through Redis Sentinel, followed across failovers.
//!
//! [`SentinelLink`] is what every connection of one store shares: the
//! Sentinels' client and the primary they last named. [`SentinelConn`] is
//! one pooled connection: a multiplexed connection to that primary, made on
//! first use (so koo starts, and reports NOT_SERVING, while nothing answers)
//! and dropped after an I/O error or a `READONLY` reply (the old primary
//! came back as a replica). The call that saw the error fails as usual, and
//! the retry of `run` / `run_once` (see `call.rs`) asks the Sentinels again
//! and reaches the new primary; their deadline and the breaker bound it all.
//!
//! One lookup serves every connection: the first connection to see an error
//! marks the primary *suspect*; the next use asks the Sentinels once (the
//! others wait for that answer), and only when they name another address do
//! all connections reconnect (a generation number says which primary a
//! connection was made for). A primary that stops answering without an error
//! (a partition) is suspected by the recovery prober while the breaker is
//! open (see [`Connector::suspect`](super::conn::Connector::suspect)).
//!
//! A primary demoted while running (`SENTINEL FAILOVER`, or a partition
//! that heals) keeps accepting writes until the Sentinels reconfigure it,
//! about 8 s later (then they disconnect its clients): writes in between
//! would be lost. So the link also follows the Sentinels' `+switch-master`
//! announcements on a Pub/Sub connection of its own and moves every
//! connection to the new primary as soon as one is announced.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio_util::sync::CancellationToken;

/// After a failed lookup, how long other connections are given the same
/// failure instead of asking the Sentinels again (a pool meeting a failover
/// would otherwise send a lookup per connection).
const FAILED_LOOKUP_MEMO: Duration = Duration::from_millis(100);

/// The least time a lookup gets (see [`SentinelLink::lookup_bound`]).
const LOOKUP_FLOOR: Duration = Duration::from_millis(2500);

/// How long the `+switch-master` watcher waits before subscribing again
/// after its Sentinel went away.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

/// The Sentinels' announcement of a new primary.
const SWITCH_MASTER: &str = "+switch-master";

/// What the connections of one store share.
pub(crate) struct SentinelLink {
    /// Held across a lookup (tokio's lock: it is held over `.await`), so
    /// that one lookup answers every connection waiting for it.
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The primary last named; std's lock, never held over `.await`.
    primary: Mutex<Primary>,
    /// Bumped when the Sentinels name another address: connections made for
    /// an older generation reconnect on their next use.
    generation: AtomicU64,
    master: String,
    /// The Sentinels, for error messages (no credentials).
    hosts: String,
    db: i64,
    connect_timeout: Duration,
    /// Stops the `+switch-master` watcher when the store goes.
    stop: CancellationToken,
}

impl Drop for SentinelLink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Default)]
struct Primary {
    client: Option<redis::Client>,
    /// Whether a connection saw an error since the last lookup.
    suspect: bool,
    failed: Option<(Instant, RedisError)>,
}

/// How to reach the Sentinels and the primary (from the URL and koo's
/// TLS and TCP settings).
pub(crate) struct SentinelSettings {
    pub addrs: Vec<redis::ConnectionAddr>,
    pub master: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
    pub tls: Option<Option<redis::TlsCertificates>>,
    pub tcp: redis::io::tcp::TcpSettings,
    pub connect_timeout: Duration,
}

impl SentinelLink {
    pub(crate) fn new(s: SentinelSettings) -> RedisResult<Self> {
        let hosts = s
            .addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut b = SentinelClientBuilder::new(s.addrs, &s.master, SentinelServerType::Master)?
            .set_client_to_redis_db(s.db)
            .set_client_to_redis_tcp_settings(s.tcp.clone())
            .set_client_to_sentinel_tcp_settings(s.tcp);
        if let Some(u) = &s.username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = &s.password {
            b = b.set_client_to_redis_password(p);
        }
        if let Some(u) = &s.sentinel_username {
            b = b.set_client_to_sentinel_username(u);
        }
        if let Some(p) = &s.sentinel_password {
            b = b.set_client_to_sentinel_password(p);
        }
        // With TLS, the Sentinels and the primary are both reached over TLS
        // with the same CA and client certificate (KOO_REDIS_TLS_*).
        if let Some(certs) = s.tls {
            b = b
                .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = certs {
                b = b
                    .set_client_to_redis_certificates(certs.clone())
                    .set_client_to_sentinel_certificates(certs);
            }
        }
        Ok(Self {
            sentinel: tokio::sync::Mutex::new(b.build()?),
            primary: Mutex::new(Primary::default()),
            generation: AtomicU64::new(0),
            master: s.master,
            hosts,
            db: s.db,
            connect_timeout: s.connect_timeout,
            stop: CancellationToken::new(),
        })
    }

    /// Starts following the Sentinels' `+switch-master` announcements, if
    /// there is a runtime to run on (there always is in koo; without it, a
    /// failover is still followed after the first error).
    pub(crate) fn follow_switches(self: &Arc<Self>) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let stop = self.stop.clone();
            let link = Arc::downgrade(self);
            runtime.spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = watch_switches(link) => {}
                }
            });
        }
    }

    /// How long one lookup (or subscription) may hold the Sentinels'
    /// client. It connects to the Sentinels (the redis crate bounds each
    /// connection by 1 s, and takes their answers in the order listed, so a
    /// silent first Sentinel costs that second) and then to the primary
    /// named (to check its `ROLE`): a few connection times.
    fn lookup_bound(&self) -> Duration {
        (self.connect_timeout * 3).max(LOOKUP_FLOOR)
    }

    /// The database the URL selects on the primary.
    pub(crate) fn db(&self) -> i64 {
        self.db
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Primary> {
        self.primary.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the primary of generation `generation` suspect: the next
    /// connection asks the Sentinels again.
    pub(crate) fn suspect(&self, generation: u64) {
        if self.generation.load(Ordering::Acquire) == generation {
            self.state().suspect = true;
        }
    }

    /// Marks whatever primary is current suspect, and forgets a failed
    /// lookup: the caller has news (an announcement, a probe) that a lookup
    /// made now may answer differently.
    pub(crate) fn suspect_current(&self) {
        let mut state = self.state();
        state.suspect = true;
        state.failed = None;
    }

    /// The known primary, or the failure of a lookup just made; `None` when
    /// the Sentinels must be asked.
    fn known(&self) -> Option<RedisResult<(u64, redis::Client)>> {
        let state = self.state();
        if let Some((at, err)) = &state.failed
            && at.elapsed() < FAILED_LOOKUP_MEMO
        {
            return Some(Err(err.clone()));
        }
        match &state.client {
            Some(c) if !state.suspect => {
                Some(Ok((self.generation.load(Ordering::Acquire), c.clone())))
            }
            _ => None,
        }
    }

    /// The primary's client and its generation, asking the Sentinels if
    /// none is known or it is suspect.
    pub(crate) async fn primary(&self) -> RedisResult<(u64, redis::Client)> {
        if let Some(known) = self.known() {
            return known;
        }
        let mut sentinel = self.sentinel.lock().await;
        if let Some(known) = self.known() {
            return known;
        }
        let bound = self.lookup_bound();
        let found = match tokio::time::timeout(bound, sentinel.async_get_client()).await {
            Ok(found) => found,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} ms", bound.as_millis()),
            ))),
        };
        let mut state = self.state();
        match found {
            Ok(client) => {
                let moved = state.client.as_ref().is_none_or(|old| {
                    old.get_connection_info().addr() != client.get_connection_info().addr()
                });
                let generation = if moved {
                    tracing::info!(
                        master = %self.master,
                        primary = %client.get_connection_info().addr(),
                        "Sentinels name the primary"
                    );
                    self.generation.fetch_add(1, Ordering::AcqRel) + 1
                } else {
                    self.generation.load(Ordering::Acquire)
                };
                state.client = Some(client.clone());
                state.suspect = false;
                state.failed = None;
                Ok((generation, client))
            }
            Err(e) => {
                // The command never left: say so as a refused connection,
                // which `run_once` may retry; the message names the master
                // and the Sentinels asked.
                let err = RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!(
                        "no primary {:?} from the Sentinels at {}: {e}",
                        self.master, self.hosts
                    ),
                ));
                state.failed = Some((Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    /// A connection of its own to the primary (not shared, not followed:
    /// its owner makes a new one after an error).
    pub(crate) async fn dedicated(
        &self,
        config: &redis::AsyncConnectionConfig,
    ) -> RedisResult<MultiplexedConnection> {
        let (_, client) = self.primary().await?;
        client
            .get_multiplexed_async_connection_with_config(config)
            .await
    }

    /// A Pub/Sub connection to the primary.
    pub(crate) async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let (generation, client) = self.primary().await?;
        let pubsub = client.get_async_pubsub().await;
        if let Err(e) = &pubsub
            && follows_failover(e)
        {
            self.suspect(generation);
        }
        pubsub
    }
}

/// Whether `err` says the primary may have moved: the connection broke or
/// was refused, or the server is now a replica (`READONLY`).
pub(crate) fn follows_failover(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || super::call::has_code(err, "READONLY")
}

/// One pooled connection to the primary (clones share it).
#[derive(Clone)]
pub(crate) struct SentinelConn {
    link: Arc<SentinelLink>,
    slot: Arc<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The connection and the generation of the primary it reaches (std's
    /// lock: only cloned out, never held over `.await`).
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Held while connecting (tokio's: over `.await`), so that concurrent
    /// calls on this connection make one connection, not several.
    connecting: tokio::sync::Mutex<()>,
}

impl SentinelConn {
    /// A connection made on first use.
    pub(crate) fn lazy(link: Arc<SentinelLink>) -> Self {
        Self {
            link,
            slot: Arc::default(),
        }
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        let generation = self.link.generation.load(Ordering::Acquire);
        let slot = self
            .slot
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(g, c)| (*g, c.clone()))
    }

    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _connecting = self.slot.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let (generation, client) = self.link.primary().await?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.link.connect_timeout))
            .set_response_timeout(None);
        let conn = match client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.link.suspect(generation);
                return Err(e);
            }
        };
        *self
            .slot
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// After an error that says the primary may have moved, drops this
    /// connection and has the next use ask the Sentinels.
    fn failed(&self, generation: u64, err: &RedisError) {
        if follows_failover(err) {
            let mut slot = self
                .slot
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
                *slot = None;
            }
            drop(slot);
            self.link.suspect(generation);
        }
    }

    /// The `READONLY` replies inside a pipeline's answer count as its error.
    fn check_values(&self, generation: u64, values: &[Value]) {
        let readonly = values.iter().find_map(|v| match v {
            Value::ServerError(e) if e.code() == "READONLY" => Some(e.clone()),
            _ => None,
        });
        if let Some(e) = readonly {
            self.failed(generation, &e.into());
        }
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let reply = conn.req_packed_command(cmd).await;
            match &reply {
                Err(e) => self.failed(generation, e),
                Ok(Value::ServerError(e)) if e.code() == "READONLY" => {
                    self.failed(generation, &e.clone().into());
                }
                Ok(_) => {}
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.connection().await?;
            let reply = conn.req_packed_commands(pipeline, offset, count).await;
            match &reply {
                Err(e) => self.failed(generation, e),
                Ok(values) => self.check_values(generation, values),
            }
            reply
        })
    }

    fn get_db(&self) -> i64 {
        self.link.db
    }
}

/// Subscribes to `+switch-master` on the first Sentinel that answers and,
/// on an announcement for this primary, asks the Sentinels at once (every
/// connection then moves to the new primary); subscribes again when that
/// Sentinel goes away. Holds the link only while acting, so that it ends
/// with the store (the caller also cancels it then).
async fn watch_switches(link: std::sync::Weak<SentinelLink>) {
    loop {
        let stream = match link.upgrade() {
            Some(l) => l.subscribe_switches().await,
            None => return,
        };
        match stream {
            Ok(mut messages) => {
                while let Some(msg) = messages.next().await {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    let Some(l) = link.upgrade() else { return };
                    if payload.split(' ').next() == Some(l.master.as_str()) {
                        tracing::info!(master = %l.master, %payload, "Sentinels switched the primary");
                        l.suspect_current();
                        // a failure is remembered; the next call retries it
                        let _ = l.primary().await;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot follow the Sentinels' announcements yet");
            }
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

impl SentinelLink {
    /// A Pub/Sub stream of `+switch-master` from the first Sentinel that
    /// answers (with the Sentinels' credentials and TLS).
    async fn subscribe_switches(&self) -> RedisResult<redis::aio::PubSubStream> {
        let bound = self.lookup_bound();
        let open = async {
            let client = self
                .sentinel
                .lock()
                .await
                .async_get_sentinel_client()
                .await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(SWITCH_MASTER).await?;
            Ok(pubsub.into_on_message())
        };
        match tokio::time::timeout(bound, open).await {
            Ok(stream) => stream,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no Sentinel answered",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error Redis replies with `text`, as the crate reports it.
    fn server_error(text: &str) -> RedisError {
        redis::parse_redis_value(format!("-{text}\r\n").as_bytes())
            .and_then(Value::extract_error)
            .unwrap_err()
    }

    /// A broken or refused connection and a replica's `READONLY` send koo
    /// back to the Sentinels; an ordinary error reply does not.
    #[test]
    fn which_errors_follow_a_failover() {
        let io = |kind| RedisError::from(std::io::Error::new(kind, "x"));
        assert!(follows_failover(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(follows_failover(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(follows_failover(&server_error(
            "READONLY You can't write against a read only replica."
        )));
        assert!(!follows_failover(&server_error(
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        )));
        assert!(!follows_failover(&server_error(
            "NOSCRIPT No matching script"
        )));
    }
}
