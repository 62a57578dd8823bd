//! Flow control on the embedded store: rate limits (GCRA buckets), key
//! back-offs, concurrency caps (running sets per key) and the fair order of
//! keyed tasks, as `TaskBackend`'s "Flow control" and "Fair order" specify
//! them (the Redis side: `lease.lua` and `redis/tasks/flow.rs`).
//!
//! Everything lives in [`Flow`], next to the tasks under the one lock, so
//! that the lease decides in the same critical section that hands a task
//! out. The lease's scan asks [`Tasks::verdict`] about each candidate it
//! would serve (a read: nothing moves until the scan has chosen), then
//! [`Tasks::apply_flow`] makes what the scan decided (cancels by a cap) and
//! [`Flow::admit`] takes the chosen task's tokens.
//!
//! Buckets, back-offs and fair turns that can no longer hold anything are
//! dropped by the sweep ([`Flow::prune`]), as their keys expire on Redis:
//! a million distinct keys over a day do not stay in memory. Snapshots save
//! the rest ([`FlowImage`]); running sets are rebuilt from the RUNNING
//! tasks instead, so that they can never disagree with them.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::state::{BAND, BATCH, Entry, Tasks, push_event};
use crate::domain::flow::{ConcurrencyLimit, Limit, LimitState, Policy, RateLimit, Scope};
use crate::domain::task::{QueueName, State, Task};
use crate::store::tasks::{Leased, TaskLimits};

/// The limits, their live state and the fair order's clocks.
#[derive(Default)]
pub(super) struct Flow {
    /// Every limit by its field ([`Limit::field`]), in field order.
    pub(super) limits: BTreeMap<String, Limit>,
    /// Changes at every set and at a delete that removed a limit.
    pub(super) version: u64,
    /// GCRA buckets by scope name (`queues/q`, `tasks/n`, `keys/K`): the
    /// theoretical arrival time, µs since the epoch. Absent: idle.
    pub(super) buckets: HashMap<String, i64>,
    /// Rate-limit keys backed off, and until when (ms).
    pub(super) backoffs: HashMap<String, i64>,
    /// Running tasks per concurrency key: id → started ms.
    pub(super) running: HashMap<String, HashMap<String, i64>>,
    /// Each queue's fair order.
    pub(super) fair: HashMap<QueueName, Fair>,
}

/// One queue's fair order (start-time fair queuing over its keys), per
/// priority band: a high-priority task's turn must not move the clock of
/// the normal band (new keys there would wait behind every backlog).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Fair {
    /// Per band: the latest turn (`vt`) of a keyed task leased, started at
    /// now by the band's first keyed task.
    pub(super) clock: BTreeMap<u64, i64>,
    /// The last turn each key drew, by `<band>:<key>`.
    pub(super) last: HashMap<String, i64>,
}

/// A task's fair key: its concurrency key, else its rate-limit key.
pub(super) fn fair_key(task: &Task) -> Option<&str> {
    task.concurrency_key
        .as_deref()
        .or(task.rate_limit_key.as_deref())
}

/// A bucket's GCRA figures in µs: the interval `T` and the tolerance
/// `(burst - 1) T`.
fn gcra(rl: &RateLimit) -> (i64, i64) {
    let t = i64::try_from(rl.interval_us()).unwrap_or(i64::MAX);
    (t, t.saturating_mul(i64::from(rl.burst.saturating_sub(1))))
}

/// µs to ms, rounded up: a worker resting until then finds the token free.
fn ceil_ms(us: i64) -> i64 {
    us.saturating_add(999).div_euclid(1000)
}

impl Flow {
    fn rate(&self, field: &str) -> Option<&RateLimit> {
        match self.limits.get(field) {
            Some(Limit::Rate(r)) => Some(r),
            _ => None,
        }
    }

    /// A key's rate limit: its own, else `keys/*`.
    fn key_rate(&self, key: &str) -> Option<&RateLimit> {
        self.rate(&RateLimit::field_of(&Scope::Key(key.to_owned())))
            .or_else(|| self.rate("r:keys/*"))
    }

    /// A key's cap: its own, else `keys/*`.
    fn cap(&self, key: &str) -> Option<&ConcurrencyLimit> {
        let own = self.limits.get(&ConcurrencyLimit::field_of(key));
        match own.or_else(|| self.limits.get("c:keys/*")) {
            Some(Limit::Concurrency(c)) => Some(c),
            _ => None,
        }
    }

