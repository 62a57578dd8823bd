//! Limits on what clients may hold open, in one place: the watcher limit
//! and buffer of live streams, and HTTP/2 streams per connection. (The
//! transport limits of the security work build on this module.)

use clap::Args;

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
}

/// The limits, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `KOO_MAX_WATCHERS`.
    pub max_watchers: usize,
    /// `KOO_WATCH_BUFFER`.
    pub watch_buffer: usize,
    /// `KOO_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
    /// `KOO_MAX_HELD_PER_WORKER`.
    pub max_held_per_worker: u32,
    /// `KOO_MAX_INFLIGHT_CALLS`.
    pub max_inflight_calls: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_watchers: 20_000,
            watch_buffer: 4096,
            max_concurrent_streams: 4096,
            max_held_per_worker: 1024,
            max_inflight_calls: 10_000,
        }
    }
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
        }
    }
}
