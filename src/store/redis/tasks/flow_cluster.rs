//! Flow control on a Redis Cluster: reserve, lease, give back.
//!
//! On one Redis the lease script checks a candidate's limits in place, in
//! the same atomic step that hands it out (`lease.lua`). On a Cluster flow
//! control's keys (limits, buckets, back-offs, running sets) live in a slot
//! of their own (`{fc}`: [`crate::keys::flow_base_cluster`]) that a queue's
//! script cannot reach, so a lease that meets a candidate needing them (one
//! with a rate-limit or concurrency key, or any candidate while a queue or
//! task-name limit exists) goes in steps, as `docs/design/flow-control.md`
//! ("Redis Cluster") designed:
//!
//! 1. the lease script stops at the candidate and names it (`need`);
//! 2. `reserve.lua`, in flow control's slot, runs the checks lease.lua runs
//!    on one Redis and, when they pass, takes the candidate's tokens and
//!    adds an entry for it to its key's running set; else it says which
//!    scope holds and until when, or that the cap's policy cancels it;
//! 3. the lease runs again naming the reservation (`grant`) and the scopes
//!    found held (`denied`): it hands out the first candidate that is
//!    reserved or needs nothing, skips those a held scope holds, and stops
//!    at the next one it knows nothing of (back to 2, at most [`ROUNDS`]
//!    times per lease).
//!
//! A reservation the lease did not use (the task was taken meanwhile, or a
//! new one came first) is given back (`give_back.lua`: the tokens' TATs move
//! back, the entry goes). A crash or a lost reply between the steps costs
//! at most one token (the bucket is a little stricter for one period) or
//! leaves an entry for a task that does not run, which the cap's repair
//! removes: never an over-admission, never a task.
//!
//! Running sets: each reservation's entry is unique (`<task id>#<random>`)
//! and the lease records it in the task's hash (`cc` = `@<set>\n<entry>`),
//! so that removing an entry can never remove a later attempt's. The end
//! scripts cannot reach the set: they return the entry and the process
//! that ended the attempt removes it right after ([`left_entry`]). An
//! entry whose process died first, or whose lease lapsed (the sweep's
//! recover drops `cc` and nothing more), is stale: at the cap the reserve
//! hands back the 100 oldest entries, the process drops those whose task
//! no longer carries them (older than [`STALE_AFTER_MS`], so that a
//! reservation on its way to its lease is not taken for one) and asks
//! again; with `cancel_oldest` and nothing stale, the oldest running task
//! is asked to cancel, as on one Redis.
//!
//! Within one process, leases that run at once pass over the candidates
//! the others are reserving ([`InFlight`]), and a candidate found held is
//! reserved first by the queue's next lease ([`Heads`]).

use redis::Value;

use super::RedisTasks;
use super::args::{Reserving, leased};
use crate::domain::task::{QueueName, TaskId};
use crate::store::redis::script::Key;
use crate::store::tasks::{LeaseAsk, Leased, TaskLimits};
use crate::store::{Deadline, Result, StoreError};

/// The most reservations one lease makes: a queue whose head holds more
/// keyed candidates than this, each held by a different key, waits for the
/// first of them to free (or the poll) before the tasks behind are seen.
const ROUNDS: usize = 16;

/// How old (ms) a running-set entry whose task does not carry it must be
/// before the cap's repair drops it: a reservation is made a round trip
/// before the lease that records it.
const STALE_AFTER_MS: i64 = 10_000;

/// A candidate the lease stopped at: it needs a reservation.
#[derive(Debug, Clone)]
pub(super) struct Need {
    id: String,
    name: String,
    rkey: Option<String>,
    ckey: Option<String>,
    /// The end-script state whose running-set entry the reservation
    /// removes in its round trip (a chained finish's: [`left_entry`]).
    pub(super) left: Option<String>,
}

impl Need {
    /// The lease's `{ 'need', id, name, rkey, ckey }`, if that is what it
    /// replied.
    pub(super) fn of(reply: &Value) -> Option<Self> {
        let Value::Array(items) = reply else {
            return None;
        };
        let [head, id, name, rkey, ckey] = items.as_slice() else {
            return None;
        };
        if text(head).as_deref() != Some("need") {
            return None;
        }
        let key = |v: &Value| text(v).filter(|k| !k.is_empty());
        Some(Self {
            id: text(id)?,
            name: text(name)?,
            rkey: key(rkey),
            ckey: key(ckey),
            left: None,
        })
    }
}