    /// When bucket `bucket` of `rl` has its next token (µs), if not now.
    fn next_token_us(&self, bucket: &str, rl: &RateLimit, now_us: i64) -> Option<i64> {
        let (_, tau) = gcra(rl);
        let free = self.buckets.get(bucket)?.saturating_sub(tau);
        (free > now_us).then_some(free)
    }

    /// Takes a token from bucket `bucket` of `rl`.
    fn take(&mut self, bucket: &str, rl: &RateLimit, now_us: i64) {
        let (t, _) = gcra(rl);
        let tat = self.buckets.get(bucket).copied().unwrap_or(now_us);
        self.buckets
            .insert(bucket.to_owned(), tat.max(now_us).saturating_add(t));
    }

    /// The ready score of `e` entering `queue`'s ready set now: a task with
    /// a fair key draws the next turn of its key (and keeps it, for a
    /// release); another is scored by now, as always.
    pub(super) fn enter_ready(&mut self, queue: &QueueName, e: &mut Entry, now: i64) -> i64 {
        let band = e.task.priority.band() as i64 * BAND;
        let Some(key) = fair_key(&e.task) else {
            return band + now;
        };
        if !self.fair.contains_key(queue) {
            self.fair.insert(queue.clone(), Fair::default());
        }
        let Some(fair) = self.fair.get_mut(queue) else {
            return band + now;
        };
        // the band's clock starts at its first keyed task's entry (so that
        // keys arriving later start level with it)
        let b = e.task.priority.band();
        let base = *fair.clock.entry(b).or_insert(now);
        let lane = format!("{b}:{key}");
        // a key new or behind starts one turn after the clock, level with
        // the waiting keys' next turns: keys of one task each then move the
        // clock on and fall behind it, where the sweep drops them (at the
        // clock itself they all took its turn, which never moved past them)
        let next = base.saturating_add(1);
        let vt = fair
            .last
            .get(&lane)
            .map_or(next, |last| last.saturating_add(1).max(next));
        fair.last.insert(lane, vt);
        e.vt = Some(vt);
        band + vt
    }

    /// The score a released task goes back to: its turn, or (unkeyed, or
    /// saved before turns existed) its submit time.
    pub(super) fn back_in_ready(e: &Entry) -> i64 {
        let at = match (fair_key(&e.task), e.vt) {
            (Some(_), Some(vt)) => vt,
            _ => e.task.created_ms,
        };
        e.task.priority.band() as i64 * BAND + at
    }

    /// Task `task`, leased now from `queue` (its turn `vt`): it takes a
    /// token from each of its buckets, joins its key's running set, and its
    /// turn becomes the queue's clock.
    pub(super) fn admit(
        &mut self,
        queue: &QueueName,
        task: &Task,
        vt: Option<i64>,
        limits: TaskLimits,
        now: i64,
    ) {
        let now_us = now.saturating_mul(1000);
        if limits.flow {
            for scope in [
                Scope::Queue(queue.to_string()),
                Scope::Task(task.name.clone()),
            ] {
                if let Some(rl) = self.rate(&RateLimit::field_of(&scope)).cloned() {
                    self.take(&scope.name(), &rl, now_us);
                }
            }
        }
        if let Some(key) = &task.rate_limit_key
            && let Some(rl) = self.key_rate(key).cloned()
        {
            self.take(&format!("keys/{key}"), &rl, now_us);
        }
        if let Some(key) = &task.concurrency_key {
            self.running
                .entry(key.clone())
                .or_default()
                .insert(task.id.to_string(), now);
        }
        if let (Some(_), Some(vt)) = (fair_key(task), vt) {
            // it never moves back (a released task keeps its old turn)
            let fair = self.fair.entry(queue.clone()).or_default();
            let clock = fair.clock.entry(task.priority.band()).or_insert(vt);
            *clock = (*clock).max(vt);
        }
    }

    /// Task `task`'s attempt ended (finish, release, a lapsed lease): it
    /// leaves its key's running set.
    pub(super) fn stop(&mut self, task: &Task) {
        let Some(key) = &task.concurrency_key else {
            return;
        };
        if let Some(set) = self.running.get_mut(key) {
            set.remove(task.id.as_str());
            if set.is_empty() {
                self.running.remove(key);
            }
        }
    }

