//! Limits on what clients may hold open, in one place: the watcher limit
//! and buffer of live streams, HTTP/2 streams per connection, and the
//! transport's limits (idle connections, connection age, keepalive, message
//! sizes). (The in-flight unary load-shedding limit joins them here.)

use crate::app::Limits;
use std::time::Duration;

use clap::Args;

use super::parse_duration;

/// The limits' flags, read by `koo serve`.
#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// Most watch streams (WatchTask, WatchTasks, WatchTaskMetrics, WatchMetrics) open at once in
    /// this process; one more gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "KOO_MAX_WATCHERS", value_name = "KOO_MAX_WATCHERS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_watchers: u32,
    /// Events a watcher may leave unread (after merging progress reports of one task) before
    /// koo ends it with RESOURCE_EXHAUSTED and its resume token.
    #[arg(long, env = "KOO_WATCH_BUFFER", value_name = "KOO_WATCH_BUFFER", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    pub watch_buffer: u32,
    /// Concurrent calls (HTTP/2 streams) one client connection may have open.
    #[arg(long, env = "KOO_MAX_CONCURRENT_STREAMS", value_name = "KOO_MAX_CONCURRENT_STREAMS",
          default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_streams: u32,
    /// Most tasks one external worker may hold at once in this process, over all its Work
    /// streams and unary leases (a worker: an authenticated key or certificate, else a
    /// connection; a key's `max_held` overrides it). N koo processes allow N times as many.
    #[arg(long, env = "KOO_MAX_HELD_PER_WORKER", value_name = "KOO_MAX_HELD_PER_WORKER",
          default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_held_per_worker: u32,
    /// Unary calls in flight at once in this process; one more gets RESOURCE_EXHAUSTED at once
    /// (health checks are never refused; streams are bounded by the limits above).
    #[arg(long, env = "KOO_MAX_INFLIGHT_CALLS", value_name = "KOO_MAX_INFLIGHT_CALLS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_inflight_calls: u32,
    /// Connections open at once on each listener (gRPC, HTTP, health); past it, new ones wait in
    /// the kernel's backlog until one closes. Keep it under the process's file descriptor limit.
    #[arg(long, env = "KOO_MAX_CONNECTIONS", value_name = "KOO_MAX_CONNECTIONS",
          default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// A connection with no call open for this long is closed (an open stream is a call);
    /// 0: never.
    #[arg(long, env = "KOO_IDLE_CONNECTION_TIMEOUT", value_name = "KOO_IDLE_CONNECTION_TIMEOUT",
          default_value = "10m", value_parser = parse_duration)]
    pub idle_connection_timeout: Duration,
    /// A connection older than this is asked to go away (GOAWAY), so that clients reconnect and
    /// load balancers rebalance; 0: never (the default, since it ends long watch streams too).
    #[arg(long, env = "KOO_MAX_CONNECTION_AGE", value_name = "KOO_MAX_CONNECTION_AGE",
          default_value = "0", value_parser = parse_duration)]
    pub max_connection_age: Duration,
    /// After KOO_MAX_CONNECTION_AGE, how long its calls may take to finish before the connection
    /// is closed; 0: as long as they take.
    #[arg(long, env = "KOO_MAX_CONNECTION_AGE_GRACE", value_name = "KOO_MAX_CONNECTION_AGE_GRACE",
          default_value = "0", value_parser = parse_duration)]
    pub max_connection_age_grace: Duration,
    /// How often an HTTP/2 PING checks that a quiet client is still there; 0: never.
    #[arg(long, env = "KOO_HTTP2_KEEPALIVE_INTERVAL", value_name = "KOO_HTTP2_KEEPALIVE_INTERVAL",
          default_value = "30s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// How long a PING may wait for its answer before the connection is closed.
    #[arg(long, env = "KOO_HTTP2_KEEPALIVE_TIMEOUT", value_name = "KOO_HTTP2_KEEPALIVE_TIMEOUT",
          default_value = "10s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,
    /// Largest message (bytes) TaskService, ScheduleService, WorkerService, health and reflection
    /// accept (and the last three send; task replies carry results accepted under it, so they are
    /// not cut). CacheService's limit follows CACHE_MAX_VALUE_SIZE.
    #[arg(long, env = "KOO_MAX_MESSAGE_SIZE", value_name = "KOO_MAX_MESSAGE_SIZE",
          default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(1024..=(1 << 30)))]
    pub max_message_size: u32,
}

/// Zero means off.
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

impl LimitsArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> Limits {
        Limits {
            max_watchers: self.max_watchers as usize,
            watch_buffer: self.watch_buffer as usize,
            max_concurrent_streams: self.max_concurrent_streams,
            max_held_per_worker: self.max_held_per_worker,
            max_inflight_calls: self.max_inflight_calls as usize,
            max_connections: self.max_connections as usize,
            idle_connection_timeout: nonzero(self.idle_connection_timeout),
            max_connection_age: nonzero(self.max_connection_age),
            max_connection_age_grace: nonzero(self.max_connection_age_grace),
            http2_keepalive_interval: nonzero(self.http2_keepalive_interval),
            http2_keepalive_timeout: self.http2_keepalive_timeout,
            max_message_size: self.max_message_size as usize,
            max_health_watches: crate::grpc::health::MAX_WATCHES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        limits: LimitsArgs,
    }

    fn parse(args: &[&str]) -> Limits {
        let cmd = Flags::command().mut_args(|a| a.env(None));
        let matches = cmd
            .try_get_matches_from(std::iter::once(&"koo").chain(args))
            .unwrap();
        Flags::from_arg_matches(&matches).unwrap().limits.limits()
    }

    /// The documented defaults (idle 10m, no age limit, keepalive 30s/10s,
    /// 4 MiB messages), and 0 switching the timers off.
    #[test]
    fn transport_defaults_and_zero() {
        assert_eq!(parse(&[]), Limits::default());
        let off = parse(&[
            "--idle-connection-timeout",
            "0",
            "--http2-keepalive-interval",
            "0",
            "--max-connection-age",
            "30m",
        ]);
        assert_eq!(off.idle_connection_timeout, None);
        assert_eq!(off.http2_keepalive_interval, None);
        assert_eq!(off.max_connection_age, Some(Duration::from_secs(1800)));
    }
}
