//! The task domain: the engine over a [`crate::store::tasks::TaskStore`]
//! and its errors, the one worker poller, the built-in worker pool and its
//! handlers, external workers, and listing (live events are
//! [`crate::watch`]).
//! `docs/design/tasks.md` is the design.

pub mod counters;
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