    /// Drops what can no longer hold anything: idle buckets, past
    /// back-offs, and in `queue` the keys whose last turn is behind the
    /// clock (a new turn of theirs starts after the clock anyway).
    pub(super) fn prune(&mut self, queue: &QueueName, now: i64) {
        let now_us = now.saturating_mul(1000);
        self.buckets.retain(|_, tat| *tat > now_us);
        self.backoffs.retain(|_, until| *until > now);
        if let Some(fair) = self.fair.get_mut(queue) {
            let clocks = &fair.clock;
            fair.last.retain(|lane, last| {
                let band = lane.split(':').next().and_then(|b| b.parse().ok());
                band.and_then(|b| clocks.get(&b))
                    .is_none_or(|c| *last >= *c)
            });
        }
    }

    /// Sets (or replaces) a limit; its bucket's state stays.
    pub(super) fn set(&mut self, limit: &Limit) {
        self.limits.insert(limit.field(), limit.clone());
        self.version += 1;
    }

    /// Deletes the limit under `field`: whether there was one.
    pub(super) fn delete(&mut self, field: &str) -> bool {
        let removed = self.limits.remove(field).is_some();
        if removed {
            self.version += 1;
        }
        removed
    }

    /// Backs off `key` until `until` (ms) unless a later back-off holds it:
    /// when it ends.
    pub(super) fn back_off(&mut self, key: &str, until: i64) -> i64 {
        let end = self.backoffs.entry(key.to_owned()).or_insert(until);
        *end = (*end).max(until);
        *end
    }

    /// Every limit with its live state.
    pub(super) fn states(&self, now: i64) -> Vec<(Limit, LimitState)> {
        let now_us = now.saturating_mul(1000);
        self.limits
            .values()
            .map(|limit| {
                let state = match limit {
                    Limit::Rate(r) => LimitState {
                        next_free_ms: self
                            .next_token_us(&r.scope.name(), r, now_us)
                            .map(|us| us.div_euclid(1000))
                            .filter(|&ms| ms > now),
                        backoff_until_ms: match &r.scope {
                            Scope::Key(k) if k != "*" => {
                                self.backoffs.get(k).copied().filter(|&at| at > now)
                            }
                            _ => None,
                        },
                        running: 0,
                    },
                    Limit::Concurrency(c) => LimitState {
                        running: self.running.get(&c.key).map_or(0, |s| s.len() as u32),
                        ..LimitState::default()
                    },
                };
                (limit.clone(), state)
            })
            .collect()
    }
}

/// What the limits say of one candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// It may start.
    Admit,
    /// It stays QUEUED.
    Hold,
    /// Its key's cap ends it (`cancel_newest`).
    Cancel,
    /// The queue's rate limit holds: the call ends.
    QueueHeld,
}

/// One lease call's view of the limits: scopes found held stay held for
/// the rest of the call.
#[derive(Debug, Default)]
pub(super) struct Call {
    /// Whether the queue's rate limit was looked at (once per call).
    queue_checked: bool,
    /// When the queue's rate limit frees, when it held the call (ms).
    queue_free: Option<i64>,
    /// Held scopes: `r:<bucket>`, `b:<key>` (a back-off), `c:<key>`.
    held: HashSet<String>,
    /// The earliest a held rate limit or back-off frees (ms).
    free_ms: Option<i64>,
    /// Candidates held or ended by a cap so far.
    pub(super) count: usize,
    /// Running tasks asked to cancel by a `cancel_oldest` cap, with why.
    pub(super) supersede: Vec<(String, String)>,
    /// Candidates ended by a `cancel_newest` cap, with their key.
    pub(super) capped: Vec<(String, String)>,
}

impl Call {
    fn hold(&mut self, scope: String, free_ms: Option<i64>) -> Verdict {
        self.held.insert(scope);
        if let Some(at) = free_ms {
            self.free_ms = Some(self.free_ms.map_or(at, |f| f.min(at)));
        }
        Verdict::Hold
    }

    /// A held or cancelled candidate: whether it takes a place of the scan
    /// (the first [`BATCH`] of a call do not, like expired ones).
    pub(super) fn counts_against_scan(&mut self) -> bool {
        self.count += 1;
        self.count > BATCH
    }

