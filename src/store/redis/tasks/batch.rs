//! Batched ends of attempts (`finish_batch.lua`): several finishes of one
//! queue and the leases that follow them in one script call, and the
//! reading of its reply item by item.

use std::collections::VecDeque;
use std::time::Duration;

use super::RedisTasks;
use super::args::{finish_args, lease_args, leased};
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
        let lease_limits = self.lease_flow(limits);
        lease_args(
            &mut call,
            (&self.flow_base, queue),
            &keys,
            &ask,
            lease_limits,
        );
        let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
        let (ended, leases): (Vec<redis::Value>, Vec<redis::Value>) =
            self.store.invoke_once(call.done(), deadline).await?;
        if ended.len() != items.len() {
            return Err(StoreError::Backend(format!(
                "finish_batch: {} replies for {} items",
                ended.len(),
                items.len()
            )));
        }
        Ok(self.read_batch(queue, items, ended, leases.into(), sent_ms))
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
