//! Instance records: each koo instance publishes a record (its figures)
//! under its own key and lists itself in an index sorted set scored by the
//! time it published, so that figures can be summed across instances.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::RedisStore;
use super::kv::ttl_millis;
#[cfg(doc)]
use crate::store::CacheBackend;
use crate::store::{Deadline, KeyOf, Result, unix_millis};

impl RedisStore {
    /// Stores a record and indexes its member (see
    /// [`CacheBackend::publish_record`]).
    pub(super) async fn publish(
        &self,
        index: &str,
        key: &str,
        member: &str,
        payload: Bytes,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<()> {
        let ms = ttl_millis(ttl);
        let mut pipe = redis::pipe();
        let mut record = redis::cmd("SET");
        record.arg(key).arg(payload.as_ref()).arg("PX").arg(ms);
        // On a Cluster the record and the index are in different slots:
        // two calls (the record first, so that a listed member has one).
        if self.is_cluster() {
            self.query::<()>(&record, deadline).await?;
        } else {
            pipe.add_command(record).ignore();
        }
        pipe.cmd("ZADD")
            .arg(index)
            .arg(unix_millis(SystemTime::now()))
            .arg(member)
            .ignore();
        pipe.cmd("PEXPIRE").arg(index).arg(ms).ignore();
        // Members that stopped publishing leave the index here, so that it
        // stays bounded even if no one runs a cleanup; their records expire.
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(index)
            .arg("-inf")
            .arg(format!("({}", unix_millis(SystemTime::now()) - ms as i64))
            .ignore();
        self.query_pipe::<()>(&pipe, deadline).await
    }

    /// The records published since `since`.
    pub(super) async fn read_published(
        &self,
        index: &str,
        since: SystemTime,
        key_of: KeyOf<'_>,
        deadline: Deadline,
    ) -> Result<Vec<(String, Bytes)>> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(index).arg(unix_millis(since)).arg("+inf");
        let members: Vec<Vec<u8>> = self.query(&cmd, deadline).await?;
        let members: Vec<String> = members
            .into_iter()
            .filter_map(|m| String::from_utf8(m).ok())
            .collect();
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for m in &members {
            mget.arg(key_of(m));
        }
        let payloads: Vec<Option<Vec<u8>>> = self.query(&mget, deadline).await?;
        Ok(members
            .into_iter()
            .zip(payloads)
            .filter_map(|(m, p)| Some((m, Bytes::from(p?))))
            .collect())
    }

    /// Unlists members not published since `since`, and unlinks their records.
    pub(super) async fn remove_stale(
        &self,
        index: &str,
        since: SystemTime,
        key_of: KeyOf<'_>,
        deadline: Deadline,
    ) -> Result<u64> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(index)
            .arg("-inf")
            .arg(format!("({}", unix_millis(since)));
        let stale: Vec<Vec<u8>> = self.query(&cmd, deadline).await?;
        if stale.is_empty() {
            return Ok(0);
        }
        let records: Vec<String> = stale
            .iter()
            .filter_map(|m| std::str::from_utf8(m).ok().map(key_of))
            .collect();
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(index).arg(&stale);
        if self.is_cluster() {
            // records and index in different slots: one UNLINK (which the
            // Cluster client splits by slot), then the index
            if !records.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                unlink.arg(&records);
                self.query::<()>(&unlink, deadline).await?;
            }
            self.query::<()>(&zrem, deadline).await?;
        } else {
            let mut pipe = redis::pipe();
            for record in &records {
                pipe.cmd("UNLINK").arg(record).ignore();
            }
            pipe.add_command(zrem).ignore();
            self.query_pipe::<()>(&pipe, deadline).await?;
        }
        Ok(stale.len() as u64)
    }
}
