//! How a waiter of GetOrLock learns that the entry it waits for may have
//! been filled: the one seam where the invalidation bus plugs in.
//!
//! [`FillSignal`] is everything the wait loop asks: a wake-up registered
//! before it reads the entry (so that a fill between the read and the wait
//! is not missed). [`LocalFills`] wakes on fills made through this koo; the
//! wait loop adds a bounded poll (see `wait`) for fills made elsewhere.
//! Swapping in the bus's "tell me when this key changes" subscription is an
//! implementation of this trait, set with `Cache::set_fill_signal`.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use crate::domain::Level;

/// Wakes the waiters of an entry when it may have changed.
pub trait FillSignal: Send + Sync {
    /// A future that completes when `(level, key)` may have changed after
    /// this call (spurious wake-ups are allowed: the waiter reads again).
    fn listen(&self, level: Level, key: &str) -> BoxFuture<'static, ()>;

    /// Tells the listeners that this koo just filled (or gave up) the entry.
    fn filled(&self, level: Level, key: &str);
}

/// Shards of the in-process signal: a fill wakes the waiters of every key
/// of its shard (they read again and wait on), and the table never grows.
const SHARDS: usize = 64;

/// In-process fills: a fixed table of [`Notify`], by hash of level and key.
pub struct LocalFills {
    shards: [Arc<Notify>; SHARDS],
}

impl Default for LocalFills {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Arc::new(Notify::new())),
        }
    }
}

impl LocalFills {
    fn shard(&self, level: Level, key: &str) -> &Arc<Notify> {
        let h = crate::store::fnv1a(key.as_bytes()) ^ level.index() as u64;
        &self.shards[(h % SHARDS as u64) as usize]
    }
}

impl FillSignal for LocalFills {
    fn listen(&self, level: Level, key: &str) -> BoxFuture<'static, ()> {
        let mut notified = Box::pin(self.shard(level, key).clone().notified_owned());
        // Registered now, not at the first poll: a fill made before the
        // waiter awaits still wakes it.
        notified.as_mut().enable();
        notified
    }

    fn filled(&self, level: Level, key: &str) {
        self.shard(level, key).notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fill made after `listen` and before the await still wakes.
    #[tokio::test]
    async fn a_fill_before_the_await_wakes() {
        let fills = LocalFills::default();
        let woken = fills.listen(Level::App, "k");
        fills.filled(Level::App, "k");
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("woken");
    }
}