/// What a reservation granted a candidate.
enum Grant {
    /// Its tokens (bucket, interval in µs) and its running-set entry (set,
    /// entry) are taken: the lease may hand it out.
    Go {
        id: String,
        taken: Vec<(String, i64)>,
        entry: Option<(String, String)>,
    },
    /// At its key's cap, under `cancel_newest`: the lease ends it.
    Cancel { id: String },
}

impl Grant {
    fn id(&self) -> &str {
        match self {
            Self::Go { id, .. } | Self::Cancel { id } => id,
        }
    }

    /// lease.lua's `grant`.
    fn arg(&self) -> String {
        match self {
            Self::Go { id, entry, .. } => {
                let entry = entry.as_ref().map_or("", |(_, e)| e.as_str());
                format!("go\n{id}\n{entry}")
            }
            Self::Cancel { id } => format!("cancel\n{id}"),
        }
    }
}

/// The scopes found held in one lease, each with when it frees (on this
/// process's clock; `None` for a cap: a running task must end).
#[derive(Default)]
struct Denied(Vec<(String, Option<i64>)>);

impl Denied {
    fn add(&mut self, scope: String, until: Option<i64>) {
        if !self.0.iter().any(|(s, _)| *s == scope) {
            self.0.push((scope, until));
        }
    }

    /// lease.lua's `denied`: one scope per line (keys hold no control
    /// characters).
    fn arg(&self) -> String {
        let mut out = String::new();
        for (scope, _) in &self.0 {
            out.push_str(scope);
            out.push('\n');
        }
        out
    }

    /// What a lease that handed nothing out says: held until the first
    /// held bucket or back-off frees (the poll when only caps held).
    fn held(&self) -> Leased {
        Leased::Held(self.0.iter().filter_map(|(_, until)| *until).min())
    }
}

/// The candidate each queue's last lease found held (a Cluster): the next
/// lease of the queue reserves it before its first call, betting that it
/// still heads the queue (as it does while a limited key's backlog waits),
/// so that it takes its token when the lease is sent, not a round trip
/// later. A lost bet is given back.
#[derive(Default)]
pub(super) struct Heads(std::sync::Mutex<std::collections::HashMap<String, Need>>);

/// The candidates this process's leases are reserving (a Cluster): a
/// concurrent lease of the process passes over them (`id:<id>` in lease.lua's
/// `denied`) and reserves the next one instead of racing for the same.
#[derive(Default)]
pub(super) struct InFlight(std::sync::Mutex<std::collections::HashSet<String>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn has(&self, id: &str) -> bool {
        self.lock().contains(id)
    }

    /// lease.lua's `denied` lines for the candidates being reserved, but
    /// `own`.
    fn lines(&self, own: Option<&str>, out: &mut String) {
        for id in self.lock().iter().filter(|id| Some(id.as_str()) != own) {
            out.push_str("id:");
            out.push_str(id);
            out.push('\n');
        }
    }
}

/// A candidate registered in [`InFlight`] while a lease reserves it.
struct Mine<'a> {
    set: &'a InFlight,
    id: Option<String>,
}

impl Mine<'_> {
    fn hold(&mut self, id: &str) {
        self.release();
        self.set.lock().insert(id.to_owned());
        self.id = Some(id.to_owned());
    }

    fn release(&mut self) {
        if let Some(id) = self.id.take() {
            self.set.lock().remove(&id);
        }
    }
}

impl Drop for Mine<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl Heads {
    fn take(&self, queue: &QueueName) -> Option<Need> {
        let mut heads = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        heads.remove(queue.as_str())
    }

    fn put(&self, queue: &QueueName, need: &Need) {
        let mut heads = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        heads.insert(queue.as_str().to_owned(), need.clone());
    }
}

