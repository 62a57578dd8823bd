//! The accept loop. Accepting stays quick whatever clients do: TLS
//! handshakes run in tasks of their own, at most [`MAX_HANDSHAKES`] at once
//! and each for at most [`HANDSHAKE_TIMEOUT`], so a client that connects and
//! says nothing holds one slot for a while instead of blocking every accept.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
) -> ReceiverStream<Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(
        listener,
        tls,
        idle_timeout,
        handshake_timeout,
        tx,
    ));
    ReceiverStream::new(rx)
}

type Sender = mpsc::Sender<Result<Conn, std::io::Error>>;

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Tls>,
    idle_timeout: Option<Duration>,
    handshake_timeout: Duration,
    tx: Sender,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            // Out of file descriptors and the like: say so, and pause rather
            // than spin on a listener that fails at once.
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
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
            });
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
                    });
                    let _ = tx.send(Ok(conn)).await;
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, ?handshake_timeout, "TLS handshake timed out"),
            }
        });
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
