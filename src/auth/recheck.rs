//! A streaming call's credentials, kept to be checked again while it
//! lasts. The gate admits a call once, when it opens; a `Work` stream can
//! last for days, so a worker key removed from the keys file (a leaked key
//! revoked) must end the streams it opened, not only refuse its next call.
//! The auth layer makes one for every streaming call of a keyed caller:
//! a `Work` stream checks it every second (`grpc::worker::stream`), a
//! reader's stream through its body ([`super::revocable`]). The check is of
//! the key's existence and role; a narrowed scope applies from the next
//! stream.

use std::sync::Arc;

use super::AuthError;
use super::gate::Gate;
use crate::transport::Peer;

/// What the gate saw when it admitted a streaming call, to decide again.
#[derive(Debug, Clone)]
pub struct Recheck {
    gate: Arc<Gate>,
    path: &'static str,
    headers: http::HeaderMap,
    peer: Option<Peer>,
}

impl Recheck {
    /// The call to `path` as admitted, with its headers and its peer.
    pub fn new(
        gate: Arc<Gate>,
        path: &'static str,
        headers: &http::HeaderMap,
        peer: Option<&Peer>,
    ) -> Self {
        // only the credentials matter: the bearer key
        let mut kept = http::HeaderMap::new();
        if let Some(v) = headers.get(http::header::AUTHORIZATION) {
            let mut v = v.clone();
            // a key: never in a Debug print or a log line
            v.set_sensitive(true);
            kept.insert(http::header::AUTHORIZATION, v);
        }
        Self {
            gate,
            path,
            headers: kept,
            peer: peer.cloned(),
        }
    }

    /// The RPC's path, for log lines.
    pub fn path(&self) -> &'static str {
        self.path
    }

    /// Whether the call would still be admitted (the keys file as it is
    /// now): its refusal otherwise.
    pub fn still_admitted(&self) -> Result<(), AuthError> {
        let mut extensions = http::Extensions::new();
        if let Some(peer) = &self.peer {
            extensions.insert(peer.clone());
        }
        self.gate
            .admit(self.path, &self.headers, &extensions)
            .map(|_| ())
    }
}
