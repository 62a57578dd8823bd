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
//! 1. the lease script stops at the candidate and names it (`need`; once
//!    the lease has met a held one, up to [`NEEDS`] of them in the queue's
//!    order, so that a head of many held keys costs one reservation);
//! 2. `reserve.lua`, in flow control's slot, runs the checks lease.lua runs
//!    on one Redis on each in turn and, for the first that passes, takes
//!    its tokens and adds an entry for it to its key's running set; it says
//!    which scopes held the ones before it and until when, or that the
//!    cap's policy cancels one;
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
//! reservation on its way to its lease is not taken for one; a set with no
//! entry that old is not handed back at all) and asks again; with
//! `cancel_oldest` and nothing stale, the oldest running task is asked to
//! cancel, as on one Redis.
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
/// keyed candidates than this many reservations pass over waits for the
/// first of them to free (or the poll) before the tasks behind are seen.
const ROUNDS: usize = 16;

/// The most candidates one reservation looks at, once a lease has met a
/// held one (its first call names one: the head is almost always the
/// answer). With [`ROUNDS`], a lease passes over up to 256 held keys.
const NEEDS: u8 = 16;

/// How old (ms) a running-set entry whose task does not carry it must be
/// before the cap's repair drops it: a reservation is made a round trip
/// before the lease that records it.
pub(super) const STALE_AFTER_MS: i64 = 10_000;

/// A candidate the lease met that needs a reservation.
#[derive(Debug, Clone)]
struct Candidate {
    id: String,
    name: String,
    rkey: Option<String>,
    ckey: Option<String>,
}

/// The candidates a lease stopped at, in the queue's order: the first of
/// them that may start is reserved.
#[derive(Debug, Clone)]
pub(super) struct Need {
    candidates: Vec<Candidate>,
    /// The end-script state whose running-set entry the reservation
    /// removes in its round trip (a chained finish's: [`left_entry`]).
    pub(super) left: Option<String>,
}

