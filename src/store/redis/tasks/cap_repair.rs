//! The cap's repair on a Redis Cluster (see `flow_cluster.rs`): the end
//! scripts cannot reach a running set in flow control's slot, so an entry
//! whose process died before removing it, or whose lease lapsed, stays
//! until a reservation at the key's cap hands back the oldest entries and
//! the process drops those whose task no longer carries them; with
//! `cancel_oldest` and nothing stale, the oldest running task is asked to
//! cancel, as lease.lua does in place on one Redis.

use redis::Value;

use super::RedisTasks;
use super::flow_cluster::{STALE_AFTER_MS, left_entry, text};
use crate::domain::task::TaskId;
use crate::store::tasks::TaskLimits;
use crate::store::{Deadline, Result};

impl RedisTasks {
    /// Repairs what reserve.lua's `full` reply handed back (`reply`: the
    /// policy, the store's now, then entry, score pairs) for concurrency key
    /// `ckey`, met by candidate `newcomer`.
    pub(super) async fn repair_full(
        &self,
        reply: &[Value],
        (ckey, newcomer): (&str, &str),
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()> {
        let policy = reply.first().and_then(text).unwrap_or_default();
        let now_ms = reply.get(1).and_then(score).unwrap_or_default();
        let entries: Vec<(String, i64)> = reply
            .get(2..)
            .unwrap_or_default()
            .chunks_exact(2)
            .filter_map(|p| Some((text(&p[0])?, score(&p[1])?)))
            .collect();
        let at = (ckey, policy.as_str(), now_ms);
        self.repair(at, &entries, (newcomer, limits), deadline)
            .await
    }

    /// Repairs concurrency key `ckey`'s running set at its cap (`now_ms`
    /// on the store's clock, as the entries' scores): drops the `entries`
    /// whose task does not carry them (and that are old enough); with
    /// nothing to drop and `cancel_oldest`, asks the oldest running task to
    /// cancel unless one of them already was.
    async fn repair(
        &self,
        (ckey, policy, now_ms): (&str, &str, i64),
        entries: &[(String, i64)],
        (newcomer, limits): (&str, TaskLimits),
        deadline: Deadline,
    ) -> Result<()> {
        let set = format!("{}cc:{ckey}", self.flow_base);
        let reads = entries.iter().map(|(entry, _)| async move {
            let id = entry
                .split_once('#')
                .and_then(|(id, _)| TaskId::parse(id).ok())?;
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(self.keys(&id.queue()).task(&id))
                .arg("cc")
                .arg("cancel");
            let read = self
                .store
                .query::<(Option<String>, Option<String>)>(&cmd, deadline);
            Some((id, read.await))
        });
        let found = futures::future::join_all(reads).await;
        let (mut stale, mut oldest, mut asked) = (Vec::new(), None, false);
        for ((entry, score), read) in entries.iter().zip(found) {
            let Some((id, read)) = read else {
                stale.push(entry); // not an entry of this layout
                continue;
            };
            let (cc, cancel) = read?;
            if cc.as_deref().and_then(left_entry) == Some((set.as_str(), entry.as_str())) {
                asked |= cancel.is_some();
                oldest.get_or_insert(id);
            } else if now_ms - score > STALE_AFTER_MS {
                stale.push(entry);
            }
        }
        if !stale.is_empty() {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(&set).arg(stale);
            return self.store.query::<i64>(&cmd, deadline).await.map(drop);
        }
        if let (Some(oldest), "cancel_oldest", false) = (oldest, policy, asked)
            && self.still_queued(newcomer, deadline).await?
        {
            let reason = format!("concurrency cap of {ckey}: superseded by {newcomer}");
            self.ask_to_cancel(&oldest, &reason, limits, deadline)
                .await?;
        }
        Ok(())
    }

    /// Whether task `id` still waits: a newcomer that started or ended
    /// meanwhile (the reserve is not atomic with the lease, as it is on
    /// one Redis) supersedes nobody.
    async fn still_queued(&self, id: &str, deadline: Deadline) -> Result<bool> {
        let Ok(id) = TaskId::parse(id) else {
            return Ok(false);
        };
        let mut cmd = redis::cmd("HGET");
        cmd.arg(self.keys(&id.queue()).task(&id)).arg("state");
        let state: Option<String> = self.store.query(&cmd, deadline).await?;
        Ok(state.as_deref() == Some("queued"))
    }

    /// Asks running task `id` to cancel (cancel.lua, which leaves a task
    /// that no longer runs as it is).
    async fn ask_to_cancel(
        &self,
        id: &TaskId,
        reason: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<()> {
        let call = self.cancel_call(id, reason, limits, true);
        self.store
            .invoke_once::<String>(call.done(), deadline)
            .await
            .map(drop)
    }
}

/// A sorted-set score as `ZRANGE … WITHSCORES` gives it through a script
/// (a string, maybe with a fraction).
fn score(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse::<f64>().ok().map(|f| f as i64),
    }
}
