//! The task domain (issue 3, in progress): the vocabulary every task backend
//! shares. The engine itself (leases, scripts, workers) follows
//! `docs/design/tasks.md`.

pub mod engine;
pub mod events;
pub mod handlers;
pub mod listing;
pub mod model;
pub mod retry;
pub mod worker;