impl RedisTasks {
    /// A lease on a Cluster (see the module doc): as on one Redis, with the
    /// reservations its candidates need. `first`: a candidate already met
    /// (a chained lease's, or the last lease's of the queue, see [`Heads`]),
    /// reserved before the first call. A failed call keeps what it
    /// reserved (the lease may have used it: a token is spent, an unused
    /// entry is repaired).
    pub(super) async fn lease_reserving(
        &self,
        queue: &QueueName,
        ask: &LeaseAsk<'_>,
        limits: TaskLimits,
        first: Option<Need>,
        deadline: Deadline,
    ) -> Result<Leased> {
        let mut denied = Denied::default();
        let mut mine = Mine {
            set: &self.in_flight,
            id: None,
        };
        let mut grant = self
            .reserve_first(queue, first, limits, (&mut denied, &mut mine), deadline)
            .await?;
        for _ in 0..ROUNDS {
            let grant_arg = grant.as_ref().map_or_else(|| "-".to_owned(), Grant::arg);
            let mut denied_arg = denied.arg();
            self.in_flight.lines(mine.id.as_deref(), &mut denied_arg);
            let reserving = Reserving {
                cluster: true,
                grant: &grant_arg,
                denied: &denied_arg,
            };
            let call = self.lease_call_reserving(queue, ask, limits, reserving);
            let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
            let reply: Value = self.store.invoke_once(call.done(), deadline).await?;
            if let Some(need) = Need::of(&reply) {
                if let Some(g) = grant.take() {
                    self.give_back(g, deadline).await;
                }
                if self.in_flight.has(&need.id) && mine.id.as_deref() != Some(need.id.as_str()) {
                    // met by two leases of this process at once: the other
                    // reserves it, this one looks again passing over it
                    continue;
                }
                mine.hold(&need.id);
                grant = self
                    .reserve(queue, &need, limits, &mut denied, deadline)
                    .await?;
                if grant.is_none() {
                    // held: it will head the queue when its token frees
                    self.heads.put(queue, &need);
                }
                continue;
            }
            let leased = leased(reply, sent_ms)?;
            if let Some(g) = grant {
                match &leased {
                    Leased::Task(t) if t.id.as_str() == g.id() => {}
                    _ => self.give_back(g, deadline).await,
                }
            }
            return Ok(match leased {
                Leased::Held(_) => denied.held(),
                other => other,
            });
        }
        if let Some(g) = grant {
            self.give_back(g, deadline).await;
        }
        Ok(denied.held())
    }

    /// What a lease reserves before its first call: `first` (a chained
    /// lease's candidate), else the queue's bet ([`Heads`]), unless another
    /// lease of this process is reserving it.
    async fn reserve_first(
        &self,
        queue: &QueueName,
        first: Option<Need>,
        limits: TaskLimits,
        (denied, mine): (&mut Denied, &mut Mine<'_>),
        deadline: Deadline,
    ) -> Result<Option<Grant>> {
        if let Some(need) = first {
            if self.in_flight.has(&need.id) {
                // the lease passes over it; its finish's entry goes now
                let left = need.left.as_deref().unwrap_or_default();
                self.remove_entries(&[left], deadline).await;
                return Ok(None);
            }
            mine.hold(&need.id);
            return self.reserve(queue, &need, limits, denied, deadline).await;
        }
        let Some(bet) = self.heads.take(queue) else {
            return Ok(None);
        };
        if self.in_flight.has(&bet.id) {
            return Ok(None);
        }
        mine.hold(&bet.id);
        // what holds a bet is not taken for a fact: the candidate may have
        // moved on (and a held candidate must reach its own reserve, which
        // may ask a cap's oldest task to cancel)
        let mut scratch = Denied::default();
        self.reserve(queue, &bet, limits, &mut scratch, deadline)
            .await
    }

    /// Reserves what `need` needs (`reserve.lua`): a grant, or none with
    /// what held it added to `denied`. At the cap, the key's running set
    /// is repaired once and asked again.
    async fn reserve(
        &self,
        queue: &QueueName,
        need: &Need,
        limits: TaskLimits,
        denied: &mut Denied,
        deadline: Deadline,
    ) -> Result<Option<Grant>> {
        let entry = format!("{}#{:016x}", need.id, rand::random::<u64>());
        let mut repaired = false;
        let mut drop = need.left.as_deref().and_then(left_entry);
        loop {
            let call = self.reserve_call(
                (queue, need, limits),
                (&entry, repaired),
                drop.take().unwrap_or_default(),
            );
            let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
            let reply: Vec<Value> = self.store.invoke_once(call.done(), deadline).await?;
            let head = reply.first().and_then(text).unwrap_or_default();
            let rest = || {
                reply[1..]
                    .chunks_exact(2)
                    .map(|p| (text(&p[0]), int(&p[1])))
            };
            match head.as_str() {
                "go" => {
                    let taken = rest()
                        .filter_map(|(bucket, interval)| Some((bucket?, interval?)))
                        .collect();
                    let set = |k: &String| format!("{}cc:{k}", self.flow_base);
                    return Ok(Some(Grant::Go {
                        id: need.id.clone(),
                        taken,
                        entry: need.ckey.as_ref().map(|k| (set(k), entry.clone())),
                    }));
                }
                "held" => {
                    for (scope, wait) in rest() {
                        let until = wait.filter(|&w| w > 0).map(|w| sent_ms + w);
                        denied.add(scope.unwrap_or_default(), until);
                    }
                    return Ok(None);
                }
                // (each newcomer past the cap is cancelled: the key is not
                // held for the others, as on one Redis)
                "cancel" => {
                    return Ok(Some(Grant::Cancel {
                        id: need.id.clone(),
                    }));
                }
                "full" if !repaired => {
                    let policy = reply.get(1).and_then(text).unwrap_or_default();
                    let now_ms = reply.get(2).and_then(score).unwrap_or_default();
                    let entries: Vec<(String, i64)> = reply[3..]
                        .chunks_exact(2)
                        .filter_map(|p| Some((text(&p[0])?, score(&p[1])?)))
                        .collect();
                    let ckey = need.ckey.as_deref().unwrap_or_default();
                    let at = (ckey, policy.as_str(), now_ms);
                    self.repair(at, &entries, (&need.id, limits), deadline)
                        .await?;
                    repaired = true;
                }
                other => {
                    return Err(StoreError::Backend(format!(
                        "reserve replied {other:?} ({} items)",
                        reply.len()
                    )));
                }
            }
        }
    }

    /// A call of reserve.lua for `need` (its running-set entry `entry`;
    /// `drop`: an entry to remove first, or empty).
    fn reserve_call(
        &self,
        (queue, need, limits): (&QueueName, &Need, TaskLimits),
        (entry, repaired): (&str, bool),
        (drop_set, drop_entry): (&str, &str),
    ) -> crate::store::redis::script::Invocation<'_> {
        let mut call = self.scripts().reserve.call(self.clock());
        call.key(Key::Flow, format!("{}limits", self.flow_base))
            .arg("flow_base", self.flow_base.as_str())
            .arg("flow", u8::from(limits.flow))
            .arg("queue", queue.as_str())
            .arg("id", need.id.as_str())
            .arg("name", need.name.as_str())
            .arg("rkey", need.rkey.as_deref().unwrap_or(""))
            .arg("ckey", need.ckey.as_deref().unwrap_or(""))
            .arg("entry", entry)
            .arg("repaired", u8::from(repaired))
            .arg("drop_set", drop_set)
            .arg("drop_entry", drop_entry);
        call
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

    /// A call of cancel.lua for `id` (`only_running`: a task that no
    /// longer runs is left as it is).
    pub(super) fn cancel_call(
        &self,
        id: &TaskId,
        reason: &str,
        limits: TaskLimits,
        only_running: bool,
    ) -> crate::store::redis::script::Invocation<'_> {
        let mut call = self.scripts().cancel.call(self.clock());
        call.queue_keys(&self.keys(&id.queue()), Some(id))
            .arg("id", id.as_str())
            .arg("events_cap", limits.events)
            .arg("history_cap", limits.history)
            .arg("reason", reason)
            .arg("only_running", u8::from(only_running));
        call
    }

