//! One accepted connection: a TCP or TLS stream that knows its [`Peer`] and
//! that the idle timeout can end. Ending it makes reads see end-of-file, so
//! the HTTP/2 server finishes the connection and closes the socket as if
//! the client had gone (tonic does not expose a per-connection graceful
//! shutdown; the idle timeout only fires with no call open, so nothing is
//! cut).

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::Peer;
use super::calls::Calls;

/// What tonic puts in every request of the connection (see
/// [`super::calls::PeerLayer`], which turns it into [`Peer`] and tonic's
/// `TcpConnectInfo`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The connection's peer.
    pub peer: Peer,
    /// Addresses, for `Request::remote_addr`.
    pub tcp: TcpConnectInfo,
    /// Its open calls.
    pub calls: Arc<Calls>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    /// Resolves when the connection is to end.
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    closed: bool,
    /// Ends the connection's idle watch when the server drops it.
    _ended: DropGuard,
    /// Its place under KOO_MAX_CONNECTIONS, freed when the server drops it.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Conn {
    /// A plaintext connection.
    pub fn plain(io: TcpStream, info: ConnInfo, close: CancellationToken) -> Self {
        Self::new(Io::Plain(io), info, close)
    }

    /// A TLS connection, handshake done.
    pub fn tls(
        io: tokio_rustls::server::TlsStream<TcpStream>,
        info: ConnInfo,
        close: CancellationToken,
    ) -> Self {
        Self::new(Io::Tls(Box::new(io)), info, close)
    }

    fn new(io: Io, info: ConnInfo, close: CancellationToken) -> Self {
        Self {
            io,
            info,
            closing: Box::pin(close.clone().cancelled_owned()),
            closed: false,
            _ended: close.drop_guard(),
            _slot: None,
        }
    }

    /// This connection, holding `slot` until it is dropped.
    #[must_use]
    pub fn holding(mut self, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        self._slot = Some(slot);
        self
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed || this.closing.as_mut().poll(cx).is_ready() {
            this.closed = true;
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
