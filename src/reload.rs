//! Files re-read when they change: TLS certificates and keys, the API keys
//! file. Polled (size, modification time, inode) rather than watched with
//! inotify, because Kubernetes updates a mounted secret by swapping a symlink
//! to a new directory, which file watches miss; a stat per file per interval
//! costs nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// How a set of files looked: what tells a change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<(u64, SystemTime, u64)>>);

fn stamp(paths: &[PathBuf]) -> Stamp {
    Stamp(
        paths
            .iter()
            .map(|p| {
                std::fs::metadata(p).ok().map(|m| {
                    #[cfg(unix)]
                    let ino = std::os::unix::fs::MetadataExt::ino(&m);
                    #[cfg(not(unix))]
                    let ino = 0;
                    (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH), ino)
                })
            })
            .collect(),
    )
}

/// Polls `paths` every `every` until `stop`; when any of them changed, calls
/// `load`, which reads them again and applies the result (it logs and keeps
/// the previous value when the new files do not parse: a half-written
/// rotation must not take koo down). `load` is not called at start.
pub async fn watch(
    what: &'static str,
    paths: Vec<PathBuf>,
    every: Duration,
    stop: CancellationToken,
    load: Arc<dyn Fn() + Send + Sync>,
) {
    let mut last = stamp(&paths);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let paths2 = paths.clone();
        let now = match tokio::task::spawn_blocking(move || stamp(&paths2)).await {
            Ok(s) => s,
            Err(_) => continue,
        };
        if now != last {
            tracing::info!(what, files = ?paths, "files changed: reloading");
            last = now;
            let load = load.clone();
            let _ = tokio::task::spawn_blocking(move || load()).await;
        }
    }
}
