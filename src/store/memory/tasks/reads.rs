//! Reading the embedded store (listing, history pages, a queue's figures,
//! one task) and what it keeps besides tasks: idempotency claims and worker
//! pools' records, each with its expiry on the store's clock.

use std::time::Duration;

use super::MAX_TASKS;
use super::state::{BAND, Tasks, millis};
use crate::domain::QueueStats;
use crate::domain::task::{QueueName, Task, TaskId};
use crate::store::tasks::WorkerRecord;

impl Tasks {
    /// Claims idempotency key `key` with `value` for `ttl`: `None` when
    /// claimed now, else the claim that holds it.
    pub(super) fn claim_idempotency(
        &mut self,
        key: &str,
        value: &str,
        ttl: Duration,
        now: i64,
    ) -> Option<String> {
        if self.claims.len() >= MAX_TASKS {
            self.claims.retain(|_, (_, until)| *until > now);
        }
        match self.claims.get(key) {
            Some((held, until)) if *until > now => Some(held.clone()),
            _ => {
                self.claims.insert(
                    key.to_owned(),
                    (value.to_owned(), now.saturating_add(millis(ttl))),
                );
                None
            }
        }
    }
    /// Which of `keys` are claimed idempotency keys.
    pub(super) fn idempotency_claimed(&self, keys: &[String], now: i64) -> Vec<bool> {
        keys.iter()
            .map(|k| self.claims.get(k).is_some_and(|(_, until)| *until > now))
            .collect()
    }
    /// Replaces claim `old` of `key` with `new` (empty: deletes it) if it
    /// still holds `old`.
    pub(super) fn swap_idempotency(
        &mut self,
        key: &str,
        old: &str,
        new: &str,
        ttl: Duration,
        now: i64,
    ) -> bool {
        match self.claims.get(key) {
            Some((held, until)) if *until > now && held == old => {}
            _ => return false,
        }
        if new.is_empty() {
            self.claims.remove(key);
        } else {
            self.claims.insert(
                key.to_owned(),
                (new.to_owned(), now.saturating_add(millis(ttl))),
            );
        }
        true
    }
    /// Records a worker pool as alive for `ttl`.
    pub(super) fn announce_worker(&mut self, record: &WorkerRecord, ttl: Duration, now: i64) {
        self.workers.retain(|_, (_, until)| *until > now);
        self.workers.insert(
            record.id.clone(),
            (record.clone(), now.saturating_add(millis(ttl))),
        );
    }
    /// Removes a stopping worker pool's record.
    pub(super) fn retire_worker(&mut self, id: &str) {
        self.workers.remove(id);
    }
    /// The worker pools whose records have not expired, oldest report first.
    pub(super) fn list_workers(&self, now: i64) -> Vec<WorkerRecord> {
        let mut live: Vec<WorkerRecord> = self
            .workers
            .values()
            .filter(|(_, until)| *until > now)
            .map(|(r, _)| r.clone())
            .collect();
        live.sort_by(|a, b| a.seen_ms.cmp(&b.seen_ms).then_with(|| a.id.cmp(&b.id)));
        live
    }
    /// Counts of what the store holds.
    pub(super) fn usage(&self) -> serde_json::Value {
        let events: usize = self.queues.values().map(|q| q.events.len()).sum();
        let history: u64 = self.queues.values().map(|q| q.history.len()).sum();
        serde_json::json!({
            "kind": "embedded",
            "tasks": self.tasks.len(),
            "max_tasks": MAX_TASKS,
            "history_entries": history,
            "events": events,
        })
    }
    /// Reads a task and its attempt log; `None` once it has expired.
    pub(super) fn get(&self, id: &TaskId, now: i64) -> Option<Task> {
        self.tasks
            .get(id.as_str())
            .filter(|e| e.live(now))
            .map(|e| e.task.clone())
    }
    /// Up to `count` of `queue`'s dead-lettered ids, oldest first.
    pub(super) fn dead_letters(&self, queue: &QueueName, count: usize) -> Vec<String> {
        self.queues
            .get(queue)
            .map(|q| q.dead.by_rank(0, count))
            .unwrap_or_default()
    }
    /// Up to `count` active tasks of `queue` from position `offset` of set
    /// `set` (0 running, 1 queued, 2 scheduled), and where to go on.
    pub(super) fn list_active(
        &self,
        queue: &QueueName,
        mut set: usize,
        mut offset: u64,
        count: usize,
    ) -> (Vec<Task>, Option<(usize, u64)>) {
        let Some(q) = self.queues.get(queue) else {
            return (Vec::new(), None);
        };
        let sets = [&q.leases, &q.ready, &q.scheduled, &q.pending];
        let mut tasks = Vec::new();
        while set < sets.len() && tasks.len() < count {
            let want = count - tasks.len();
            let ids = sets[set].by_rank(offset, want);
            let got = ids.len();
            tasks.extend(
                ids.iter()
                    .filter_map(|id| self.tasks.get(id))
                    .map(|e| e.task.clone()),
            );
            if got < want {
                set += 1;
                offset = 0;
            } else {
                offset += got as u64;
            }
        }
        (tasks, (set < sets.len()).then_some((set, offset)))
    }
    /// History entries of `queue`, as [`super::super::tasks::TaskStore::history_page`].
    pub(super) fn history_page(
        &self,
        queue: &QueueName,
        max_ms: i64,
        below_id: Option<&str>,
        min_ms: i64,
        count: usize,
    ) -> Vec<(String, i64, String)> {
        let Some(q) = self.queues.get(queue) else {
            return Vec::new();
        };
        // ties at max_ms not yet shown, then older entries
        let ties = q
            .history
            .rev_range(max_ms, max_ms.saturating_add(1))
            .filter(|(_, id)| below_id.is_none_or(|b| *id < b));
        let older = q.history.rev_range(min_ms, max_ms).take(count);
        let mut entries: Vec<(i64, &str)> =
            ties.chain(older).filter(|(ms, _)| *ms >= min_ms).collect();
        entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(a.1)));
        entries.truncate(count);
        entries
            .into_iter()
            .filter_map(|(ms, id)| {
                let summary = q.history_data.get(id)?;
                Some((id.to_owned(), ms, summary.clone()))
            })
            .collect()
    }
    /// `queue`'s depths, oldest wait and outcome counters.
    pub(super) fn queue_stats(&self, queue: &QueueName, now: i64) -> QueueStats {
        let Some(q) = self.queues.get(queue) else {
            return QueueStats::default();
        };
        let oldest = (0..4i64)
            .filter_map(|b| {
                q.ready
                    .first_from(b * BAND)
                    .filter(|score| *score < (b + 1) * BAND)
                    .map(|score| score - b * BAND)
            })
            .min();
        QueueStats {
            ready: q.ready.len(),
            scheduled: q.scheduled.len(),
            running: q.leases.len(),
            dead: q.dead.len(),
            pending: q.pending.len(),
            oldest_wait: oldest.map(|queued| Duration::from_millis((now - queued).max(0) as u64)),
            counts: q.counts,
            paused: q.paused.clone(),
        }
    }
}
