//! Waking idle koo processes on a submit made elsewhere.
//!
//! A submit wakes this process's idle workers in memory; a process whose
//! workers wait idle while another process submits would otherwise find
//! the task at its next poll (`KOO_WORKER_POLL_INTERVAL`). So an idle
//! process *arms* each queue its idle workers serve (only those: a wake
//! of a queue nobody here would lease must go to a process that would),
//! and within it each task name they serve (only those, for the same
//! reason: a queue's tasks are often served by different processes, the
//! Python SDK's workers on one node, built-in slots on every node): it
//! sets the flags `idle:NAME` of those names (`idle:*` for workers that
//! serve any name) and the queue's `idle` to its own id (a TTL of
//! [`FLAG_TTL`] past the block), and blocks on its own wake list of the
//! queue, `wake:ID` (`BLPOP`), in the same pipeline, on a connection of
//! its own. The scripts that make a task ready outside a lease (a submit
//! due now, a hand-back, a retry, a dependency's release) look for the
//! flag of its name, else the `*` one, and when there is one delete it and
//! push the name to the list it names (`wake_idle` in `lib.lua`): two
//! `GET`s per submit while no process waits, which is every submit under
//! load. A sweep that made tasks due (of no one name) wakes through the
//! queue's own flag. A round re-sets only the flags that are due (the one
//! its last wake's script deleted, new ones, those set a block ago), so
//! that re-arming after a wake is a `SET` and a `BLPOP` of one list per
//! queue, whatever the names.
//!
//! One wake per flag: of several idle processes that serve a name, the
//! last to set its flag is woken, as BullMQ's marker wakes one worker; it re-arms at once, and its workers, finding a backlog, wake
//! their peers. A wake nobody takes expires (10 s); a flag left by a
//! process that died expires within [`FLAG_TTL`]. A stale wake costs one
//! look that finds nothing, never a task. A process that serves more than
//! [`MAX_NAMES`] names on a queue arms `*` for them (it may then be woken
//! for a name it does not serve: one look).
//!
//! On one Redis a process arms all its queues on one connection (`BLPOP`
//! takes several lists); on a Cluster a blocking command reaches one slot,
//! so each queue has a Cluster connection of its own (to the masters it
//! reaches).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use redis::Value;

use super::RedisTasks;
use super::events::blocking_conn;
use crate::domain::task::QueueName;
use crate::keys::QueueKeys;
use crate::store::redis::RedisStore;
use crate::store::redis::conn::Conn;
use crate::store::{Result, StoreError};

/// How long an armed flag outlives the `BLPOP` it announces, at most: a
/// process that died stops being woken within this after its block.
const FLAG_TTL: Duration = Duration::from_secs(2);

/// The most task names a process arms on one queue; past it, `*`.
pub const MAX_NAMES: usize = 32;

/// Arms some queues and waits for a wake (see the module doc).
pub struct SubmitWatch {
    store: RedisStore,
    conn: Option<Conn>,
    queues: Vec<QueueName>,
    keys: Vec<QueueKeys>,
    /// What its flags hold, naming its wake lists (random: one per watch).
    id: String,
    /// When each armed flag was last set: a round sets only those due (new
    /// ones, the one its last wake's script deleted, and those set a block
    /// or more ago), so that re-arming after a wake is one `SET`, not one
    /// per queue and name (a pool serving a dozen names on six queues arms
    /// some 80 flags).
    set_at: HashMap<String, Instant>,
}

/// A wake taken: its queue, and the task name it was pushed for (`None`
/// for a sweep's, of no one name; `*` for workers that serve any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Woken {
    /// The queue.
    pub queue: QueueName,
    /// The task name.
    pub name: Option<String>,
}

impl SubmitWatch {
    /// The queues it arms.
    pub fn queues(&self) -> &[QueueName] {
        &self.queues
    }

    /// Arms those of its queues for which `idle` names the task names
    /// served by idle workers (`*`: any; none: the queue is not armed) and
    /// waits up to `block` (at most a second is sent to Redis at a time)
    /// for a wake: the wake taken, or `None` when the block ran out.
    pub async fn next(
        &mut self,
        block: Duration,
        idle: impl Fn(&QueueName) -> Vec<String>,
    ) -> Result<Option<Woken>> {
        let block = block.clamp(Duration::from_millis(10), Duration::from_secs(1));
        let armed: Vec<(usize, Vec<String>)> = (0..self.queues.len())
            .map(|i| (i, armed_names(idle(&self.queues[i]))))
            .filter(|(_, names)| !names.is_empty())
            .collect();
        if armed.is_empty() {
            return Ok(None);
        }
        let (pipe, lists) = self.arming(&armed, block);
        let conn = match &mut self.conn {
            Some(c) => c,
            None => match blocking_conn(&self.store, block, "a wake").await {
                Ok(c) => self.conn.insert(c),
                Err(e) => {
                    // nothing was set: every flag is due again
                    self.set_at.clear();
                    return Err(e);
                }
            },
        };
        let reply: redis::RedisResult<(Value,)> = pipe.query_async(conn).await;
        let popped = match reply {
            Ok((v,)) => v,
            Err(e) => {
                // reconnect on the next call, and set every flag again (the
                // server may have restarted)
                self.conn = None;
                self.set_at.clear();
                return Err(StoreError::Unavailable(format!("wake read failed: {e}")));
            }
        };
        let key: Option<(String, String)> = match popped {
            Value::Nil => None,
            v => redis::from_redis_value(v)
                .map_err(|e| StoreError::Backend(format!("a wake's reply: {e}")))?,
        };
        Ok(key.and_then(|(key, pushed)| {
            let (_, at) = lists.into_iter().find(|(list, _)| *list == key)?;
            let (flag, name) = pushed_for(&self.keys[at], pushed);
            self.set_at.remove(&flag);
            Some(Woken {
                queue: self.queues.get(at)?.clone(),
                name,
            })
        }))
    }

