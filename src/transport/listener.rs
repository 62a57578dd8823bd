//! The accept loop. Accepting stays quick whatever clients do: TLS
//! handshakes run in tasks of their own, at most [`MAX_HANDSHAKES`] at once
//! and each for at most [`HANDSHAKE_TIMEOUT`], so a client that connects and
//! says nothing holds one slot for a while instead of blocking every accept.
//! At most `KOO_MAX_CONNECTIONS` connections are open at once: past it, new
//! ones wait in the kernel's backlog until one closes, so that clients that
//! open connections and hold them cannot take every file descriptor (which
//! would fail Redis's reconnects and the other listeners too). Accept errors
//! (out of descriptors, say) back off and are logged at most every 10 s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpConnectInfo;

use super::Peer;
use super::calls::{Calls, close_when_idle};
use super::conn::{Conn, ConnInfo};
use super::tls::Tls;

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS handshakes in progress at once; beyond it, accepting waits (the
/// kernel's backlog holds new connections) rather than letting a flood of
/// handshakes starve the runtime.
pub const MAX_HANDSHAKES: usize = 1024;

/// Numbers connections across the process ([`Peer::connection`]).
static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

/// The accepted connections of `listener` (with TLS when `tls` is set), as
/// the stream tonic serves. Each connection with no call open for
/// `idle_timeout` is closed. Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Tls>,
    idle_timeout: Option<Duration>,
    handshake_timeout: Duration,
    max_connections: usize,
) -> ReceiverStream<Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(
        listener,
        tls,
        idle_timeout,
        handshake_timeout,
        max_connections,
        tx,
    ));
    ReceiverStream::new(rx)
}

/// How often a repeated accept problem (an error, the connection cap) is
/// logged at most.
const NOTICE_EVERY: Duration = Duration::from_secs(10);

/// A warning said at most once per [`NOTICE_EVERY`], with how many times it
/// was left unsaid since.
#[derive(Default)]
struct Notice {
    said: Option<Instant>,
    unsaid: u64,
}

impl Notice {
    /// Whether to say it now, and how many were left unsaid before.
    fn due(&mut self) -> Option<u64> {
        if self.said.is_some_and(|at| at.elapsed() < NOTICE_EVERY) {
            self.unsaid += 1;
            return None;
        }
        self.said = Some(Instant::now());
        Some(std::mem::take(&mut self.unsaid))
    }
}

type Sender = mpsc::Sender<Result<Conn, std::io::Error>>;

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Tls>,
    idle_timeout: Option<Duration>,
    handshake_timeout: Duration,
    max_connections: usize,
    tx: Sender,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let slots = Arc::new(Semaphore::new(max_connections));
    let local = listener.local_addr().ok();
    let (mut failing, mut full) = (Notice::default(), Notice::default());
    loop {
        let Some(slot) = next_slot(&slots, &tx, &mut full, local, max_connections).await else {
            return;
        };
        let Some((stream, addr)) = accept(&listener, &tx, &mut failing).await else {
            return;
        };
        // Small RPCs should not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let info = ConnInfo {
            peer: Peer {
                addr: Some(addr),
                identity: None,
                connection: CONNECTIONS.fetch_add(1, Ordering::Relaxed),
            },
            tcp: TcpConnectInfo {
                local_addr: stream.local_addr().ok(),
                remote_addr: Some(addr),
            },
            calls: Arc::new(Calls::default()),
        };
        let Some(tls) = &tls else {
            let conn = start(info, idle_timeout, |info, close| {
                Conn::plain(stream, info, close)
            })
            .holding(slot);
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            continue;
        };
        let permit = tokio::select! {
            () = tx.closed() => return,
            permit = handshakes.clone().acquire_owned() => permit.expect("never closed"),
        };
        let acceptor = tls.acceptor();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|leaf| super::identity::of_certificate(leaf));
                    let info = ConnInfo {
                        peer: Peer {
                            identity: identity.map(Arc::from),
                            ..info.peer
                        },
                        ..info
                    };
                    let conn = start(info, idle_timeout, |info, close| {
                        Conn::tls(stream, info, close)
                    })
                    .holding(slot);
                    let _ = tx.send(Ok(conn)).await;
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, ?handshake_timeout, "TLS handshake timed out"),
            }
        });
    }
}

/// The next connection; `None` when the server stopped taking them. Out of
/// file descriptors and the like: said (at most every 10 s, not 20 times a
/// second), and retried with back-off rather than spinning on a listener
/// that fails at once.
async fn accept(
    listener: &TcpListener,
    tx: &Sender,
    failing: &mut Notice,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let mut pause = Duration::from_millis(50);
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                if let Some(unsaid) = failing.due() {
                    tracing::warn!(error = %e, unsaid, "cannot accept a connection");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A place for the next connection under KOO_MAX_CONNECTIONS: at once, or
/// once a connection closes (said, at most every 10 s); `None` when the
/// server stopped taking connections.
async fn next_slot(
    slots: &Arc<Semaphore>,
    tx: &Sender,
    full: &mut Notice,
    local: Option<std::net::SocketAddr>,
    max_connections: usize,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    if let Some(unsaid) = full.due() {
        tracing::warn!(
            listen = ?local,
            max_connections,
            unsaid,
            "KOO_MAX_CONNECTIONS connections are open on this listener: new ones wait in the backlog until one closes"
        );
    }
    tokio::select! {
        () = tx.closed() => None,
        slot = slots.clone().acquire_owned() => Some(slot.expect("never closed")),
    }
}

/// Builds the connection and, with an idle timeout, its idle watch.
fn start(
    info: ConnInfo,
    idle_timeout: Option<Duration>,
    make: impl FnOnce(ConnInfo, CancellationToken) -> Conn,
) -> Conn {
    let close = CancellationToken::new();
    if let Some(timeout) = idle_timeout {
        tokio::spawn(close_when_idle(info.calls.clone(), timeout, close.clone()));
    }
    make(info, close)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repeated problem is said once, then counted until the next time
    /// it may be said, which says how many were left unsaid.
    #[test]
    fn notices_are_rate_limited_and_counted() {
        let mut n = Notice::default();
        assert_eq!(n.due(), Some(0));
        assert_eq!(n.due(), None);
        assert_eq!(n.due(), None);
        n.said = Some(Instant::now() - NOTICE_EVERY);
        assert_eq!(n.due(), Some(2));
    }
}
