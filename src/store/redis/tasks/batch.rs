//! Batched ends of attempts (`finish_batch.lua`): several finishes of one
//! queue and the leases that follow them in one script call, and the
//! reading of its reply item by item.

use std::collections::VecDeque;
use std::time::Duration;

use super::RedisTasks;
use super::args::{Reserving, finish_args, lease_args, leased};
use super::flow_cluster::Need;
use crate::domain::task::QueueName;
use crate::store::tasks::{BatchEnd, FinishItem, LeaseAsk, Leased, TaskLimits};
use crate::store::{Deadline, Result, StoreError};

/// How one item's finish came back, before its reply is read.
enum Raw {
    /// Accepted: finish.lua's reply.
    Ended(Vec<String>),
    /// Fenced.
    Fenced,
    /// This item's finish raised an error (it wrote nothing).
    Failed(String),
}

impl Raw {
    fn of(value: redis::Value) -> Self {
        match redis::FromRedisValue::from_redis_value(value) {
            Ok(None) => Self::Fenced,
            Ok(Some(texts)) => {
                let texts: Vec<String> = texts;
                match texts.first().map(String::as_str) {
                    Some("!") => Self::Failed(texts.get(1).cloned().unwrap_or_default()),
                    _ => Self::Ended(texts),
                }
            }
            Err(e) => Self::Failed(format!("an unreadable reply: {e}")),
        }
    }
}

/// An item's finish reply's state when it carries a running-set entry (a
/// Cluster: see `flow_cluster.rs`).
fn left_state(reply: &redis::Value) -> Option<String> {
    let redis::Value::Array(parts) = reply else {
        return None;
    };
    match parts.first() {
        Some(redis::Value::BulkString(state)) if state.contains(&b'@') => {
            Some(String::from_utf8_lossy(state).into_owned())
        }
        _ => None,
    }
}

impl RedisTasks {
    /// [`crate::store::tasks::TaskBackend::finish_batch`] on Redis: one
    /// call of `finish_batch.lua`.
    pub(super) async fn batch(
        &self,
        queue: &QueueName,
        items: &[FinishItem<'_>],
        (lease, names): (Duration, &[&str]),
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Vec<BatchEnd>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys(queue);
        let mut call = self
            .scripts()
            .finish_batch
            .call_batch(self.clock(), items.len());
        for item in items {
            call.part_keys(&keys, Some(item.id));
            finish_args(
                &mut call,
                item.id,
                item.token,
                item.outcome,
                item.log,
                limits,
            );
            call.arg("next", item.next.unwrap_or(""));
        }
        call.part_keys(&keys, None);
        // the worker of each lease comes with its item; this one is unused
        let ask = LeaseAsk {
            worker: "",
            lease,
            names,
        };
        let cluster = self.store.is_cluster();
        let denied = if cluster {
            self.in_flight.all_lines()
        } else {
            String::new()
        };
        lease_args(
            &mut call,
            (&self.flow_base, queue),
            &keys,
            (&ask, Reserving::chained(cluster, &denied)),
            limits,
        );
        let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
        let (ended, leases): (Vec<redis::Value>, Vec<redis::Value>) =
            self.store.invoke_once(call.done(), deadline).await?;
        let left: Vec<String> = ended.iter().filter_map(left_state).collect();
        let left: Vec<&str> = left.iter().map(String::as_str).collect();
        self.remove_entries(&left, deadline).await;
        if ended.len() != items.len() {
            return Err(StoreError::Backend(format!(
                "finish_batch: {} replies for {} items",
                ended.len(),
                items.len()
            )));
        }
        let mut leases: VecDeque<redis::Value> = leases.into();
        let need = leases.back().and_then(Need::of);
        if need.is_some() {
            leases.pop_back();
        }
        let mut out = self.read_batch(queue, items, ended, leases, sent_ms);
        if let Some(need) = need {
            self.reserve_for_the_rest(queue, items, &mut out, (need, &ask), limits, deadline)
                .await;
        }
        Ok(out)
    }

    /// On a Cluster, the batch's leases stopped at a candidate that needs a
    /// reservation (`flow_cluster.rs`): each worker left (an accepted item
    /// that asked and got nothing) leases reserving, all at once (the
    /// first from that candidate; the others pass over what the first is
    /// reserving).
    async fn reserve_for_the_rest(
        &self,
        queue: &QueueName,
        items: &[FinishItem<'_>],
        out: &mut [BatchEnd],
        (need, ask): (Need, &LeaseAsk<'_>),
        limits: TaskLimits,
        deadline: Deadline,
    ) {
        let left: Vec<(usize, LeaseAsk<'_>)> = items
            .iter()
            .zip(out.iter())
            .enumerate()
            .filter(|(_, (_, end))| matches!(end.next, Some(Leased::Empty)))
            .filter_map(|(i, (item, _))| {
                Some((
                    i,
                    LeaseAsk {
                        worker: item.next?,
                        ..*ask
                    },
                ))
            })
            .collect();
        let mut first = Some(need);
        let leases = left
            .iter()
            .map(|(_, ask)| self.lease_reserving(queue, ask, limits, first.take(), deadline));
        let leased = futures::future::join_all(leases).await;
        for ((i, _), leased) in left.iter().zip(leased) {
            out[*i].next = Some(leased.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "a lease after a batch failed");
                Leased::Empty
            }));
        }
    }

    /// Each item's answer from the script's reply: its finish, and, for an
    /// accepted item that asked, the next of `leases` (the script leased
    /// for those, in order, until the queue ran dry).
    fn read_batch(
        &self,
        queue: &QueueName,
        items: &[FinishItem<'_>],
        ended: Vec<redis::Value>,
        mut leases: VecDeque<redis::Value>,
        sent_ms: i64,
    ) -> Vec<BatchEnd> {
        // what the leases after one that found no task find
        let mut dry: Option<Leased> = None;
        let mut out = Vec::with_capacity(items.len());
        for (item, reply) in items.iter().zip(ended) {
            let raw = Raw::of(reply);
            let next = match (&raw, item.next) {
                (Raw::Ended(_), Some(_)) => Some(match (&dry, leases.pop_front()) {
                    (Some(d), _) => d.dry().unwrap_or(Leased::Empty),
                    (None, Some(v)) => match leased(v, sent_ms) {
                        Ok(l) => {
                            dry = l.dry();
                            l
                        }
                        Err(e) => {
                            // its lease lapses and it runs again
                            tracing::warn!(error = %e, "a task leased in a batch cannot be read");
                            Leased::Empty
                        }
                    },
                    (None, None) => Leased::Empty,
                }),
                _ => None,
            };
            let ended = match raw {
                Raw::Ended(r) => Ok(self.ended(queue, &r)),
                Raw::Fenced => Ok(None),
                Raw::Failed(e) => Err(StoreError::Backend(format!("finish: {e}"))),
            };
            out.push(BatchEnd { ended, next });
        }
        out
    }
}
