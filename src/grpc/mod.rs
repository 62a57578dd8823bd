//! gRPC adapters: turn protobuf requests into domain calls and domain results
//! (or errors) into protobuf replies (or statuses). No domain logic lives here.

pub mod cache;
pub mod codec;
mod deadline;
pub mod health;
pub mod json;
pub mod schedule;
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
