//! Lease secrets: what proves that a report on a task comes from the holder
//! of its lease.
//!
//! Lease tokens count up from 1, so they fence out a lapsed holder but
//! prove nothing: anyone allowed to call `CompleteTask` can guess one. So
//! every lease also gets a secret, `HMAC-SHA256(key, task id ‖ token ‖
//! worker)` cut to 128 bits (base64url), handed out with the lease and
//! never stored: any koo process of the deployment recomputes it from the
//! task, so no store round trip is added. The key is 32 random bytes kept
//! in the task store (created once with `SET NX`, see
//! [`crate::keys::lease_key`]), read once per process and re-checked once
//! a lease (so that, after Redis lost its data, every process converges on
//! the key stored first); on the embedded store, created at the first
//! lease and saved with the tasks (`KOO_DATA_DIR`), so that a worker
//! re-attaching its task to the restarted koo still proves its lease.
//!
//! The rules, applied by [`authorize`]: a report naming a stale lease is
//! fenced (`ABORTED`) whatever it carries; a stream report on a task its
//! stream holds needs no secret (the stream is the proof); a report
//! carrying a secret must carry this lease's; a report without one is
//! refused under [`LeasePolicy::Required`] and, under
//! [`LeasePolicy::Optional`], when a Work stream holds the task (so that
//! old unary scripts keep working on their own leases while nobody can end
//! a stream worker's task by guessing its token).

use std::sync::Arc;

use base64::Engine as _;
use ring::hmac;

use crate::domain::task::{State, Task};
use crate::tasks::engine::TaskError;

/// Bytes of a lease secret (128 bits).
const SECRET_BYTES: usize = 16;
/// Bytes of a fresh key.
pub const KEY_BYTES: usize = 32;
/// Hex digits of the suffix koo gives a stream worker's id (`name/<12 hex>`).
const STREAM_SUFFIX: usize = 12;

/// Whether a report without a lease secret may be accepted
/// (`KOO_LEASE_SECRETS`, resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeasePolicy {
    /// Every report needs the secret, except a stream's on what it holds.
    Required,
    /// A report without one is accepted unless a Work stream holds the task.
    #[default]
    Optional,
}

/// `KOO_LEASE_SECRETS` as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LeaseSecrets {
    /// `required` when authentication is configured, else `optional`.
    #[default]
    Auto,
    /// Reports need the lease secret.
    Required,
    /// Reports without a secret are accepted on tasks no stream holds.
    Optional,
}

impl LeaseSecrets {
    /// The policy in force; `auth` says whether callers authenticate (a
    /// keys file or a client CA).
    pub fn resolve(self, auth: bool) -> LeasePolicy {
        match self {
            Self::Required => LeasePolicy::Required,
            Self::Optional => LeasePolicy::Optional,
            Self::Auto if auth => LeasePolicy::Required,
            Self::Auto => LeasePolicy::Optional,
        }
    }
}

/// What a report offers as proof that it comes from the lease's holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof<'a> {
    /// It came on the Work stream that holds the lease.
    Stream,
    /// The secret it carries (`None`: none).
    Secret(Option<&'a str>),
}

impl<'a> Proof<'a> {
    /// A message's `lease_secret` field (empty: none).
    pub fn given(secret: &'a str) -> Self {
        Self::Secret(Some(secret).filter(|s| !s.is_empty()))
    }
}

/// Computes and checks lease secrets under one key.
pub struct Signer {
    key: hmac::Key,
    /// The stored key, to tell whether the store now holds another.
    stored: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// A signer over `key` (the stored key).
    pub fn new(key: &str) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()),
            stored: key.to_owned(),
        }
    }

    /// The stored key this signer uses.
    pub fn stored(&self) -> &str {
        &self.stored
    }

    /// 32 fresh random bytes, as 64 hex digits (what is stored).
    pub fn fresh_key() -> Result<String, TaskError> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; KEY_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| {
                TaskError::Store(crate::store::StoreError::Unavailable(
                    "the system random source failed".to_owned(),
                ))
            })?;
        Ok(hex::encode(bytes))
    }

    fn tag(&self, id: &str, token: u32, worker: &str) -> hmac::Tag {
        // Lengths first, so that no two (id, worker) pairs hash alike.
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&(id.len() as u64).to_be_bytes());
        ctx.update(id.as_bytes());
        ctx.update(&token.to_be_bytes());
        ctx.update(worker.as_bytes());
        ctx.sign()
    }

    /// The secret of the lease `token` of task `id` held by `worker`.
    pub fn secret(&self, id: &str, token: u32, worker: &str) -> String {
        let tag = self.tag(id, token, worker);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_ref()[..SECRET_BYTES])
    }

    /// The secret of `task`'s current lease (its token, its worker).
    pub fn of_lease(&self, task: &Task) -> String {
        let worker = task.worker.as_deref().unwrap_or_default();
        self.secret(&task.id.to_string(), task.token, worker)
    }

    /// Whether `given` is that lease's secret (compared in constant time).
    pub fn verify(&self, id: &str, token: u32, worker: &str, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        let Ok(given) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(given) else {
            return false;
        };
        let tag = self.tag(id, token, worker);
        given.len() == SECRET_BYTES && bool::from(given.ct_eq(&tag.as_ref()[..SECRET_BYTES]))
    }
}

/// This process's signer, once read from the store; replaced when the
/// store turns out to hold another key (after Redis lost its data, every
/// process converges on the key stored first).
#[derive(Debug, Default)]
pub struct SignerCell {
    /// std RwLock: held only to clone or swap an `Arc`, never across an
    /// await.
    current: std::sync::RwLock<Option<Arc<Signer>>>,
}

