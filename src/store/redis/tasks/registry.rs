//! The Redis side of what is shared across a deployment but is no task
//! transition: worker pools' presence records, the key of lease secrets,
//! and which idempotency keys are claimed.

use std::time::Duration;

use crate::store::redis::RedisStore;
use crate::store::tasks::WorkerRecord;
use crate::store::{Deadline, Result, StoreError};

use super::millis;

impl RedisStore {
    /// Records a worker pool as alive for `ttl`: its record (with that TTL)
    /// and its place in the index, from which records older than a few
    /// TTLs are dropped.
    pub(super) async fn announce_worker(
        &self,
        prefix: &str,
        record: &WorkerRecord,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        let index = crate::keys::workers_index(prefix);
        let json = serde_json::to_string(record)
            .map_err(|e| StoreError::Backend(format!("worker record: {e}")))?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(crate::keys::worker_record(prefix, &record.id))
            .arg(json)
            .arg("PX")
            .arg(millis(ttl).max(1))
            .ignore();
        if self.is_cluster() {
            // the record and the index are in different slots: the record
            // first, so that the index never names a pool with no record
            self.query_pipe::<()>(&pipe, deadline).await?;
            pipe = redis::pipe();
        }
        pipe.cmd("ZADD")
            .arg(&index)
            .arg(record.seen_ms)
            .arg(&record.id)
            .ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(record.seen_ms - 10 * millis(ttl) as i64)
            .ignore();
        // the index itself lives as long as some pool keeps announcing
        pipe.cmd("PEXPIRE")
            .arg(&index)
            .arg(10 * millis(ttl).max(1))
            .ignore();
        self.query_pipe::<()>(&pipe, deadline).await
    }

    /// The stored key of lease secrets, after storing `fresh` when there
    /// was none. Both commands only write a missing key, so a retry is safe.
    pub(super) async fn lease_key(
        &self,
        prefix: &str,
        fresh: &str,
        deadline: Deadline,
    ) -> Result<String> {
        let key = crate::keys::lease_key(prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&key).arg(fresh).arg("NX").ignore();
        pipe.cmd("GET").arg(&key);
        let (stored,): (Option<String>,) = self.query_pipe(&pipe, deadline).await?;
        match stored {
            Some(k) if k.len() >= 32 => Ok(k),
            _ => Err(StoreError::Unavailable(format!(
                "the key of lease secrets at {key} is missing or shorter than 32 bytes"
            ))),
        }
    }

    /// Removes a stopping worker pool's record.
    pub(super) async fn retire_worker(
        &self,
        prefix: &str,
        id: &str,
        deadline: Deadline,
    ) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(crate::keys::worker_record(prefix, id))
            .ignore();
        if self.is_cluster() {
            // two slots (see announce_worker)
            self.query_pipe::<()>(&pipe, deadline).await?;
            pipe = redis::pipe();
        }
        pipe.cmd("ZREM")
            .arg(crate::keys::workers_index(prefix))
            .arg(id)
            .ignore();
        self.query_pipe::<()>(&pipe, deadline).await
    }

    /// The worker pools whose records have not expired.
    pub(super) async fn list_workers(
        &self,
        prefix: &str,
        deadline: Deadline,
    ) -> Result<Vec<WorkerRecord>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(crate::keys::workers_index(prefix)).arg(0).arg(999);
        let ids: Vec<String> = self.query(&cmd, deadline).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for id in &ids {
            mget.arg(crate::keys::worker_record(prefix, id));
        }
        let records: Vec<Option<String>> = self.query(&mget, deadline).await?;
        Ok(records
            .into_iter()
            .flatten()
            .filter_map(|r| serde_json::from_str(&r).ok())
            .collect())
    }

    /// Which of `keys` are claimed idempotency keys: one pipelined round
    /// trip of `PTTL` (a read, safe to retry). A claim is live while more
    /// of its TTL is left than the clock's offset (see `idem_claim.lua`).
    pub(super) async fn idempotency_claimed(
        &self,
        prefix: &str,
        keys: &[String],
        clock_offset: i64,
        deadline: Deadline,
    ) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let left: Vec<i64> = if self.is_cluster() {
            // each claim in its own slot: one PTTL each, all at once
            let reads = keys.iter().map(|key| {
                let mut cmd = redis::cmd("PTTL");
                cmd.arg(crate::keys::idempotency(prefix, key));
                async move { self.query::<i64>(&cmd, deadline).await }
            });
            futures::future::try_join_all(reads).await?
        } else {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("PTTL").arg(crate::keys::idempotency(prefix, key));
            }
            self.query_pipe(&pipe, deadline).await?
        };
        Ok(left
            .into_iter()
            .map(|ms| ms == -1 || ms > clock_offset)
            .collect())
    }
}
