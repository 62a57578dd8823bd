//! Cache tag versions on Redis (see `crate::cache::tags`): one string key per
//! live tag holding a random u64 (decimal), expiring with the last entry
//! that carries it.
//!
//! Plain pipelines, no script: each tag's `SET NX GET` reads the version or
//! creates it in one command, and `PEXPIRE GT` (Redis 7.0) only ever
//! lengthens its TTL, so that a retried call changes nothing twice.
//!
//! On a Redis Cluster the pipelines are split by slot (each tag key may
//! live on another master) and `MGET` is split by the client. The
//! guarantee (a write racing an invalidation ends in a miss) still holds,
//! because it never needed two tags to be read or bumped together: it rests
//! on each tag key alone, read by the write before the entry is written and
//! compared by every read after; an invalidation that replaced any one
//! version makes the entry miss, whichever master holds that tag. What a
//! Cluster adds is a failover losing a bump not yet replicated (an
//! acknowledged write lost, see the README): the old version comes back and
//! entries written before the bump hit again.

use std::time::Duration;

use super::RedisStore;
use super::kv::ttl_millis;
use crate::store::{Deadline, Result, StoreError};

impl RedisStore {
    /// See [`crate::store::CacheBackend::tag_versions_for_write`].
    pub(super) async fn versions_for_write(
        &self,
        tags: &[(String, Duration)],
        deadline: Deadline,
    ) -> Result<Vec<u64>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        // The pipeline (and so each fresh version) is built once: a retry
        // after a lost reply sends the same versions and reads them back.
        let tagged: Vec<Tagged> = tags
            .iter()
            .map(|(key, ttl)| Tagged {
                key,
                ms: ttl_millis(*ttl),
                fresh: rand::random(),
            })
            .collect();
        let olds: Vec<Option<String>> = self
            .pipe_each(
                &tagged,
                |pipe, t| {
                    pipe.cmd("SET")
                        .arg(t.key)
                        .arg(t.fresh)
                        .arg("NX")
                        .arg("GET")
                        .arg("PX")
                        .arg(t.ms)
                        .cmd("PEXPIRE")
                        .arg(t.key)
                        .arg(t.ms)
                        .arg("GT")
                        .ignore();
                },
                deadline,
            )
            .await?;
        // `SET NX GET` answers the version already there, or nil when it
        // stored ours.
        olds.iter()
            .zip(&tagged)
            .map(|(old, t)| match old {
                None => Ok(t.fresh),
                Some(v) => parse(v),
            })
            .collect()
    }

    /// See [`crate::store::CacheBackend::tag_versions`].
    pub(super) async fn current_versions(
        &self,
        keys: &[String],
        deadline: Deadline,
    ) -> Result<Vec<Option<u64>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        mget.arg(keys);
        let values: Vec<Option<String>> = self.query(&mget, deadline).await?;
        // Something unreadable under a tag key is no version koo wrote: the
        // entries carrying it miss, which is the safe answer.
        Ok(values
            .into_iter()
            .map(|v| v.and_then(|v| v.parse().ok()))
            .collect())
    }

    /// See [`crate::store::CacheBackend::bump_tags`].
    pub(super) async fn bump(&self, keys: &[String], deadline: Deadline) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        // Versions drawn once: a retry sends the same ones.
        let bumps: Vec<(&String, u64)> = keys.iter().map(|k| (k, rand::random())).collect();
        let replies: Vec<Option<String>> = self
            .pipe_each(
                &bumps,
                |pipe, (key, version)| {
                    pipe.cmd("SET")
                        .arg(*key)
                        .arg(version)
                        .arg("XX")
                        .arg("KEEPTTL");
                },
                deadline,
            )
            .await?;
        Ok(replies.iter().filter(|r| r.is_some()).count() as u64)
    }
}

/// One tag of a write: its key, TTL and the version to create if absent.
struct Tagged<'a> {
    key: &'a str,
    ms: u64,
    fresh: u64,
}

impl super::slots::Keyed for Tagged<'_> {
    fn key(&self) -> &[u8] {
        self.key.as_bytes()
    }
}

/// A version koo wrote; anything else under a tag key is refused rather
/// than silently replaced.
fn parse(v: &str) -> Result<u64> {
    v.parse().map_err(|_| {
        StoreError::Backend(format!(
            "a cache tag key holds {}, not a tag version",
            crate::quote::quote(v)
        ))
    })
}
