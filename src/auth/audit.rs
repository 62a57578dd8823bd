//! The audit log: one line per admin call (target `koo::audit`), naming the
//! principal, the RPC, what it acted on and the outcome's gRPC code; never a
//! key.
//!
//! The layer knows who and which RPC; only the handler knows the target (the
//! level cleared, the schedule deleted), so the layer puts an [`AuditTarget`]
//! in the request's extensions, the handler fills it, and the layer logs
//! after the response.

use std::sync::{Arc, OnceLock};

/// What an admin call acted on, set by its handler.
#[derive(Debug, Clone, Default)]
pub struct AuditTarget(Arc<OnceLock<String>>);

impl AuditTarget {
    /// What the handler set (empty: nothing).
    pub fn get(&self) -> &str {
        self.0.get().map_or("", String::as_str)
    }
}

/// Records, for the audit line, what the call in `extensions` acts on (no
/// effect on calls that are not audited). Bounded: a target is quoted input.
pub fn target(extensions: &http::Extensions, what: impl FnOnce() -> String) {
    if let Some(t) = extensions.get::<AuditTarget>() {
        let what = what();
        let _ = t.0.set(crate::quote::clip(&what, 256).into_owned());
    }
}

/// Writes the audit line of one call.
pub fn log(principal: &str, method: &str, target: &str, code: &str) {
    tracing::info!(target: "koo::audit", principal, method, target, code, "admin call");
}
