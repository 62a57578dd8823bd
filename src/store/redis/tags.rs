//! Cache tag versions on Redis (see `crate::cache::tags`): one string key per
//! live tag holding a random u64 (decimal), expiring with the last entry
//! that carries it.
//!
//! Plain pipelines, no script: each tag's `SET NX GET` reads the version or
//! creates it in one command, and `PEXPIRE GT` (Redis 7.0) only ever
//! lengthens its TTL, so that a retried call changes nothing twice.

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
        let fresh: Vec<u64> = tags.iter().map(|_| rand::random()).collect();
        let mut pipe = redis::pipe();
        for ((key, ttl), version) in tags.iter().zip(&fresh) {
            let ms = ttl_millis(*ttl);
            pipe.cmd("SET")
                .arg(key)
                .arg(version)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(ms)
                .cmd("PEXPIRE")
                .arg(key)
                .arg(ms)
                .arg("GT")
                .ignore();
        }
        let olds: Vec<Option<String>> = self.query_pipe(&pipe, deadline).await?;
        // `SET NX GET` answers the version already there, or nil when it
        // stored ours.
        olds.iter()
            .zip(fresh)
            .map(|(old, fresh)| match old {
                None => Ok(fresh),
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
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(key)
                .arg(rand::random::<u64>())
                .arg("XX")
                .arg("KEEPTTL");
        }
        let replies: Vec<Option<String>> = self.query_pipe(&pipe, deadline).await?;
        Ok(replies.iter().filter(|r| r.is_some()).count() as u64)
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
