//! The cache's figures across instances: the backend probe, metrics summed
//! over every instance sharing the backend (each publishes its own), and
//! key counts from a walk of the keyspace shared by concurrent callers.

use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::metrics::Snapshot;
use super::{Cache, HealthReport, Level, MetricsReport};
use crate::store::{BackendKind, Deadline, StoreError};

/// How long other instances' figures and backend memory are reused by
/// metrics calls (they change once per metrics flush anyway).
const SHARED_FIGURES_MAX_AGE: Duration = Duration::from_millis(100);
/// Time a key-count walk may take; it runs apart from any caller.
const KEY_COUNT_BUDGET: Duration = Duration::from_secs(120);

/// Figures that come from the backend rather than this process.
#[derive(Clone)]
pub(super) struct SharedFigures {
    taken: Instant,
    peers: Result<Vec<Snapshot>, String>,
    memory: Result<u64, String>,
}

/// The outcome of the latest key-count walk.
#[derive(Clone, Default)]
pub(super) struct KeyCountState {
    counts: Option<KeyCounts>,
    error: Option<String>,
}

#[derive(Clone, Copy)]
pub(super) struct KeyCounts {
    taken: Instant,
    at: SystemTime,
    counts: [u64; 4],
}

impl Cache {
    /// Probes the backend now.
    pub async fn health(&self, deadline: Deadline) -> HealthReport {
        let store = &self.inner.store;
        let ping = store.probe(deadline).await;
        let memory = match ping {
            Ok(_) => store.memory(deadline).await.ok(),
            Err(_) => None,
        };
        HealthReport {
            healthy: ping.is_ok(),
            backend: store.kind(),
            ping_latency: ping.ok(),
            circuit: store.circuit_state(),
            memory,
            last_error: store.last_error(),
            uptime: self.inner.started.elapsed(),
        }
    }

    /// This instance's own figures (Prometheus sums the instances itself).
    pub fn own_metrics(&self) -> super::metrics::Snapshot {
        self.inner.metrics.snapshot()
    }

    /// Metrics summed over every instance sharing the backend. When the
    /// backend cannot be read, this instance's own figures are returned with
    /// `partial` saying why.
    pub async fn metrics(&self, deadline: Deadline) -> MetricsReport {
        let (shared, counts) =
            tokio::join!(self.shared_figures(deadline), self.key_counts(deadline));
        // This instance's own figures are always live.
        let mut snapshot = self.inner.metrics.snapshot();
        let mut partial = None;
        let instances = match &shared.peers {
            Ok(peers) => {
                for peer in peers {
                    snapshot.merge(peer);
                }
                1 + peers.len() as u32
            }
            Err(e) => {
                partial = Some(format!("other instances' figures are missing: {e}"));
                1
            }
        };
        if let (Err(e), None) = (&counts, &partial) {
            partial = Some(format!("key counts are missing: {e}"));
        }
        if let (Err(e), None) = (&shared.memory, &partial) {
            partial = Some(format!("backend memory is missing: {e}"));
        }
        let counts = counts.ok();
        MetricsReport {
            snapshot,
            keys: counts.map(|c| c.counts).unwrap_or_default(),
            keys_counted_at: counts.map(|c| c.at),
            backend_used_memory: shared.memory.unwrap_or(0),
            uptime: self.inner.started.elapsed(),
            instances,
            sampled_at: SystemTime::now(),
            partial,
        }
    }

    /// Other instances' figures and backend memory, at most
    /// [`SHARED_FIGURES_MAX_AGE`] old.
    async fn shared_figures(&self, deadline: Deadline) -> SharedFigures {
        let waited = tokio::time::timeout_at(deadline.instant(), self.inner.shared.lock()).await;
        let Ok(mut cached) = waited else {
            let why = "no answer within the deadline".to_owned();
            return SharedFigures {
                taken: Instant::now(),
                peers: Err(why.clone()),
                memory: Err(why),
            };
        };
        if let Some(figures) = cached.as_ref()
            && figures.taken.elapsed() < SHARED_FIGURES_MAX_AGE
        {
            return figures.clone();
        }
        let peers = async {
            if self.inner.store.kind() == BackendKind::Redis {
                self.peer_snapshots(deadline)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                Ok(Vec::new())
            }
        };
        let memory = async {
            self.inner
                .store
                .memory(deadline)
                .await
                .map_err(|e| e.to_string())
                .and_then(|m| match m.unavailable {
                    Some(why) => Err(why),
                    None => Ok(m.used),
                })
        };
        let (peers, memory) = tokio::join!(peers, memory);
        let figures = SharedFigures {
            taken: Instant::now(),
            peers,
            memory,
        };
        *cached = Some(figures.clone());
        figures
    }