    /// The pipeline of one round, and this watch's wake list of each armed
    /// queue (by index) in its `BLPOP`'s order: the `SET`s of the flags
    /// that are due (see `set_at`), then the `BLPOP`.
    fn arming(
        &mut self,
        armed: &[(usize, Vec<String>)],
        block: Duration,
    ) -> (redis::Pipeline, Vec<(String, usize)>) {
        let ttl = u64::try_from((block + FLAG_TTL).as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        let mut blpop = redis::cmd("BLPOP");
        let mut lists = Vec::with_capacity(armed.len());
        let now = Instant::now();
        let mut set_at = HashMap::with_capacity(self.set_at.len());
        for (i, names) in armed {
            let keys = &self.keys[*i];
            let names = std::iter::once(None).chain(names.iter().map(Some));
            for name in names {
                let flag = match name {
                    None => keys.idle(),
                    Some(n) => keys.idle_for(n),
                };
                let at = match self.set_at.get(&flag) {
                    Some(&at) if now.duration_since(at) < block => at,
                    _ => {
                        let set = pipe.cmd("SET").arg(&flag).arg(&self.id);
                        set.arg("PX").arg(ttl).ignore();
                        now
                    }
                };
                set_at.insert(flag, at);
            }
            let list = keys.wake_to(&self.id);
            blpop.arg(&list);
            lists.push((list, *i));
        }
        self.set_at = set_at;
        blpop.arg(format!("{:.3}", block.as_secs_f64()));
        pipe.add_command(blpop);
        (pipe, lists)
    }
}

/// What a popped wake says: the flag the script that pushed it deleted,
/// and the task's name (see `wake_idle` in lib.lua: `''` for the queue's
/// flag, a name for its own, `*` and a newline before the name for
/// `idle:*`).
fn pushed_for(keys: &QueueKeys, pushed: String) -> (String, Option<String>) {
    match pushed.strip_prefix("*\n") {
        Some(name) => (keys.idle_for("*"), Some(name.to_owned())),
        None if pushed.is_empty() => (keys.idle(), None),
        None => (keys.idle_for(&pushed), Some(pushed)),
    }
}

/// The names a queue is armed for, of those its idle workers serve
/// (sorted, each once): `*` alone when one serves any name or past
/// [`MAX_NAMES`].
fn armed_names(mut names: Vec<String>) -> Vec<String> {
    names.sort_unstable();
    names.dedup();
    if names.len() > MAX_NAMES || names.iter().any(|n| n == "*") {
        return vec!["*".to_owned()];
    }
    names
}

impl RedisTasks {
    /// The watches that arm `queues`: one for all of them on one Redis,
    /// one per queue on a Cluster.
    pub fn submit_watches(&self, queues: &[QueueName]) -> Vec<SubmitWatch> {
        let watch = |queues: &[QueueName]| SubmitWatch {
            store: self.store.clone(),
            conn: None,
            queues: queues.to_vec(),
            keys: queues.iter().map(|q| self.keys(q)).collect(),
            id: format!("{:016x}", rand::random::<u64>()),
            set_at: HashMap::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(of: &[&str]) -> Vec<String> {
        of.iter().map(|n| (*n).to_owned()).collect()
    }

    /// Each name once; `*` alone when a worker serves any name or past
    /// the most a queue arms; none for no idle worker.
    #[test]
    fn a_queue_is_armed_for_the_names_its_idle_workers_serve() {
        assert_eq!(armed_names(names(&["b", "a", "b"])), names(&["a", "b"]));
        assert_eq!(armed_names(names(&["a", "*"])), names(&["*"]));
        let many: Vec<String> = (0..=MAX_NAMES).map(|i| format!("n{i}")).collect();
        assert_eq!(armed_names(many), names(&["*"]));
        assert!(armed_names(Vec::new()).is_empty());
    }

    /// A popped wake names the flag its script deleted and the task's
    /// name, through `*` too.
    #[test]
    fn a_wake_names_its_flag_and_task() {
        let keys = QueueKeys::new("koo", &QueueName::parse("research").unwrap());
        let of = |s: &str| pushed_for(&keys, s.to_owned());
        assert_eq!(of(""), (keys.idle(), None));
        assert_eq!(of("a.b"), (keys.idle_for("a.b"), Some("a.b".to_owned())));
        assert_eq!(of("*\na.b"), (keys.idle_for("*"), Some("a.b".to_owned())));
    }
}
