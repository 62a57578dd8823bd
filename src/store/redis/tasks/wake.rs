//! Waking idle koo processes on a submit made elsewhere.
//!
//! A submit wakes this process's idle workers in memory; a process whose
//! workers wait idle while another process submits would otherwise find
//! the task at its next poll (`KOO_WORKER_POLL_INTERVAL`). So an idle
//! process *arms* each queue its idle workers serve (only those: a wake
//! of a queue nobody here would lease must go to a process that would):
//! it sets the queue's `idle` flag (a TTL of [`FLAG_TTL`]) and blocks on
//! the queue's `wake` list (`BLPOP`) in the same pipeline, on a
//! connection of its own. The scripts that make a task ready outside a
//! lease (a submit due now, a hand-back, a retry, a dependency's release,
//! a sweep that made tasks due) delete the flag and, when there was one,
//! push a wake (`wake_idle` in `lib.lua`): one `DEL` per submit while no process
//! waits, which is every submit under load.
//!
//! One wake per flag: of several idle processes one is woken (Redis serves
//! the longest-blocked `BLPOP` first), as BullMQ's marker wakes one
//! worker; it re-arms at once, and its workers, finding a backlog, wake
//! their peers. A wake nobody takes expires (10 s); a flag left by a
//! process that died expires within [`FLAG_TTL`]. A stale wake costs one
//! look that finds nothing, never a task.
//!
//! On one Redis a process arms all its queues on one connection (`BLPOP`
//! takes several lists); on a Cluster a blocking command reaches one slot,
//! so each queue has a Cluster connection of its own (to the masters it
//! reaches).

use std::time::Duration;

use redis::Value;

use super::RedisTasks;
use super::events::blocking_conn;
use crate::domain::task::QueueName;
use crate::store::redis::RedisStore;
use crate::store::redis::conn::Conn;
use crate::store::{Result, StoreError};

/// How long an armed flag outlives the `BLPOP` it announces, at most: a
/// process that died stops being woken within this after its block.
const FLAG_TTL: Duration = Duration::from_secs(2);

/// Arms some queues and waits for a wake (see the module doc).
pub struct SubmitWatch {
    store: RedisStore,
    conn: Option<Conn>,
    queues: Vec<QueueName>,
    idle: Vec<String>,
    wake: Vec<String>,
}

impl SubmitWatch {
    /// The queues it arms.
    pub fn queues(&self) -> &[QueueName] {
        &self.queues
    }

    /// Arms those of its queues that `idle` accepts (some must be) and
    /// waits up to `block` (at most a second is sent to Redis at a time)
    /// for a wake: the queue woken, or `None` when the block ran out.
    pub async fn next(
        &mut self,
        block: Duration,
        idle: impl Fn(&QueueName) -> bool,
    ) -> Result<Option<QueueName>> {
        let block = block.clamp(Duration::from_millis(10), Duration::from_secs(1));
        let armed: Vec<usize> = (0..self.queues.len())
            .filter(|&i| idle(&self.queues[i]))
            .collect();
        if armed.is_empty() {
            return Ok(None);
        }
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self
                .conn
                .insert(blocking_conn(&self.store, block, "a wake").await?),
        };
        let ttl = u64::try_from((block + FLAG_TTL).as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        let mut blpop = redis::cmd("BLPOP");
        for &i in &armed {
            let flag = &self.idle[i];
            pipe.cmd("SET").arg(flag).arg(1).arg("PX").arg(ttl).ignore();
            blpop.arg(&self.wake[i]);
        }
        blpop.arg(format!("{:.3}", block.as_secs_f64()));
        pipe.add_command(blpop);
        let reply: redis::RedisResult<(Value,)> = pipe.query_async(conn).await;
        let popped = match reply {
            Ok((v,)) => v,
            Err(e) => {
                // reconnect on the next call
                self.conn = None;
                return Err(StoreError::Unavailable(format!("wake read failed: {e}")));
            }
        };
        let key: Option<(String, String)> = match popped {
            Value::Nil => None,
            v => redis::from_redis_value(v)
                .map_err(|e| StoreError::Backend(format!("a wake's reply: {e}")))?,
        };
        Ok(key.and_then(|(key, _)| {
            let at = self.wake.iter().position(|w| *w == key)?;
            self.queues.get(at).cloned()
        }))
    }
}

impl RedisTasks {
    /// The watches that arm `queues`: one for all of them on one Redis,
    /// one per queue on a Cluster.
    pub fn submit_watches(&self, queues: &[QueueName]) -> Vec<SubmitWatch> {
        let watch = |queues: &[QueueName]| SubmitWatch {
            store: self.store.clone(),
            conn: None,
            queues: queues.to_vec(),
            idle: queues.iter().map(|q| self.keys(q).idle()).collect(),
            wake: queues.iter().map(|q| self.keys(q).wake()).collect(),
        };
        if queues.is_empty() {
            return Vec::new();
        }
        if self.store.is_cluster() {
            queues.chunks(1).map(watch).collect()
        } else {
            vec![watch(queues)]
        }
    }
}