    /// The published snapshots of the other live instances.
    async fn peer_snapshots(&self, deadline: Deadline) -> Result<Vec<Snapshot>, StoreError> {
        let keys = &self.inner.keys;
        let since = SystemTime::now() - self.inner.config.record_ttl();
        let records = self
            .inner
            .store
            .read_records(
                &keys.cache_metrics_index(),
                since,
                &|m| keys.cache_metrics_record(m),
                deadline,
            )
            .await?;
        Ok(records
            .into_iter()
            .filter(|(member, _)| *member != self.inner.instance)
            .filter_map(|(member, payload)| match serde_json::from_slice(&payload) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(instance = %member, error = %e, "ignoring unreadable metrics record");
                    None
                }
            })
            .collect())
    }

    /// Key counts no older than `key_count_interval` when a walk can finish
    /// within half the caller's time left, else the latest ones.
    async fn key_counts(&self, deadline: Deadline) -> Result<KeyCounts, String> {
        use std::sync::atomic::Ordering;
        let mut latest = self.inner.key_counts.subscribe();
        let known = latest.borrow_and_update().clone();
        if let Some(c) = known.counts
            && c.taken.elapsed() < self.inner.config.key_count_interval
        {
            return Ok(c);
        }
        if !self.inner.walking.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                let result = this.count_keys(Deadline::after(KEY_COUNT_BUDGET)).await;
                this.inner.key_counts.send_modify(|state| match result {
                    Ok(c) => {
                        *state = KeyCountState {
                            counts: Some(c),
                            error: None,
                        }
                    }
                    Err(e) => state.error = Some(e.to_string()),
                });
                this.inner.walking.store(false, Ordering::Release);
            });
        }
        let _ = tokio::time::timeout(deadline.remaining() / 2, latest.changed()).await;
        let state = latest.borrow().clone();
        state
            .counts
            .ok_or_else(|| state.error.unwrap_or_else(|| "not counted yet".to_owned()))
    }

    /// Counts every level's keys in one walk of the cache namespace.
    async fn count_keys(&self, deadline: Deadline) -> Result<KeyCounts, StoreError> {
        let keys = &self.inner.keys;
        let prefixes: Vec<String> = Level::ALL
            .iter()
            .map(|l| keys.level_prefix(*l).to_owned())
            .collect();
        let counted = self
            .inner
            .store
            .count_by_prefix(&keys.cache_pattern(), &prefixes, deadline)
            .await?;
        let mut counts = [0; 4];
        counts.copy_from_slice(&counted);
        Ok(KeyCounts {
            taken: Instant::now(),
            at: SystemTime::now(),
            counts,
        })
    }

    /// Publishes this instance's figures for the others to sum.
    pub async fn publish_metrics(&self, deadline: Deadline) -> Result<(), StoreError> {
        let keys = &self.inner.keys;
        let payload = serde_json::to_vec(&self.inner.metrics.snapshot())
            .map_err(|e| StoreError::Backend(format!("cannot encode metrics: {e}")))?;
        self.inner
            .store
            .publish_record(
                &keys.cache_metrics_index(),
                &keys.cache_metrics_record(&self.inner.instance),
                &self.inner.instance,
                payload.into(),
                self.inner.config.record_ttl(),
                deadline,
            )
            .await
    }

    /// Publishes metrics every `metrics_flush_interval` until `stop`. Only a
    /// shared (Redis) backend has anyone to publish to.
    pub async fn run_metrics_publisher(self, stop: CancellationToken) {
        if self.inner.store.kind() != BackendKind::Redis {
            return;
        }
        let interval = self.inner.config.metrics_flush_interval;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self
                .publish_metrics(Deadline::after(interval.max(Duration::from_secs(1))))
                .await
            {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("publishing cache metrics again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot publish cache metrics; other instances will not see this one's figures");
                }
                Err(_) => {}
            }
        }
    }
}
