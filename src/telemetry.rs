//! The one place where logging is set up.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The Redis client's own lines about each attempt to reconnect to a
/// Cluster: hundreds a second while every seed node is down (it retries
/// without a pause between requests). koo reports such an outage itself,
/// once, through its circuit breaker and health, so these are off unless
/// `KOO_LOG` names a `redis` target (`KOO_LOG=info,redis=warn`).
const QUIET: &str = "redis::cluster_handling=off";

/// `filter` with [`QUIET`] added, unless it says something about `redis`.
fn with_defaults(filter: &str) -> String {
    let names_redis = filter
        .split(',')
        .any(|d| d.trim_start().starts_with("redis"));
    match filter.trim() {
        _ if names_redis => filter.to_owned(),
        "" => QUIET.to_owned(),
        _ => format!("{filter},{QUIET}"),
    }
}

/// Installs the global `tracing` subscriber, writing to standard error.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(with_defaults(filter))
        .map_err(|e| anyhow::anyhow!("KOO_LOG: {filter:?} is not a valid log filter: {e}"))?;
    // Colours only for a person at a terminal; log collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A write that fails (stderr closed: the reader of a pipe gone)
        // loses that line; by default the logger would report it with
        // eprintln!, which panics the task that logged when stderr is gone.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's reconnection chatter is off unless the filter speaks
    /// of `redis` itself.
    #[test]
    fn the_cluster_client_chatter_is_off_unless_asked_for() {
        assert_eq!(with_defaults("info"), "info,redis::cluster_handling=off");
        assert_eq!(with_defaults(""), "redis::cluster_handling=off");
        for own in ["info,redis=warn", "debug, redis::cluster_handling=debug"] {
            assert_eq!(with_defaults(own), own);
        }
        assert!(EnvFilter::try_new(with_defaults("koo=debug,info")).is_ok());
    }
}
