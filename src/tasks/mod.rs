//! The task domain: the model, the engine over a [`crate::store::tasks::TaskStore`],
//! the built-in worker pool and its handlers, and listing (live events are
//! [`crate::watch`]).
//! `docs/design/tasks.md` is the design.

pub mod engine;
pub mod error;
pub mod handlers;
pub mod listing;
pub mod maintenance;
pub mod metrics;
pub mod poller;
pub mod remote;
pub mod requeue;
pub mod retry;
pub mod worker;
