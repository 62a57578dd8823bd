//! `WatchInvalidations`: the changes a near cache needs, filtered here (by
//! level and key prefix) so that a client pays only for what it keeps.
//! The bus behind it, its delay and its resets: `crate::cache::bus`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{CacheApi, level, to_pb_level};
use crate::cache::{Change, ChangeKind, Level, Notice};
use crate::grpc::status::invalid_argument;
use crate::grpc::time;
use crate::pb::cache::v1 as pb;
use crate::store::CircuitState;
use crate::watch::Kind as WatchKind;

/// The stream `WatchInvalidations` answers.
pub type InvalidationStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchInvalidationsResponse, Status>> + Send>>;

/// The longest key prefix accepted (the longest key is shorter still).
const MAX_PREFIX: usize = 64 * 1024;

/// What one stream wants.
struct Filter {
    /// Empty: every level.
    levels: Vec<Level>,
    prefix: String,
    /// A HEARTBEAT after this long without another message, if asked.
    heartbeat: Option<Duration>,
}

impl TryFrom<pb::WatchInvalidationsRequest> for Filter {
    type Error = Status;

    fn try_from(r: pb::WatchInvalidationsRequest) -> Result<Self, Status> {
        let levels = r
            .levels
            .iter()
            .enumerate()
            .map(|(i, l)| level(&format!("levels[{i}]"), *l))
            .collect::<Result<Vec<_>, _>>()?;
        if r.key_prefix.len() > MAX_PREFIX {
            return Err(invalid_argument(
                "key_prefix",
                &format!(
                    "{} is over the limit of {MAX_PREFIX} bytes",
                    crate::quote::quote_sized(&r.key_prefix)
                ),
            ));
        }
        let heartbeat = time::duration(
            "heartbeat_interval",
            r.heartbeat_interval,
            time::WATCH_INTERVAL,
        )?;
        Ok(Self {
            levels,
            prefix: r.key_prefix,
            heartbeat,
        })
    }
}

impl Filter {
    /// The message for `notice`, if this stream wants it.
    fn message(&self, notice: Notice) -> Option<pb::WatchInvalidationsResponse> {
        let change: Arc<Change> = match notice {
            Notice::Ready => {
                return Some(pb::WatchInvalidationsResponse {
                    heartbeat_interval: self.heartbeat.and_then(|d| d.try_into().ok()),
                    ..bare(pb::InvalidationKind::Ready)
                });
            }
            Notice::Reset => return Some(bare(pb::InvalidationKind::Reset)),
            Notice::Change(c) => c,
        };
        if let Some(l) = change.level
            && !self.levels.is_empty()
            && !self.levels.contains(&l)
        {
            return None;
        }
        let keys: Vec<String> = change
            .keys
            .iter()
            .filter(|k| k.starts_with(&self.prefix))
            .cloned()
            .collect();
        let kind = match change.kind {
            ChangeKind::Set => pb::InvalidationKind::Set,
            ChangeKind::Delete => pb::InvalidationKind::Delete,
            ChangeKind::Expired => pb::InvalidationKind::Expired,
            ChangeKind::ClearLevel => pb::InvalidationKind::ClearLevel,
            ChangeKind::Tags => pb::InvalidationKind::Tags,
        };
        let keyed = matches!(
            change.kind,
            ChangeKind::Set | ChangeKind::Delete | ChangeKind::Expired
        );
        if keyed && keys.is_empty() {
            return None;
        }
        Some(pb::WatchInvalidationsResponse {
            kind: kind as i32,
            level: change.level.map_or(0, |l| to_pb_level(l) as i32),
            keys,
            tags: change.tags.clone(),
            time: Some(change.time.into()),
            heartbeat_interval: None,
        })
    }
}

fn bare(kind: pb::InvalidationKind) -> pb::WatchInvalidationsResponse {
    pb::WatchInvalidationsResponse {
        kind: kind as i32,
        time: Some(std::time::SystemTime::now().into()),
        ..Default::default()
    }
}

impl CacheApi {
    pub(super) async fn watch_invalidations_rpc(
        &self,
        request: Request<pb::WatchInvalidationsRequest>,
    ) -> Result<Response<InvalidationStream>, Status> {
        let filter = Filter::try_from(request.into_inner())?;
        // While the store's breaker is open the stream could not become
        // READY: say so now, as a unary call would, rather than send nothing
        let mut circuit = self.cache.circuit();
        if *circuit.borrow_and_update() == CircuitState::Open {
            return Err(unavailable());
        }
        let permit = self.watchers.admit(WatchKind::CacheInvalidations)?;
        let watch = Watch {
            sub: self.cache.subscribe(),
            filter,
            stop: self.shutdown.clone(),
            circuit,
            started: false,
            quiet_since: Instant::now(),
            _permit: permit,
        };
        let stream = futures::stream::unfold(Some(watch), |watch| async move {
            let mut w = watch?;
            loop {
                let beat = w.filter.heartbeat.map(|d| w.quiet_since + d);
                let notice = tokio::select! {
                    biased;
                    _ = w.stop.cancelled() => return None,
                    // the store failed before the first READY: the stream
                    // ends UNAVAILABLE (after it, a failure is a RESET and
                    // the stream waits for READY again, as documented)
                    () = opened(&mut w.circuit), if !w.started => {
                        return Some((Err(unavailable()), None));
                    }
                    n = w.sub.next() => n,
                    () = sleep_until(beat) => {
                        w.quiet_since = Instant::now();
                        return Some((Ok(bare(pb::InvalidationKind::Heartbeat)), Some(w)));
                    }
                };
                w.started |= notice == Notice::Ready;
                if let Some(m) = w.filter.message(notice) {
                    w.quiet_since = Instant::now();
                    return Some((Ok(m), Some(w)));
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// One stream's state.
struct Watch {
    sub: crate::cache::Subscription,
    filter: Filter,
    stop: tokio_util::sync::CancellationToken,
    circuit: tokio::sync::watch::Receiver<CircuitState>,
    /// Whether the first READY has been sent.
    started: bool,
    /// When the stream last sent a message (or opened).
    quiet_since: Instant,
    _permit: crate::watch::Permit,
}

/// Until `at`, or never.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Until the breaker is open (never, once its sender is gone).
async fn opened(circuit: &mut tokio::sync::watch::Receiver<CircuitState>) {
    if circuit
        .wait_for(|s| *s == CircuitState::Open)
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
}

fn unavailable() -> Status {
    Status::unavailable(
        "the cache's store is unavailable (its circuit breaker is open), so changes cannot be watched; retry with back-off (the health service says when it serves again)",
    )
}