    /// What a call that leased nothing found.
    pub(super) fn outcome(&self) -> Leased {
        if let Some(at) = self.queue_free {
            return Leased::Held(Some(at));
        }
        if self.held.is_empty() {
            Leased::Empty
        } else {
            Leased::Held(self.free_ms)
        }
    }
}

impl Tasks {
    /// What the limits say of candidate `task` of `queue`, which the worker
    /// serves (see "Flow control"): a read; the call remembers what held.
    pub(super) fn verdict(
        &self,
        call: &mut Call,
        queue: &QueueName,
        task: &Task,
        limits: TaskLimits,
        now: i64,
    ) -> Verdict {
        let f = &self.flow;
        let now_us = now.saturating_mul(1000);
        if limits.flow && !call.queue_checked {
            call.queue_checked = true;
            let scope = Scope::Queue(queue.to_string());
            if let Some(rl) = f.rate(&RateLimit::field_of(&scope))
                && let Some(us) = f.next_token_us(&scope.name(), rl, now_us)
            {
                call.queue_free = Some(ceil_ms(us));
                return Verdict::QueueHeld;
            }
        }
        if f.limits.is_empty() && f.backoffs.is_empty() {
            return Verdict::Admit;
        }
        if limits.flow {
            let scope = Scope::Task(task.name.clone());
            if let Some(rl) = f.rate(&RateLimit::field_of(&scope)) {
                let bucket = scope.name();
                if let Some(v) = held_bucket(call, f, &bucket, rl, now_us) {
                    return v;
                }
            }
        }
        if let Some(key) = &task.rate_limit_key {
            let scope = format!("b:{key}");
            if call.held.contains(&scope) {
                return Verdict::Hold;
            }
            if let Some(&until) = f.backoffs.get(key).filter(|&&at| at > now) {
                return call.hold(scope, Some(until));
            }
            if let Some(rl) = f.key_rate(key) {
                let bucket = format!("keys/{key}");
                if let Some(v) = held_bucket(call, f, &bucket, rl, now_us) {
                    return v;
                }
            }
        }
        match &task.concurrency_key {
            Some(key) => self.cap_verdict(call, key, task),
            None => Verdict::Admit,
        }
    }

    /// Key `key`'s cap against its running set, and its policy.
    fn cap_verdict(&self, call: &mut Call, key: &str, task: &Task) -> Verdict {
        let scope = format!("c:{key}");
        if call.held.contains(&scope) {
            return Verdict::Hold;
        }
        let Some(cap) = self.flow.cap(key) else {
            return Verdict::Admit;
        };
        let running = self.flow.running.get(key);
        if running.map_or(0, HashMap::len) < cap.max_running as usize {
            return Verdict::Admit;
        }
        match cap.policy {
            Policy::Wait => call.hold(scope, None),
            // a task others wait on waits instead (as on Redis, where its
            // dependents could not be released in the lease)
            Policy::CancelNewest if self.dependents.contains_key(task.id.as_str()) => {
                call.hold(scope, None)
            }
            Policy::CancelNewest => {
                call.capped.push((task.id.to_string(), key.to_owned()));
                Verdict::Cancel
            }
            Policy::CancelOldest => {
                let running = running.into_iter().flatten();
                let asked = running
                    .clone()
                    .any(|(id, _)| self.tasks.get(id).is_some_and(|e| e.cancel.is_some()));
                if !asked
                    && let Some((oldest, _)) = running.min_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
                {
                    let why = format!("concurrency cap of {key}: superseded by {}", task.id);
                    call.supersede.push((oldest.clone(), why));
                }
                call.hold(scope, None)
            }
        }
    }

