//! Why a call is refused before (or by) its handler: no credentials, an
//! unknown key, a role or scope that does not allow it, or a limit. Mapped
//! to gRPC statuses in `crate::grpc::status`, with the other errors.

use std::sync::Arc;

/// A refusal by the auth and load-shedding layers or a worker scope check.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata and no client certificate.
    #[error("{method} needs credentials: send {how}")]
    NoCredentials {
        /// The RPC.
        method: String,
        /// What to send.
        how: &'static str,
    },
    /// `authorization` is not `Bearer <key>`.
    #[error("the authorization metadata must be `Bearer <key>`")]
    Malformed,
    /// `authorization` sent more than once: which one a proxy or koo would
    /// read is not something a credential may depend on.
    #[error("the authorization metadata is sent more than once; send one `Bearer <key>`")]
    Repeated,
    /// A key that is not in the keys file (the key itself is never quoted).
    #[error("the API key sent is not in the keys file (KOO_AUTH_FILE), or was revoked")]
    UnknownKey,
    /// A worker call whose bearer is not KOO_WORKER_TOKEN (koo runs with the
    /// token alone, no keys file).
    #[error("the token sent is not KOO_WORKER_TOKEN")]
    WrongWorkerToken,
    /// A client certificate whose identity no `[[principal]]` names.
    #[error(
        "the client certificate's identity {identity} is not a [[principal]] of the keys file (KOO_AUTH_FILE)"
    )]
    UnknownPrincipal {
        /// The certificate's identity, quoted.
        identity: String,
    },
    /// The caller's role does not allow the RPC.
    #[error("{method} needs the {needed} role; {principal:?} has the {role} role")]
    Denied {
        /// The RPC.
        method: String,
        /// The role it needs.
        needed: &'static str,
        /// Who called.
        principal: Arc<str>,
        /// Their role.
        role: &'static str,
    },
    /// A worker key declared a queue or task name outside its scope.
    #[error(
        "{field}: {value} is outside the scope of the worker key {principal:?} (it may serve {allowed})"
    )]
    OutOfScope {
        /// The declaration's field (e.g. `hello.queues[1]`).
        field: String,
        /// The value, quoted.
        value: String,
        /// The key.
        principal: Arc<str>,
        /// What the scope allows, listed.
        allowed: String,
    },
    /// No such RPC (or reflection switched off).
    #[error("{0}")]
    Unimplemented(String),
    /// Too many unary calls in flight.
    #[error(
        "koo is serving its limit of {limit} unary calls at once (KOO_MAX_INFLIGHT_CALLS); retry with backoff"
    )]
    Shed {
        /// `KOO_MAX_INFLIGHT_CALLS`.
        limit: usize,
    },
}
