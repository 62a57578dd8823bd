//! How an attempt ended, as the engine tells the store.

use std::time::Duration;

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// With a result (JSON).
    Succeeded(String),
    /// With an error (JSON) worth retrying after `delay`, budget permitting.
    Retry { error: String, delay: Duration },
    /// With an error (JSON) not worth retrying.
    Failed(String),
    /// At its hard time limit (error JSON).
    TimedOut(String),
    /// Stopped because a cancel was asked for (error JSON).
    Cancelled(String),
}