impl SignerCell {
    /// The signer, if the key was read.
    pub fn get(&self) -> Option<Arc<Signer>> {
        self.current.read().expect("not poisoned").clone()
    }

    /// The signer of the stored key `key` (the current one when it is the
    /// same key).
    pub fn adopt(&self, key: &str) -> Arc<Signer> {
        let mut current = self.current.write().expect("not poisoned");
        match current.as_ref() {
            Some(s) if s.stored == key => s.clone(),
            before => {
                if before.is_some() {
                    tracing::warn!(
                        "the stored key of lease secrets changed (the task store lost its data?): adopting it; leases signed with the former key must be reported on their stream or lapse"
                    );
                }
                let s = Arc::new(Signer::new(key));
                *current = Some(s.clone());
                s
            }
        }
    }
}

/// Whether `worker` has the shape of a stream worker's id: a name, `/`,
/// then 12 hex digits (reserved: a unary caller may not take it).
pub fn is_stream_worker(worker: &str) -> bool {
    worker.len() > STREAM_SUFFIX
        && worker.as_bytes()[worker.len() - STREAM_SUFFIX - 1] == b'/'
        && worker.as_bytes()[worker.len() - STREAM_SUFFIX..]
            .iter()
            .all(u8::is_ascii_hexdigit)
}

/// Whether a report with lease `token` and `proof` may act on `task` (as
/// just read) under `policy` (the rules of the module doc). `signer` is
/// needed only to check a secret the report carries.
pub fn authorize(
    signer: Option<&Signer>,
    policy: LeasePolicy,
    task: &Task,
    token: u32,
    proof: Proof<'_>,
) -> Result<(), TaskError> {
    if task.state != State::Running || task.token != token {
        return Err(TaskError::Fenced(task.id.clone()));
    }
    let worker = task.worker.as_deref().unwrap_or_default();
    let id = task.id.to_string();
    match proof {
        Proof::Stream => Ok(()),
        Proof::Secret(Some(given))
            if signer.is_some_and(|s| s.verify(&id, token, worker, given)) =>
        {
            Ok(())
        }
        Proof::Secret(Some(_)) => Err(TaskError::Forbidden(format!(
            "lease_secret: not the secret of this lease of task {id} (quote the lease_secret handed out with it)"
        ))),
        Proof::Secret(None) if policy == LeasePolicy::Required => {
            Err(TaskError::Forbidden(format!(
                "lease_secret: required (KOO_LEASE_SECRETS): quote the lease_secret handed out with the lease of task {id}"
            )))
        }
        Proof::Secret(None) if is_stream_worker(worker) => Err(TaskError::Forbidden(format!(
            "lease_secret: required: task {id} is held by a Work stream; only that stream, or a report quoting the lease's secret, may report on it"
        ))),
        Proof::Secret(None) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secrets are 128 bits, bound to id, token and worker, and checked
    /// whole.
    #[test]
    fn secrets_bind_the_lease() {
        let s = Signer::new(&"k".repeat(32));
        let secret = s.secret("research~01", 1, "w/0123456789ab");
        assert_eq!(secret.len(), 22);
        assert!(s.verify("research~01", 1, "w/0123456789ab", &secret));
        assert!(!s.verify("research~01", 2, "w/0123456789ab", &secret));
        assert!(!s.verify("research~02", 1, "w/0123456789ab", &secret));
        assert!(!s.verify("research~01", 1, "x/0123456789ab", &secret));
        assert!(!s.verify("research~01", 1, "w/0123456789ab", &secret[..21]));
        assert!(!s.verify("research~01", 1, "w/0123456789ab", "not base64!"));
        let other = Signer::new(&"j".repeat(32));
        assert!(!other.verify("research~01", 1, "w/0123456789ab", &secret));
    }

    /// A cell keeps its signer for the same key and swaps it for another.
    #[test]
    fn signer_cell_adopts_the_stored_key() {
        let cell = SignerCell::default();
        assert!(cell.get().is_none());
        let a = cell.adopt(&"a".repeat(64));
        assert!(Arc::ptr_eq(&a, &cell.adopt(&"a".repeat(64))));
        let b = cell.adopt(&"b".repeat(64));
        assert_eq!(b.stored(), "b".repeat(64));
        assert!(Arc::ptr_eq(&b, &cell.get().unwrap()));
    }

    /// The stream worker id shape is recognised exactly.
    #[test]
    fn stream_worker_shape() {
        assert!(is_stream_worker("pdf/0123456789ab"));
        assert!(is_stream_worker("a/b/ABCDEF012345"));
        assert!(!is_stream_worker("0123456789ab"));
        assert!(!is_stream_worker("pdf/0123456789a"));
        assert!(!is_stream_worker("pdf-0123456789ab"));
        assert!(!is_stream_worker("host:1:abcd0123/3"));
        assert!(!is_stream_worker("pdf/0123456789ag"));
    }

    /// `auto` follows whether callers authenticate.
    #[test]
    fn auto_policy() {
        assert_eq!(LeaseSecrets::Auto.resolve(true), LeasePolicy::Required);
        assert_eq!(LeaseSecrets::Auto.resolve(false), LeasePolicy::Optional);
        assert_eq!(LeaseSecrets::Optional.resolve(true), LeasePolicy::Optional);
        assert_eq!(LeaseSecrets::Required.resolve(false), LeasePolicy::Required);
    }
}
