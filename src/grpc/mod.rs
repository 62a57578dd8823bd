//! gRPC adapters: turn protobuf requests into domain calls and domain results
//! (or errors) into protobuf replies (or statuses). No domain logic lives here.
//!
//! One module per service ([`auth`], [`cache`], [`tasks`], [`worker`], [`schedule`],
//! [`health`]); a service's conversions sit in submodules beside its
//! handlers. Every domain error becomes a `Status` in `status` (one
//! exhaustive match per error enum), and [`span`] opens one span per RPC
//! around every service.

pub mod auth;
pub mod cache;
pub mod codec;
mod deadline;
pub mod health;
pub mod json;
pub mod metrics;
pub mod schedule;
pub mod shed;
pub mod span;
mod status;
pub mod tasks;
mod time;
pub mod worker;

use tonic::Status;

/// A list request's page size: `default` when 0, at most `max`; negative is
/// INVALID_ARGUMENT.
pub(crate) fn page_size(raw: i32, default: usize, max: usize) -> Result<usize, Status> {
    match raw {
        n if n < 0 => Err(status::invalid_argument(
            "page_size",
            "must not be negative",
        )),
        0 => Ok(default),
        n => Ok((n as usize).min(max)),
    }
}

/// The page token that resumes a listing after the item named `last`: the
/// name and a checksum of it, so that a token koo did not issue is refused
/// (as the task listings refuse theirs) rather than silently read as a name.
pub(crate) fn page_token(last: &str) -> String {
    format!("{last}~{:016x}", crate::store::fnv1a(last.as_bytes()))
}

/// The name a page token of `listing` resumes after (`""`: from the start).
pub(crate) fn page_after<'a>(listing: &str, token: &'a str) -> Result<&'a str, Status> {
    if token.is_empty() {
        return Ok("");
    }
    token
        .rsplit_once('~')
        .filter(|(name, sum)| *sum == format!("{:016x}", crate::store::fnv1a(name.as_bytes())))
        .map(|(name, _)| name)
        .ok_or_else(|| {
            status::invalid_argument(
                "page_token",
                &format!(
                    "{} is not a token {listing} issued",
                    crate::quote::quote(token)
                ),
            )
        })
}
