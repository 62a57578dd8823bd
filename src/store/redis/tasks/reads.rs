//! Reading tasks on Redis: listing the active ones, paging history, a
//! queue's figures, one task, and the PENDING tasks the dependency sweep
//! repairs. Reads retry freely (see [`RedisStore::run`]).

use std::collections::HashMap;
use std::time::Duration;

use crate::domain::task::{Task, TaskId};
use crate::domain::{Counts, Pause, QueueStats};
use crate::keys::QueueKeys;
use crate::store::redis::RedisStore;
use crate::store::redis::script::ClockArg;
use crate::store::task_fields;
use crate::store::tasks::BAND_WIDTH;
use crate::store::{Deadline, Result, StoreError};

impl RedisStore {
    /// Up to `count` PENDING tasks of the queue with the dependencies each
    /// still waits on.
    pub(super) async fn pending_tasks(
        &self,
        keys: &QueueKeys,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, Vec<String>)>> {
        let mut cmd = redis::cmd("ZRANGE");
        cmd.arg(keys.pending()).arg(0).arg(count.max(1) - 1);
        let ids: Vec<String> = self.query(&cmd, deadline).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("SMEMBERS")
                .arg(format!("{}{id}:deps", keys.task_prefix()));
        }
        let deps: Vec<Vec<String>> = self.query_pipe(&pipe, deadline).await?;
        Ok(ids.into_iter().zip(deps).collect())
    }

    /// Up to `count` active tasks of the queue from position `offset` of set
    /// `set` (0 running, 1 queued, 2 scheduled, 3 pending), and where the next call
    /// should start (`None`: the queue is done).
    pub(super) async fn list_active(
        &self,
        keys: &QueueKeys,
        mut set: usize,
        mut offset: u64,
        count: usize,
        deadline: Deadline,
    ) -> Result<(Vec<Task>, Option<(usize, u64)>)> {
        let sets = [
            keys.leases(),
            keys.ready(),
            keys.scheduled(),
            keys.pending(),
        ];
        let mut tasks = Vec::new();
        while set < sets.len() && tasks.len() < count {
            let want = (count - tasks.len()) as u64;
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&sets[set])
                .arg(offset)
                .arg(offset.saturating_add(want - 1));
            let ids: Vec<String> = self.query(&cmd, deadline).await?;
            let got = ids.len() as u64;
            let mut pipe = redis::pipe();
            let mut parsed = Vec::new();
            for id in ids {
                if let Ok(id) = TaskId::parse(&id) {
                    pipe.cmd("HGETALL").arg(keys.task(&id));
                    parsed.push(id);
                }
            }
            if !parsed.is_empty() {
                let hashes: Vec<HashMap<String, String>> = self.query_pipe(&pipe, deadline).await?;
                tasks.extend(
                    hashes
                        .into_iter()
                        .filter(|h| !h.is_empty())
                        .filter_map(|h| task_fields::from_fields(&h, Vec::new()).ok()),
                );
            }
            if got < want {
                set += 1;
                offset = 0;
            } else {
                offset += got;
            }
        }
        Ok((tasks, (set < sets.len()).then_some((set, offset))))
    }

    /// Up to `count` history entries ending at or before `max_ms` (newest
    /// first, ties by id descending, skipping ids at `max_ms` that are not
    /// below `below_id`) and at or after `min_ms`: `(id, end ms, summary)`.
    pub(super) async fn history_page(
        &self,
        keys: &QueueKeys,
        max_ms: i64,
        below_id: Option<&str>,
        min_ms: i64,
        count: usize,
        deadline: Deadline,
    ) -> Result<Vec<(String, i64, String)>> {
        // All entries ending exactly at max_ms (ties, e.g. one sweep's
        // recoveries) are read in full and those not yet shown kept; then the
        // older ones, up to `count`. A limit on the ties could hide some.
        let mut pipe = redis::pipe();
        pipe.cmd("ZREVRANGEBYSCORE")
            .arg(keys.history())
            .arg(max_ms)
            .arg(max_ms)
            .arg("WITHSCORES");
        pipe.cmd("ZREVRANGEBYSCORE")
            .arg(keys.history())
            .arg(format!("({max_ms}"))
            .arg(min_ms)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(count);
        type Scored = Vec<(String, f64)>;
        let (ties, older): (Scored, Scored) = self.query_pipe(&pipe, deadline).await?;
        let mut entries: Vec<(String, i64)> = ties
            .into_iter()
            .filter(|(id, _)| below_id.is_none_or(|b| id.as_str() < b))
            .chain(older)
            .map(|(id, score)| (id, score as i64))
            .filter(|(_, ms)| *ms >= min_ms)
            .collect();
        entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        entries.truncate(count);
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(keys.history_data());
        for (id, _) in &entries {
            hmget.arg(id);
        }
        let summaries: Vec<Option<String>> = self.query(&hmget, deadline).await?;
        Ok(entries
            .into_iter()
            .zip(summaries)
            .filter_map(|((id, ms), summary)| Some((id, ms, summary?)))
            .collect())
    }

    /// The queue's depths, oldest wait and outcome counters.
    pub(super) async fn queue_stats(
        &self,
        keys: &QueueKeys,
        clock: ClockArg,
        deadline: Deadline,
    ) -> Result<QueueStats> {
        let band = BAND_WIDTH;
        let mut pipe = redis::pipe();
        pipe.cmd("ZCARD").arg(keys.ready());
        pipe.cmd("ZCARD").arg(keys.scheduled());
        pipe.cmd("ZCARD").arg(keys.leases());
        pipe.cmd("ZCARD").arg(keys.dead());
        pipe.cmd("ZCARD").arg(keys.pending());
        pipe.cmd("HGETALL").arg(keys.stats());
        pipe.cmd("TIME");
        pipe.cmd("HGETALL").arg(keys.paused());
        // the oldest ready task of each priority band
        for b in 0..4u64 {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(keys.ready())
                .arg(b * band)
                .arg(format!("({}", (b + 1) * band))
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(1);
        }
        type Oldest = Vec<(String, f64)>;
        #[allow(clippy::type_complexity)]
        let (ready, scheduled, running, dead, pending, counts, time, paused, b0, b1, b2, b3): (
            u64,
            u64,
            u64,
            u64,
            u64,
            HashMap<String, u64>,
            (String, String),
            HashMap<String, String>,
            Oldest,
            Oldest,
            Oldest,
            Oldest,
        ) = self.query_pipe(&pipe, deadline).await?;
        // Redis's clock, shifted as the scripts' `now` is
        let now_ms = clock.now_ms(
            time.0.parse::<i64>().unwrap_or(0) * 1000 + time.1.parse::<i64>().unwrap_or(0) / 1000,
        );
        let oldest = [b0, b1, b2, b3]
            .into_iter()
            .enumerate()
            .filter_map(|(b, entries)| {
                entries
                    .first()
                    .map(|(_, score)| *score as i64 - (b as i64) * band as i64)
            })
            .min();
        Ok(QueueStats {
            ready,
            scheduled,
            running,
            dead,
            pending,
            oldest_wait: oldest
                .map(|queued| Duration::from_millis((now_ms - queued).max(0) as u64)),
            counts: Counts::from_stored(counts),
            paused: Pause::from_stored(paused),
        })
    }

    /// Pauses (`Some`) or resumes (`None`) the queue of `keys` (see
    /// [`crate::store::tasks::TaskBackend::set_pause`]): the pause in force
    /// after, in one atomic round trip.
    pub(super) async fn set_pause(
        &self,
        keys: &QueueKeys,
        pause: Option<&Pause>,
        deadline: Deadline,
    ) -> Result<Option<Pause>> {
        let key = keys.paused();
        let mut pipe = redis::pipe();
        pipe.atomic();
        match pause {
            // field by field, only where absent: a second pause changes
            // nothing (the three fields are always written together)
            Some(p) => {
                for (field, value) in p.to_stored() {
                    pipe.cmd("HSETNX").arg(&key).arg(field).arg(value).ignore();
                }
            }
            None => {
                pipe.cmd("DEL").arg(&key).ignore();
            }
        }
        pipe.cmd("HGETALL").arg(&key);
        let (fields,): (HashMap<String, String>,) = self.query_pipe(&pipe, deadline).await?;
        Ok(Pause::from_stored(fields))
    }

    /// Reads a task and its attempt log; `None` once it has expired.
    pub(super) async fn get_task(
        &self,
        keys: &QueueKeys,
        id: &TaskId,
        deadline: Deadline,
    ) -> Result<Option<Task>> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(keys.task(id))
            .cmd("LRANGE")
            .arg(keys.task_log(id))
            .arg(0)
            .arg(-1);
        let (fields, log): (HashMap<String, String>, Vec<String>) =
            self.query_pipe(&pipe, deadline).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        task_fields::from_fields(&fields, log)
            .map(Some)
            .map_err(StoreError::Backend)
    }
}
