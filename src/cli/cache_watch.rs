//! `koo cache watch`: the cache's changes as they happen, on any koo
//! instance (WatchInvalidations), one line per change (a JSON object per
//! line with `--json`), until interrupted; koo ending the stream (it shuts
//! down) is reported and exits 3.

use tokio_stream::StreamExt as _;

use super::cache::Level;
use super::output::print_json;
use super::{CliError, Conn, ExitStatus};
use crate::pb::cache::v1 as pb;
use crate::pb::cache::v1::cache_service_client::CacheServiceClient;

/// Prints changes of `levels` (all when empty) under `prefix`.
pub async fn watch(
    conn: &Conn,
    client: &mut CacheServiceClient<tonic::transport::Channel>,
    levels: Vec<Level>,
    prefix: String,
    heartbeat: std::time::Duration,
) -> Result<ExitStatus, CliError> {
    let request = pb::WatchInvalidationsRequest {
        levels: levels.into_iter().map(Level::pb).collect(),
        key_prefix: prefix,
        heartbeat_interval: heartbeat.try_into().ok(),
    };
    let mut stream = client
        .watch_invalidations(conn.stream(request))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    // set by a READY that promises heartbeats (older koo releases send none)
    let mut silence: Option<std::time::Duration> = None;
    loop {
        let next = match silence {
            Some(limit) => tokio::time::timeout(limit, stream.next())
                .await
                .map_err(|_| conn.failed(stalled(limit)))?,
            None => stream.next().await,
        };
        let Some(item) = next else { break };
        let m = item.map_err(|s| conn.failed(s))?;
        if m.kind() == pb::InvalidationKind::Heartbeat {
            continue;
        }
        if m.kind() == pb::InvalidationKind::Ready {
            silence = m
                .heartbeat_interval
                .and_then(|d| std::time::Duration::try_from(d).ok())
                .map(|d| d.saturating_mul(STALL_INTERVALS));
        }
        if conn.json {
            print_json("koo.cache.v1.WatchInvalidationsResponse", &m);
        } else {
            outln!("{}", line(&m));
        }
    }
    // A watch runs until interrupted: koo ending it (it shuts down) is an
    // end a script must be able to tell from a normal one, as `task watch`
    // does when its watch ends early.
    Err(conn.failed(tonic::Status::unavailable(
        "koo ended the watch (it shuts down, or the stream was cut); changes from now on are not seen",
    )))
}

/// Heartbeat intervals of silence after which the watch is taken as stalled.
const STALL_INTERVALS: u32 = 3;

fn stalled(limit: std::time::Duration) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "no message from koo for {}, not even a heartbeat: koo or the network stalled, and changes from then on are not seen",
        humantime::format_duration(limit)
    ))
}

/// `SET app user:1 user:2`, `TAGS * t1`, `READY`.
fn line(m: &pb::WatchInvalidationsResponse) -> String {
    let kind = m
        .kind()
        .as_str_name()
        .trim_start_matches("INVALIDATION_KIND_");
    let mut out = kind.to_owned();
    let level = m.level();
    if level != pb::CacheLevel::Unspecified {
        out.push(' ');
        out.push_str(&level.as_str_name()["CACHE_LEVEL_".len()..].to_ascii_lowercase());
    } else if m.kind() == pb::InvalidationKind::Tags {
        out.push_str(" *");
    }
    for word in m.keys.iter().chain(&m.tags) {
        out.push(' ');
        out.push_str(&format!("{word:?}"));
    }
    out
}
