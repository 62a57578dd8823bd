//! The gRPC listener: TCP or TLS (rustls, certificates re-read on change,
//! optional client certificates), and what every request learns about its
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;

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
