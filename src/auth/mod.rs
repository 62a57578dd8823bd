//! Who is calling and what they may do: API keys (`KOO_AUTH_FILE`), mTLS
//! principals, roles, and the one table that says which role each RPC needs.
//!
//! The transport (`crate::transport`) puts the TLS peer's identity in the
//! request's extensions; the auth layer turns it, or the bearer key, into a
//! [`Caller`] and stores that in the extensions too, where handlers read it
//! (a worker key's scope and hold limit are checked where the queue is known).
//!
//! `keys` reads and reloads the keys file and finds a key in constant time;
//! `methods` is the method→role table; `gate` decides one call and `layer`
//! runs it around the router; `scope` checks a worker key's declarations;
//! `audit` writes the admin calls' lines; `new_key` makes keys; `error`
//! names every refusal (mapped to statuses in `crate::grpc::status`).

use std::sync::Arc;

pub mod audit;
pub mod error;
pub mod gate;
pub mod keys;
pub mod layer;
pub mod methods;
pub mod new_key;
pub mod recheck;
pub mod revocable;
pub mod scope;

pub use error::AuthError;
pub use gate::Reflection;
pub use keys::{Keyring, KeysError};
pub use recheck::Recheck;

/// How `koo serve` authenticates callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// `KOO_AUTH_FILE` (`None`: no keys; open, or only `KOO_WORKER_TOKEN`).
    pub file: Option<std::path::PathBuf>,
    /// How often the keys file is looked at for changes.
    pub reload_interval: std::time::Duration,
    /// `KOO_REFLECTION`.
    pub reflection: Reflection,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            file: None,
            reload_interval: std::time::Duration::from_secs(5),
            reflection: Reflection::On,
        }
    }
}

/// What a caller may do. `Reader` < `Writer` < `Admin` each include the ones
/// before; `Worker` is apart (WorkerService, plus `GetTask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Gets, lists, watches, metrics.
    Reader,
    /// Cache writes, task submits, cancel, retry, warm.
    Writer,
    /// Clearing, cleanup, maintenance, schedule writes.
    Admin,
    /// WorkerService and `GetTask`.
    Worker,
}

impl Role {
    /// The name used in the keys file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
            Role::Worker => "worker",
        }
    }

    /// Parses a keys file's role.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "reader" => Some(Role::Reader),
            "writer" => Some(Role::Writer),
            "admin" => Some(Role::Admin),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }
}

/// What a worker key may lease: queues and task names (empty: no bound of
/// that kind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Queues it may lease from (empty: any).
    pub queues: Vec<String>,
    /// Task names it may lease (empty: any).
    pub task_names: Vec<String>,
}

/// The authenticated caller of one request, in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name or the certificate's identity; "anonymous" when koo
    /// runs open.
    pub principal: Arc<str>,
    /// Its role (`None`: koo runs open, every call allowed).
    pub role: Option<Role>,
    /// A worker key's scope.
    pub scope: Scope,
    /// Most tasks this caller may hold at once over all its streams and
    /// leases (`None`: the server's default).
    pub max_held: Option<u32>,
}

impl Caller {
    /// Whether the caller is a worker key bound to some queues or task
    /// names (see [`scope`]).
    pub fn is_scoped(&self) -> bool {
        !self.scope.queues.is_empty() || !self.scope.task_names.is_empty()
    }

    /// The caller of an open server.
    pub fn anonymous() -> Self {
        // one shared name: an open server makes one of these per call
        static ANONYMOUS: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        Self {
            principal: ANONYMOUS.get_or_init(|| Arc::from("anonymous")).clone(),
            role: None,
            scope: Scope::default(),
            max_held: None,
        }
    }

    /// The caller recorded in a request's extensions (anonymous when none:
    /// an open server).
    pub fn of(extensions: &http::Extensions) -> Caller {
        extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous)
    }
}