    /// Gives back what `grant` took (`give_back.lua`); a failure is logged:
    /// the token stays spent, the entry is repaired.
    async fn give_back(&self, grant: Grant, deadline: Deadline) {
        let Grant::Go { taken, entry, .. } = grant else {
            return;
        };
        if taken.is_empty() && entry.is_none() {
            return;
        }
        let (set, entry) = entry.unwrap_or_default();
        let mut call = self.scripts().give_back.call(self.clock());
        call.key(Key::Flow, format!("{}limits", self.flow_base))
            .arg("cc", set.as_str())
            .arg("entry", entry.as_str());
        for (bucket, interval) in &taken {
            call.extra(bucket.as_str()).extra(*interval);
        }
        if let Err(e) = self.store.invoke_once::<i64>(call.done(), deadline).await {
            tracing::warn!(error = %e, "a flow-control reservation could not be given back");
        }
    }

    /// Removes the running-set entries that end scripts left in the states
    /// they replied (on a Cluster: see [`left_entry`]; other states carry
    /// none). A failure is logged: the cap's repair removes them.
    pub(super) async fn remove_entries(&self, states: &[&str], deadline: Deadline) {
        let mut pipe = redis::pipe();
        for (set, entry) in states.iter().filter_map(|s| left_entry(s)) {
            pipe.cmd("ZREM").arg(set).arg(entry).ignore();
        }
        if pipe.is_empty() {
            return;
        }
        // (one round trip: every running set is in flow control's slot)
        if let Err(e) = self.store.query_pipe::<()>(&pipe, deadline).await {
            tracing::warn!(error = %e, "running-set entries are left to the cap's repair");
        }
    }
}

/// The running-set entry (set, entry) an end script left for the caller to
/// remove: on a Cluster, what follows `@` in its reply's state (`lib.lua`'s
/// `leave_running`).
pub(super) fn left_entry(state: &str) -> Option<(&str, &str)> {
    state.split_once('@')?.1.split_once('\n')
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
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
