//! Commands over many keys, on one server or split by Cluster slot.
//!
//! A redis-rs Cluster pipeline is sent whole to its first key's slot, and a
//! `MULTI`/`EXEC` may only touch one slot: a pipeline whose keys span slots
//! fails with `CROSSSLOT`. So on a Cluster each pipeline here is cut into
//! one pipeline per slot (keys sharing a `{hash tag}` share a slot, so they
//! stay in one pipeline), sent concurrently and answered in the caller's
//! order. On one server the caller's single pipeline is sent as before: no
//! grouping, no extra allocation, one round trip.

use futures::{StreamExt, TryStreamExt};
use redis::cluster_routing::Slot;
use redis::{FromRedisValue, Pipeline};

use super::RedisStore;
use crate::store::{Deadline, Result, StoreError};

/// Per-slot pipelines of one call in flight at once on a Cluster: enough to
/// keep every master busy, few enough not to flood the connections with a
/// thousand-key batch's thousand slots.
const IN_FLIGHT: usize = 32;

/// What a command over many keys is built from: something with a key.
pub(super) trait Keyed {
    /// The Redis key, which decides the slot.
    fn key(&self) -> &[u8];
}

impl Keyed for String {
    fn key(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Keyed for Vec<u8> {
    fn key(&self) -> &[u8] {
        self
    }
}

impl Keyed for str {
    fn key(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Keyed for [u8] {
    fn key(&self) -> &[u8] {
        self
    }
}

impl<T: Keyed + ?Sized> Keyed for &T {
    fn key(&self) -> &[u8] {
        (**self).key()
    }
}

impl Keyed for crate::store::Write {
    fn key(&self) -> &[u8] {
        self.key.as_bytes()
    }
}

impl<K: Keyed, V> Keyed for (K, V) {
    fn key(&self) -> &[u8] {
        self.0.key()
    }
}

/// The indexes of `keys` grouped by Cluster slot, in first-seen order (a
/// group keeps its keys in the caller's order).
pub(super) fn by_slot<K: Keyed>(keys: &[K]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Slot, Vec<usize>)> = Vec::new();
    let mut slot_group = std::collections::HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let slot = Slot::for_key(key.key());
        let g = *slot_group.entry(slot).or_insert_with(|| {
            groups.push((slot, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

impl RedisStore {
    /// Runs, for every key, the commands `build` adds for it, which must
    /// answer one reply `T` per key (a tuple takes several commands'
    /// replies); the replies in `keys`' order. One pipeline on a server; one
    /// per slot on a Cluster.
    pub(super) async fn pipe_each<K, T>(
        &self,
        keys: &[K],
        build: fn(&mut Pipeline, &K),
        deadline: Deadline,
    ) -> Result<Vec<T>>
    where
        K: Keyed,
        T: FromRedisValue,
    {
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            for key in keys {
                build(&mut pipe, key);
            }
            return self.query_pipe(&pipe, deadline).await;
        }
        let groups = by_slot(keys);
        let pipes: Vec<Pipeline> = groups
            .iter()
            .map(|group| {
                let mut pipe = redis::pipe();
                for &i in group {
                    build(&mut pipe, &keys[i]);
                }
                pipe
            })
            .collect();
        // (the calls are made before the stream: a closure in it would not
        // be `Send` for every lifetime, which the async trait needs)
        let calls: Vec<_> = pipes
            .iter()
            .map(|pipe| self.query_pipe::<Vec<T>>(pipe, deadline))
            .collect();
        let replies: Vec<Vec<T>> = futures::stream::iter(calls)
            .buffered(IN_FLIGHT)
            .try_collect()
            .await?;
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(keys.len()).collect();
        for (group, values) in groups.iter().zip(replies) {
            if values.len() != group.len() {
                return Err(StoreError::Backend(format!(
                    "a pipeline of {} keys had {} replies",
                    group.len(),
                    values.len()
                )));
            }
            for (&i, v) in group.iter().zip(values) {
                out[i] = Some(v);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Runs the writes `build` adds for every key (their replies ignored),
    /// as one transaction (`MULTI`/`EXEC`) when `atomic`: on a server, one
    /// for all keys; on a Cluster, one per slot, so that all-or-nothing
    /// holds per slot (and so for keys that share a `{hash tag}`).
    pub(super) async fn write_each<K: Keyed>(
        &self,
        keys: &[K],
        atomic: bool,
        build: fn(&mut Pipeline, &K),
        deadline: Deadline,
    ) -> Result<()> {
        let pipe_of = |indexes: &mut dyn Iterator<Item = usize>| {
            let mut pipe = redis::pipe();
            if atomic {
                pipe.atomic();
            }
            for i in indexes {
                build(&mut pipe, &keys[i]);
            }
            pipe
        };
        if !self.is_cluster() {
            let pipe = pipe_of(&mut (0..keys.len()));
            return self.query_pipe::<()>(&pipe, deadline).await;
        }
        let pipes: Vec<Pipeline> = by_slot(keys)
            .into_iter()
            .map(|group| pipe_of(&mut group.into_iter()))
            .collect();
        let calls: Vec<_> = pipes
            .iter()
            .map(|pipe| self.query_pipe::<()>(pipe, deadline))
            .collect();
        // Every slot's write runs to its end before the first error is
        // reported: stopping at it would drop the writes still in flight,
        // so whether another slot's entries were written would depend on
        // which reply came first.
        let results: Vec<Result<()>> = futures::stream::iter(calls)
            .buffered(IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys group by slot in first-seen order; a hash tag keeps keys together.
    #[test]
    fn keys_group_by_slot() {
        let keys = ["a{x}", "b", "c{x}", "b", "d{x}"];
        let groups = by_slot(&keys);
        assert_eq!(groups[0], vec![0, 2, 4], "{groups:?}");
        assert!(groups.contains(&vec![1, 3]), "{groups:?}");
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), keys.len());
        assert!(by_slot::<&str>(&[]).is_empty());
    }
}
