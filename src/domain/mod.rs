//! The vocabulary every layer shares, below the store: task ids and queue
//! names, categories, priorities, states and their transitions, the task
//! model, how an attempt ends, a queue's figures, and cache levels.
//!
//! Nothing here does I/O or knows how it is stored: `store` depends on this
//! module (and on `keys`), never the other way round.

pub mod flow;
pub mod level;
pub mod outcome;
pub mod schedule;
pub mod stats;
pub mod task;
pub mod times;

pub use level::Level;
pub use outcome::Outcome;
pub use stats::{Count, Counts, Pause, QueueStats};