impl Need {
    /// The lease's `{ 'need', id, name, rkey, ckey, ... }`, if that is what
    /// it replied.
    pub(super) fn of(reply: &Value) -> Option<Self> {
        let Value::Array(items) = reply else {
            return None;
        };
        let (head, rest) = items.split_first()?;
        if text(head).as_deref() != Some("need") || rest.is_empty() || rest.len() % 4 != 0 {
            return None;
        }
        let key = |v: &Value| text(v).filter(|k| !k.is_empty());
        let candidates = rest
            .chunks_exact(4)
            .map(|c| {
                Some(Candidate {
                    id: text(&c[0])?,
                    name: text(&c[1])?,
                    rkey: key(&c[2]),
                    ckey: key(&c[3]),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            candidates,
            left: None,
        })
    }

    fn ids(&self) -> impl Iterator<Item = &str> {
        self.candidates.iter().map(|c| c.id.as_str())
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

    /// The scope, wait pairs of a reserve's reply from `from` on (sent at
    /// `sent_ms` on this process's clock).
    fn add_reply(&mut self, pairs: &[Value], sent_ms: i64) {
        for p in pairs.chunks_exact(2) {
            let wait = int(&p[1]);
            let until = wait.filter(|&w| w > 0).map(|w| sent_ms + w);
            self.add(text(&p[0]).unwrap_or_default(), until);
        }
    }

    /// How many candidates the next lease call names: one until a
    /// reservation found one held.
    fn needs(&self) -> u8 {
        if self.0.is_empty() { 1 } else { NEEDS }
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

    /// lease.lua's `denied` lines for every candidate being reserved (a
    /// chained lease's, which reserves nothing yet).
    pub(super) fn all_lines(&self) -> String {
        let mut out = String::new();
        for id in self.lock().iter() {
            out.push_str("id:");
            out.push_str(id);
            out.push('\n');
        }
        out
    }

    /// lease.lua's `denied` lines for the candidates being reserved, but
    /// `own`.
    fn lines(&self, own: &Mine<'_>, out: &mut String) {
        for id in self.lock().iter().filter(|id| !own.has(id)) {
            out.push_str("id:");
            out.push_str(id);
            out.push('\n');
        }
    }
}

/// The candidate registered in [`InFlight`] while a lease reserves it, then
/// the one reserved until the lease that uses it.
struct Mine<'a> {
    set: &'a InFlight,
    id: Option<String>,
}

impl Mine<'_> {
    fn has(&self, id: &str) -> bool {
        self.id.as_deref() == Some(id)
    }

    /// Whether another lease of this process is reserving `id`.
    fn theirs(&self, id: &str) -> bool {
        !self.has(id) && self.set.has(id)
    }

    /// Registers `id` (none: nothing) in place of what it held.
    fn hold(&mut self, id: Option<&str>) {
        self.release();
        if let Some(id) = id {
            self.set.lock().insert(id.to_owned());
            self.id = Some(id.to_owned());
        }
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
        // the head only: the scopes a reserve of the bet finds are not
        // carried into the lease, which would stop at a first candidate
        // that another one of the bet's was granted past
        let bet = Need {
            candidates: need.candidates.iter().take(1).cloned().collect(),
            left: None,
        };
        heads.insert(queue.as_str().to_owned(), bet);
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
            self.in_flight.lines(&mine, &mut denied_arg);
            let reserving = Reserving {
                cluster: true,
                needs: denied.needs(),
                grant: &grant_arg,
                denied: &denied_arg,
            };
            let call = self.lease_call_reserving(queue, ask, limits, reserving);
            let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
            let reply: Value = self.store.invoke_once(call.done(), deadline).await?;
            if let Some(mut need) = Need::of(&reply) {
                if let Some(g) = grant.take() {
                    self.give_back(g, deadline).await;
                }
                // met by two leases of this process at once: the other
                // reserves them, this one looks again passing over them
                need.candidates.retain(|c| !mine.theirs(&c.id));
                if need.candidates.is_empty() {
                    continue;
                }
                grant = self
                    .reserve_held(queue, &need, limits, (&mut denied, &mut mine), deadline)
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
    /// lease's candidates), else the queue's bet ([`Heads`]), but for what
    /// another lease of this process is reserving.
    async fn reserve_first(
        &self,
        queue: &QueueName,
        first: Option<Need>,
        limits: TaskLimits,
        (denied, mine): (&mut Denied, &mut Mine<'_>),
        deadline: Deadline,
    ) -> Result<Option<Grant>> {
        if let Some(mut need) = first {
            need.candidates.retain(|c| !mine.theirs(&c.id));
            if need.candidates.is_empty() {
                // the lease passes over them; its finish's entry goes now
                let left = need.left.as_deref().unwrap_or_default();
                self.remove_entries(&[left], deadline).await;
                return Ok(None);
            }
            return self
                .reserve_held(queue, &need, limits, (denied, mine), deadline)
                .await;
        }
        let Some(mut bet) = self.heads.take(queue) else {
            return Ok(None);
        };
        bet.candidates.retain(|c| !mine.theirs(&c.id));
        if bet.candidates.is_empty() {
            return Ok(None);
        }
        // what holds a bet is not taken for a fact: the candidates may have
        // moved on (and a held candidate must reach its own reserve, which
        // may ask a cap's oldest task to cancel)
        let mut scratch = Denied::default();
        self.reserve_held(queue, &bet, limits, (&mut scratch, mine), deadline)
            .await
    }

    /// [`Self::reserve`] with `need`'s first candidate registered in
    /// [`InFlight`] while it runs, and the one reserved after.
    async fn reserve_held(
        &self,
        queue: &QueueName,
        need: &Need,
        limits: TaskLimits,
        (denied, mine): (&mut Denied, &mut Mine<'_>),
        deadline: Deadline,
    ) -> Result<Option<Grant>> {
        // (the first only: the others are likely held, and a concurrent
        // lease of the process that passed over them all would find
        // nothing behind them, or a task of a lower priority)
        mine.hold(need.ids().next());
        let grant = self.reserve(queue, need, limits, denied, deadline).await;
        mine.hold(grant.as_ref().ok().and_then(|g| g.as_ref().map(Grant::id)));
        grant
    }

    /// Reserves the first of `need`'s candidates that may start
    /// (`reserve.lua`): a grant, or none; what held the candidates before
    /// it is added to `denied`. A key at its cap whose set may hold stale
    /// entries is repaired once and the reserve asked again.
    async fn reserve(
        &self,
        queue: &QueueName,
        need: &Need,
        limits: TaskLimits,
        denied: &mut Denied,
        deadline: Deadline,
    ) -> Result<Option<Grant>> {
        let entries: Vec<String> = need
            .ids()
            .map(|id| format!("{id}#{:016x}", rand::random::<u64>()))
            .collect();
        let mut repaired = String::new();
        let mut drop = need.left.as_deref().and_then(left_entry);
        loop {
            let call = self.reserve_call(
                (queue, need, limits),
                (&entries, &repaired),
                drop.take().unwrap_or_default(),
            );
            let sent_ms = crate::store::unix_millis(std::time::SystemTime::now());
            let reply: Vec<Value> = self.store.invoke_once(call.done(), deadline).await?;
            let head = reply.first().and_then(text).unwrap_or_default();
            let bad =
                || StoreError::Backend(format!("reserve replied {head:?} ({} items)", reply.len()));
            // the index of the candidate a reply names (1-based in it)
            let at = |i: usize| {
                let n = usize::try_from(reply.get(i).and_then(int)?).ok()?;
                n.checked_sub(1).filter(|n| *n < need.candidates.len())
            };
            match head.as_str() {
                "go" => {
                    let n = at(1).ok_or_else(bad)?;
                    let (taken, rest) = taken(&reply[2..]).ok_or_else(bad)?;
                    denied.add_reply(rest, sent_ms);
                    let c = &need.candidates[n];
                    let set = |k: &String| format!("{}cc:{k}", self.flow_base);
                    return Ok(Some(Grant::Go {
                        id: c.id.clone(),
                        taken,
                        entry: c.ckey.as_ref().map(|k| (set(k), entries[n].clone())),
                    }));
                }
                "held" => {
                    denied.add_reply(&reply[1..], sent_ms);
                    return Ok(None);
                }
                // (each newcomer past the cap is cancelled: the key is not
                // held for the others, as on one Redis)
                "cancel" => {
                    let c = &need.candidates[at(1).ok_or_else(bad)?];
                    denied.add_reply(&reply[2..], sent_ms);
                    return Ok(Some(Grant::Cancel { id: c.id.clone() }));
                }
                "full" => {
                    let c = &need.candidates[at(1).ok_or_else(bad)?];
                    let ckey = c.ckey.as_deref().unwrap_or_default();
                    // reserve.lua never asks twice for one key
                    if ckey.is_empty() || repaired.lines().any(|k| k == ckey) {
                        return Err(bad());
                    }
                    self.repair_full(&reply[2..], (ckey, &c.id), limits, deadline)
                        .await?;
                    repaired.push_str(ckey);
                    repaired.push('\n');
                }
                _ => return Err(bad()),
            }
        }
    }

    /// A call of reserve.lua for `need`'s candidates (their running-set
    /// `entries`; the keys already `repaired`, one per line; `drop`: an
    /// entry to remove first, or empty).
    fn reserve_call(
        &self,
        (queue, need, limits): (&QueueName, &Need, TaskLimits),
        (entries, repaired): (&[String], &str),
        (drop_set, drop_entry): (&str, &str),
    ) -> crate::store::redis::script::Invocation<'_> {
        let mut call = self.scripts().reserve.call(self.clock());
        call.key(Key::Flow, format!("{}limits", self.flow_base))
            .arg("flow_base", self.flow_base.as_str())
            .arg("flow", u8::from(limits.flow))
            .arg("queue", queue.as_str())
            .arg("repaired", repaired)
            .arg("stale_ms", STALE_AFTER_MS)
            .arg("drop_set", drop_set)
            .arg("drop_entry", drop_entry);
        for (c, entry) in need.candidates.iter().zip(entries) {
            call.extra(c.id.as_str())
                .extra(c.name.as_str())
                .extra(c.rkey.as_deref().unwrap_or(""))
                .extra(c.ckey.as_deref().unwrap_or(""))
                .extra(entry.as_str());
        }
        call
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

/// Tokens taken: (bucket, interval in µs) each.
type Tokens = Vec<(String, i64)>;

/// A `go` reply's tokens from its count on (`k`, then `k` bucket, interval
/// pairs), and what follows them; `None` when the count does not fit.
fn taken(reply: &[Value]) -> Option<(Tokens, &[Value])> {
    let k = usize::try_from(reply.first().and_then(int)?).ok()?;
    let end = k.checked_mul(2)?.checked_add(1)?;
    let pairs = reply.get(1..end)?;
    let taken = pairs
        .chunks_exact(2)
        .filter_map(|p| Some((text(&p[0])?, int(&p[1])?)))
        .collect();
    Some((taken, &reply[end..]))
}

/// The running-set entry (set, entry) an end script left for the caller to
/// remove: on a Cluster, what follows `@` in its reply's state (`lib.lua`'s
/// `leave_running`).
pub(super) fn left_entry(state: &str) -> Option<(&str, &str)> {
    state.split_once('@')?.1.split_once('\n')
}

pub(super) fn text(v: &Value) -> Option<String> {
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
