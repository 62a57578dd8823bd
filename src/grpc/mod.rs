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
pub mod worker;
