//! Periodic snapshots computed once per interval per process and shared by
//! every watcher with that interval (`WatchMetrics`, `WatchTaskMetrics`).
//!
//! Fifty dashboards asking for task metrics every second cost one
//! computation a second, not fifty. Each interval has a producer that runs
//! while somebody listens; watchers read the latest snapshot through a
//! `watch` channel, so a slow watcher skips snapshots (it never gets a burst
//! of stale ones, and never grows memory).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One snapshot.
pub struct Snapshot<T> {
    /// When it was taken.
    pub at: Instant,
    /// What it holds.
    pub value: T,
}

type Compute<T> = Arc<dyn Fn(Duration) -> BoxFuture<'static, T> + Send + Sync>;
type Slot<T> = watch::Sender<Option<Arc<Snapshot<T>>>>;

/// Shared snapshots of `T`, by interval: a cheap-to-clone handle.
pub struct Ticker<T> {
    slots: Arc<Mutex<HashMap<Duration, Slot<T>>>>,
    /// Takes a snapshot within the given budget.
    compute: Compute<T>,
    stop: CancellationToken,
}

impl<T> Clone for Ticker<T> {
    fn clone(&self) -> Self {
        Self {
            slots: self.slots.clone(),
            compute: self.compute.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// A watcher's view of one interval's snapshots.
pub struct Follower<T> {
    rx: watch::Receiver<Option<Arc<Snapshot<T>>>>,
    ticker: Ticker<T>,
    interval: Duration,
    first: bool,
}

impl<T: Send + Sync + 'static> Ticker<T> {
    /// Snapshots taken by `compute` (given a time budget); producers stop on
    /// `stop`.
    pub fn new(
        stop: CancellationToken,
        compute: impl Fn(Duration) -> BoxFuture<'static, T> + Send + Sync + 'static,
    ) -> Self {
        Self {
            slots: Arc::default(),
            compute: Arc::new(compute),
            stop,
        }
    }

    /// Follows the snapshots taken every `interval`, starting the producer
    /// for that interval if none runs.
    pub fn follow(&self, interval: Duration) -> Follower<T> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let rx = match slots.get(&interval) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(None);
                slots.insert(interval, tx.clone());
                tokio::spawn(self.clone().produce(interval, tx));
                rx
            }
        };
        Follower {
            rx,
            ticker: self.clone(),
            interval,
            first: true,
        }
    }

    async fn produce(self, interval: Duration, tx: Slot<T>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            {
                // Checked under the lock, so that no watcher joins a
                // producer about to stop.
                let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
                if tx.receiver_count() == 0 {
                    slots.remove(&interval);
                    return;
                }
            }
            let value = (self.compute)(interval).await;
            tx.send_replace(Some(Arc::new(Snapshot {
                at: Instant::now(),
                value,
            })));
        }
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&interval);
    }
}

impl<T: Send + Sync + 'static> Follower<T> {
    /// The next snapshot; `None` when koo stops. The first comes at once:
    /// the shared one if it is recent (younger than the interval and than a
    /// second), else one taken for this watcher alone.
    pub async fn next(&mut self) -> Option<Arc<Snapshot<T>>> {
        if std::mem::take(&mut self.first) {
            let shared = self.rx.borrow_and_update().clone();
            let fresh = self.interval.min(Duration::from_secs(1));
            match shared {
                Some(s) if s.at.elapsed() < fresh => return Some(s),
                // the producer has just started: its first snapshot is near
                None => {}
                Some(_) => {
                    let value = (self.ticker.compute)(self.interval).await;
                    return Some(Arc::new(Snapshot {
                        at: Instant::now(),
                        value,
                    }));
                }
            }
        }
        tokio::select! {
            _ = self.ticker.stop.cancelled() => None,
            changed = self.rx.changed() => match changed {
                Ok(()) => self.rx.borrow_and_update().clone(),
                Err(_) => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn watchers_of_one_interval_share_one_computation_per_tick() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        let ticker = Ticker::new(CancellationToken::new(), move |_| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { n })
        });
        let mut followers: Vec<_> = (0..50)
            .map(|_| ticker.follow(Duration::from_secs(1)))
            .collect();
        for f in &mut followers {
            assert_eq!(f.next().await.unwrap().value, 0);
        }
        for f in &mut followers {
            assert_eq!(f.next().await.unwrap().value, 1);
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "two ticks, two computations"
        );
        drop(followers);
        // the producer stops at its next tick
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(ticker.slots.lock().unwrap().is_empty());
    }
}