    /// Makes what a lease call's scan decided: ends the candidates a
    /// `cancel_newest` cap refused (CANCELLED as never run; their
    /// dependents released as an expired task's are) and asks the running
    /// tasks a `cancel_oldest` cap supersedes to cancel (as **cancel** asks
    /// a running task: once, event `running`).
    pub(super) fn apply_flow(
        &mut self,
        queue: &QueueName,
        call: &Call,
        limits: TaskLimits,
        now: i64,
    ) {
        for (id, key) in &call.capped {
            let error = format!("cancelled: concurrency cap of {key} reached");
            self.end_waiting(queue, id, error, limits, now);
        }
        for (id, why) in &call.supersede {
            let Some(e) = self
                .tasks
                .get_mut(id)
                .filter(|e| e.task.state == State::Running)
            else {
                continue;
            };
            if e.cancel.is_none() {
                e.cancel = Some(why.clone());
                let q = self.queues.entry(e.task.id.queue()).or_default();
                push_event(q, &mut self.last_event, limits, &e.task, None, now);
            }
        }
    }
}

/// Whether bucket `bucket` of `rl` holds (it was held earlier in the call,
/// or its next token is in the future): the verdict when it does.
fn held_bucket(
    call: &mut Call,
    f: &Flow,
    bucket: &str,
    rl: &RateLimit,
    now_us: i64,
) -> Option<Verdict> {
    let scope = format!("r:{bucket}");
    if call.held.contains(&scope) {
        return Some(Verdict::Hold);
    }
    let free = f.next_token_us(bucket, rl, now_us)?;
    Some(call.hold(scope, Some(ceil_ms(free))))
}

/// Saved flow control: limits as stored on Redis (field → encoded value),
/// buckets, back-offs and each queue's fair order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowImage {
    /// The limits' version.
    #[serde(default)]
    pub version: u64,
    /// Every limit: field → stored value ([`crate::domain::flow::Limit::encode`]).
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
    /// GCRA buckets: scope name → theoretical arrival time (µs).
    #[serde(default)]
    pub buckets: BTreeMap<String, i64>,
    /// Backed-off rate-limit keys → until (ms).
    #[serde(default)]
    pub backoffs: BTreeMap<String, i64>,
    /// Per queue: its fair clock and each key's last turn.
    #[serde(default)]
    pub fair: BTreeMap<String, FairImage>,
}

impl FlowImage {
    pub(super) fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One queue's saved fair order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FairImage {
    /// Per band: its clock.
    #[serde(default)]
    pub clock: BTreeMap<u64, i64>,
    /// Each key's last turn, by `<band>:<key>`.
    #[serde(default)]
    pub last: BTreeMap<String, i64>,
}

impl Flow {
    /// What a snapshot saves: buckets and back-offs that still hold.
    pub(super) fn image(&self, now: i64) -> FlowImage {
        let now_us = now.saturating_mul(1000);
        FlowImage {
            version: self.version,
            limits: self
                .limits
                .iter()
                .map(|(k, l)| (k.clone(), l.encode()))
                .collect(),
            buckets: self
                .buckets
                .iter()
                .filter(|(_, tat)| **tat > now_us)
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            backoffs: self
                .backoffs
                .iter()
                .filter(|(_, until)| **until > now)
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            fair: self
                .fair
                .iter()
                .map(|(q, fair)| {
                    let last = fair.last.iter().map(|(k, v)| (k.clone(), *v)).collect();
                    let clock = fair.clock.clone();
                    (q.to_string(), FairImage { clock, last })
                })
                .collect(),
        }
    }

    /// Flow control as saved; a limit that does not decode is skipped (as
    /// Redis's listing skips it), and the running sets are rebuilt from the
    /// RUNNING tasks.
    pub(super) fn from_image(image: FlowImage, tasks: &HashMap<String, Entry>) -> Self {
        let mut flow = Self {
            version: image.version,
            limits: image
                .limits
                .iter()
                .filter_map(|(k, v)| Limit::decode(k, v).map(|l| (k.clone(), l)))
                .collect(),
            buckets: image.buckets.into_iter().collect(),
            backoffs: image.backoffs.into_iter().collect(),
            ..Self::default()
        };
        for (queue, fair) in image.fair {
            if let Ok(queue) = QueueName::parse(&queue) {
                let last = fair.last.into_iter().collect();
                flow.fair.insert(
                    queue,
                    Fair {
                        clock: fair.clock,
                        last,
                    },
                );
            }
        }
        for e in tasks.values().filter(|e| e.task.state == State::Running) {
            if let (Some(key), Some(started)) = (&e.task.concurrency_key, e.task.started_ms) {
                let set = flow.running.entry(key.clone()).or_default();
                set.insert(e.task.id.to_string(), started);
            }
        }
        flow
    }
}
