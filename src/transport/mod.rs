//! The gRPC listener: TCP or TLS (rustls, certificates re-read on change,
//! optional client certificates), and what every request learns about its
//! connection.
//!
//! # Layout
//! - [`tls`]: the server's certificate and client CA, reloaded when their
//!   files change.
//! - [`identity`]: a verified client certificate's identity.
//! - [`listener`]: the accept loop; TLS handshakes run beside it, bounded
//!   and timed out.
//! - [`conn`]: one accepted connection, which idle detection can close.
//! - [`calls`]: counts a connection's open calls and puts [`Peer`] in every
//!   request.
//! - [`cors`]: `KOO_CORS_ORIGINS`, which pages on other origins may call
//!   koo from a browser.
//! - [`exposure`]: the start-up warning for an open, plaintext, non-loopback
//!   listener.

use std::net::SocketAddr;
use std::sync::Arc;

pub mod calls;
pub mod conn;
pub mod cors;
pub mod exposure;
pub mod identity;
pub mod listener;
pub mod site;
pub mod tls;

/// What a request knows of its connection, in its extensions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client's address.
    pub addr: Option<SocketAddr>,
    /// The verified client certificate's identity (a SAN URI or DNS name,
    /// else its CN) under mTLS; `None` otherwise.
    pub identity: Option<Arc<str>>,
    /// A number unique to the connection in this process (what bounds an
    /// anonymous caller's holdings).
    pub connection: u64,
}
