//! The end of an attempt on Redis: finish, finish-then-lease and release
//! (`finish.lua`, `finish_lease.lua`, `release.lua`). On a Redis Cluster an
//! end leaves the task's running-set entry (flow control's slot is out of
//! the script's reach) and names it in its reply; it is removed here, in
//! one more round trip, or in the round trip of the reservation a chained
//! lease goes on with (`flow_cluster.rs`).

use super::args::{Reserving, finish_args, lease_args, leased};
use super::{RedisTasks, flow_cluster};
use crate::domain::Outcome;
use crate::domain::task::{State, TaskId};
use crate::store::tasks::{LeaseAsk, Leased, TaskLimits};
use crate::store::{Deadline, Result};

impl RedisTasks {
    /// [`crate::store::tasks::TaskBackend::finish`] on Redis.
    pub(super) async fn finish_attempt(
        &self,
        id: &TaskId,
        token: u32,
        (outcome, log): (&Outcome, &str),
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<(State, bool)>> {
        let queue = id.queue();
        let mut call = self.scripts().finish.call(self.clock());
        call.queue_keys(&self.keys(&queue), Some(id));
        finish_args(&mut call, id, token, outcome, log, limits);
        let reply: Option<Vec<String>> = self.store.invoke_once(call.done(), deadline).await?;
        let reply = reply.as_deref().unwrap_or_default();
        let state = reply.first().map_or("", String::as_str);
        self.remove_entries(&[state], deadline).await;
        Ok(self.ended(&queue, reply))
    }

    /// [`crate::store::tasks::TaskBackend::finish_and_lease`] on Redis:
    /// finish.lua and lease.lua composed into one script (see
    /// `finish_lease.lua`).
    pub(super) async fn finish_then_lease(
        &self,
        id: &TaskId,
        token: u32,
        (outcome, log): (&Outcome, &str),
        next: &LeaseAsk<'_>,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<Option<((State, bool), Leased)>> {
        let queue = id.queue();
        let keys = self.keys(&queue);
        let cluster = self.store.is_cluster();
        let denied = if cluster {
            self.in_flight.all_lines()
        } else {
            String::new()
        };
        let mut call = self.scripts().finish_lease.call(self.clock());
        call.queue_keys(&keys, Some(id));
        finish_args(&mut call, id, token, outcome, log, limits);
        lease_args(
            &mut call,
            (&self.flow_base, &queue),
            &keys,
            (next, Reserving::chained(cluster, &denied)),
            limits,
        );
        let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
        let (reply, fields): (Option<Vec<String>>, redis::Value) =
            self.store.invoke_once(call.done(), deadline).await?;
        let reply = reply.as_deref().unwrap_or_default();
        let state = reply.first().map_or("", String::as_str);
        // on a Cluster, a candidate that needs a reservation: the lease
        // goes on from it, and the reservation's round trip removes the
        // running-set entry this finish left (`flow_cluster.rs`)
        let need = flow_cluster::Need::of(&fields);
        if need.is_none() {
            self.remove_entries(&[state], deadline).await;
        }
        let Some(ended) = self.ended(&queue, reply) else {
            return Ok(None);
        };
        let next = match need {
            Some(mut need) => {
                need.left = Some(state.to_owned());
                self.lease_reserving(&queue, next, limits, Some(need), deadline)
                    .await?
            }
            None => leased(fields, sent_ms)?,
        };
        Ok(Some((ended, next)))
    }

    /// [`crate::store::tasks::TaskBackend::release`] on Redis.
    pub(super) async fn release_attempt(
        &self,
        id: &TaskId,
        token: u32,
        log: &str,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut call = self.scripts().release.call(self.clock());
        call.queue_keys(&self.keys(&id.queue()), Some(id))
            .arg("id", id.as_str())
            .arg("token", token)
            .arg("events_cap", limits.events)
            .arg("log", log);
        // 1, 0 (fenced), or the running-set entry it left (a Cluster)
        let reply: redis::Value = self.store.invoke_once(call.done(), deadline).await?;
        Ok(match reply {
            redis::Value::Int(ok) => ok == 1,
            redis::Value::BulkString(left) => {
                let left = String::from_utf8_lossy(&left);
                self.remove_entries(&[&left], deadline).await;
                true
            }
            _ => false,
        })
    }
}
