//! The embedded task store as plain data, for the data directory
//! (`crate::persist`): every task with its lease bookkeeping, every queue's
//! indexes, history, dead letters, event log and counters, the idempotency
//! claims and the dependency links.
//!
//! A task is saved as the field map Redis stores (`task_fields::to_fields`, plus
//! the fields the Lua scripts write themselves), so that both stores share
//! one description of a task and a field added for Redis is saved here too.
//! Worker records are not saved: they describe processes, which a restart
//! ends. Times are absolute (ms since the Unix epoch) already.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::MemoryTasks;
use super::flow::{Flow, FlowImage};
use super::state::{Entry, Queue, ZSet};
use crate::domain::Counts;
use crate::domain::task::{QueueName, State, TaskId};
use crate::store::task_fields;
use crate::store::tasks::{TaskEvent, TaskLimits};

/// Saved tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TasksImage {
    /// The newest event's sequence number.
    pub last_event: u64,
    /// Every task the store holds (results not yet expired).
    pub tasks: Vec<TaskImage>,
    /// Per queue.
    pub queues: BTreeMap<String, QueueImage>,
    /// Idempotency claims not yet expired: key → (value, expiry ms).
    pub claims: BTreeMap<String, (String, i64)>,
    /// The tasks waiting on each task that has not ended.
    pub dependents: BTreeMap<String, Vec<String>>,
    /// Flow control's limits and live state (absent from older snapshots;
    /// running sets are rebuilt from the RUNNING tasks).
    #[serde(default, skip_serializing_if = "FlowImage::is_empty")]
    pub flow: FlowImage,
    /// The key of lease secrets (absent from older snapshots, and before
    /// the first lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_key: Option<String>,
}

/// One saved task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskImage {
    /// Its fields, as the Redis hash holds them.
    pub fields: BTreeMap<String, String>,
    /// Its attempt log, oldest first.
    pub log: Vec<String>,
    /// Why a cancel was asked for while it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<String>,
    /// The dependencies a PENDING task still waits on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
    /// Attempts when it was last retried by hand.
    #[serde(default)]
    pub attempt_base: u32,
    /// Lease deadline (ms), while running.
    #[serde(default)]
    pub lease_until: i64,
    /// Hard-limit deadline (ms), while running.
    #[serde(default)]
    pub hard_until: i64,
    /// When its result expires (ms), once ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// One saved queue: its sorted sets as `(score, id)` lists.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueImage {
    pub ready: Vec<(i64, String)>,
    pub scheduled: Vec<(i64, String)>,
    pub leases: Vec<(i64, String)>,
    pub pending: Vec<(i64, String)>,
    pub history: Vec<(i64, String)>,
    pub history_data: BTreeMap<String, String>,
    pub dead: Vec<(i64, String)>,
    /// The event log, oldest first.
    pub events: Vec<EventImage>,
    pub trimmed_upto: u64,
    pub counts: BTreeMap<String, u64>,
    /// The queue's pause (`by`, `reason`, `at`), absent when it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<BTreeMap<String, String>>,
    /// Debounce keys and the unstarted task holding each (Redis's
    /// `debounce` hash).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub debounce: BTreeMap<String, String>,
    /// Waiting ids that expire, by expiry (absent from older snapshots).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expiring: Vec<(i64, String)>,
}

/// One saved event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventImage {
    pub seq: u64,
    pub id: String,
    pub name: String,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    pub at_ms: i64,
}

fn zset_image(z: &ZSet) -> Vec<(i64, String)> {
    z.by_score.iter().cloned().collect()
}

fn zset_from(members: Vec<(i64, String)>) -> ZSet {
    let mut z = ZSet::default();
    for (score, id) in members {
        z.add(&id, score);
    }
    z
}

fn task_image(e: &Entry) -> TaskImage {
    let mut fields: BTreeMap<String, String> = task_fields::to_fields(&e.task)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    // written by the Lua scripts on Redis, not by `to_fields`
    if let Some(w) = &e.task.worker {
        fields.insert("worker".into(), w.clone());
    }
    for (name, value) in [
        ("started_ms", e.task.started_ms),
        ("finished_ms", e.task.finished_ms),
        ("vt", e.vt),
    ] {
        if let Some(v) = value {
            fields.insert(name.into(), v.to_string());
        }
    }
    let mut waiting: Vec<String> = e.waiting.iter().cloned().collect();
    waiting.sort();
    TaskImage {
        fields,
        log: e.task.log.clone(),
        cancel: e.cancel.clone(),
        waiting,
        attempt_base: e.attempt_base,
        lease_until: e.lease_until,
        hard_until: e.hard_until,
        expires_at: e.expires_at,
    }
}

fn queue_image(q: &Queue) -> QueueImage {
    QueueImage {
        ready: zset_image(&q.ready),
        scheduled: zset_image(&q.scheduled),
        leases: zset_image(&q.leases),
        pending: zset_image(&q.pending),
        history: zset_image(&q.history),
        history_data: q.history_data.clone().into_iter().collect(),
        dead: zset_image(&q.dead),
        events: q
            .events
            .iter()
            .map(|(seq, e)| EventImage {
                seq: *seq,
                id: e.id.clone(),
                name: e.name.clone(),
                state: e.state.clone(),
                progress: e.progress.clone(),
                at_ms: e.at_ms,
            })
            .collect(),
        trimmed_upto: q.trimmed_upto,
        counts: q
            .counts
            .to_stored()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        paused: q.paused.as_ref().map(|p| {
            p.to_stored()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()
        }),
        debounce: q
            .debounce
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        expiring: zset_image(&q.expiring),
    }
}

// The struct update is deliberate: a field added to `Queue` later starts
// from its default on load instead of failing to compile here.
#[allow(clippy::needless_update)]
fn queue_from(image: QueueImage) -> Queue {
    Queue {
        ready: zset_from(image.ready),
        scheduled: zset_from(image.scheduled),
        leases: zset_from(image.leases),
        pending: zset_from(image.pending),
        history: zset_from(image.history),
        history_data: image.history_data.into_iter().collect(),
        dead: zset_from(image.dead),
        events: image
            .events
            .into_iter()
            .map(|e| {
                let event = TaskEvent {
                    stream_id: e.seq.to_string(),
                    id: e.id,
                    name: e.name,
                    state: e.state,
                    progress: e.progress,
                    at_ms: e.at_ms,
                };
                (e.seq, event)
            })
            .collect::<VecDeque<_>>(),
        trimmed_upto: image.trimmed_upto,
        counts: Counts::from_stored(image.counts),
        paused: image.paused.and_then(crate::domain::Pause::from_stored),
        debounce: image.debounce.into_iter().collect(),
        expiring: zset_from(image.expiring),
        ..Queue::default()
    }
}

fn entry_from(image: TaskImage) -> Result<Entry, String> {
    let fields: HashMap<String, String> = image.fields.into_iter().collect();
    let id = fields.get("id").cloned().unwrap_or_default();
    let task =
        task_fields::from_fields(&fields, image.log).map_err(|e| format!("task {id:?}: {e}"))?;
    Ok(Entry {
        task,
        cancel: image.cancel,
        waiting: image.waiting.into_iter().collect(),
        attempt_base: image.attempt_base,
        lease_until: image.lease_until,
        hard_until: image.hard_until,
        expires_at: image.expires_at,
        vt: fields.get("vt").and_then(|v| v.parse().ok()),
    })
}

impl MemoryTasks {
    /// Everything the store holds, as plain data. Running tasks are saved
    /// as they are: after a crash their leases lapse and the recovery sweep
    /// treats them as any task whose worker died.
    pub fn export(&self) -> TasksImage {
        let s = self.lock();
        let now = self.now_ms();
        // Copied under the lock, converted after it: a periodic save holds
        // up task transitions for the copy only.
        let entries: Vec<Entry> = s.tasks.values().cloned().collect();
        let mut image = TasksImage {
            last_event: s.last_event,
            tasks: Vec::new(),
            queues: s
                .queues
                .iter()
                .map(|(name, q)| (name.to_string(), queue_image(q)))
                .collect(),
            claims: s
                .claims
                .iter()
                .filter(|(_, (_, until))| *until > now)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            dependents: s
                .dependents
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
                .collect(),
            flow: s.flow.image(now),
            lease_key: s.lease_key.clone(),
        };
        drop(s);
        image.tasks = entries.iter().map(task_image).collect();
        image
            .tasks
            .sort_by(|a, b| a.fields.get("id").cmp(&b.fields.get("id")));
        image
    }

    /// A store holding what `image` saved; an error names the first task or
    /// queue that cannot be read.
    pub fn import(image: TasksImage) -> Result<Self, String> {
        let store = Self::default();
        {
            let mut s = store.lock();
            for t in image.tasks {
                let entry = entry_from(t)?;
                if let Some(at) = entry.expires_at {
                    s.expiring.insert((at, entry.task.id.to_string()));
                }
                s.tasks.insert(entry.task.id.to_string(), entry);
            }
            for (name, q) in image.queues {
                let queue = QueueName::parse(&name).map_err(|e| e.to_string())?;
                s.queues.insert(queue, queue_from(q));
            }
            let now = store.now_ms();
            s.claims = image
                .claims
                .into_iter()
                .filter(|(_, (_, until))| *until > now)
                .collect();
            s.dependents = image
                .dependents
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().collect()))
                .collect();
            s.last_event = image.last_event;
            s.lease_key = image.lease_key;
            s.flow = Flow::from_image(image.flow, &s.tasks);
        }
        store.shared.events.send_replace(image.last_event);
        Ok(store)
    }

    /// Hands every running task but the `kept` ones back to its queue as a
    /// stopping worker does (the attempt is given back, the log says why),
    /// so that it runs again after a restart. How many. A kept task stays
    /// running with its lease: its worker re-attaches it to the restarted
    /// koo, or the lease lapses.
    pub fn hand_back_running(&self, limits: TaskLimits, kept: &HashSet<TaskId>) -> u64 {
        // (id, token, the attempt's log entry)
        let running: Vec<(TaskId, u32, String)> = {
            let s = self.lock();
            s.tasks
                .values()
                .filter(|e| e.task.state == State::Running && !kept.contains(&e.task.id))
                .map(|e| {
                    let t = &e.task;
                    let entry = serde_json::json!({
                        "attempt": t.attempts,
                        "worker": t.worker,
                        "started_ms": t.started_ms,
                        "outcome": "handed_back",
                        "error": "koo stopped before the task ended; it runs again",
                    });
                    (t.id.clone(), t.token, entry.to_string())
                })
                .collect()
        };
        let mut handed = 0;
        for (id, token, entry) in running {
            let released = self.write(|s, now| s.release(&id, token, &entry, limits, now));
            if matches!(released, Ok(true)) {
                handed += 1;
            }
        }
        handed
    }

    /// How many tasks are in each state (results not yet expired), in the
    /// order of a task's life.
    pub fn census(&self) -> Vec<(State, u64)> {
        let s = self.lock();
        let now = self.now_ms();
        let mut counts: HashMap<State, u64> = HashMap::new();
        for e in s.tasks.values().filter(|e| e.live(now)) {
            *counts.entry(e.task.state).or_default() += 1;
        }
        let order = [
            State::Pending,
            State::Scheduled,
            State::Queued,
            State::Running,
            State::Succeeded,
            State::Failed,
            State::Cancelled,
            State::TimedOut,
        ];
        order
            .into_iter()
            .filter_map(|st| counts.get(&st).map(|n| (st, *n)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::Outcome;
    use crate::domain::task::{Category, Priority, Task};
    use crate::store::Deadline;
    use crate::store::tasks::TaskBackend;

    fn task(queue: &QueueName, name: &str) -> Task {
        Task {
            id: TaskId::generate(queue),
            name: name.into(),
            priority: Priority::High,
            args: "[1]".into(),
            kwargs: "{\"a\":1}".into(),
            state: State::Queued,
            max_retries: 0,
            result_ttl_ms: 3_600_000,
            ..Task::sample(0, 0)
        }
    }

    fn dl() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    /// Ends whose release to their dependents was deferred by a transition
    /// that never got to make it (it panicked: the lock survives a panic)
    /// are released by the next write, not left deferred for good.
    #[tokio::test]
    async fn releases_left_deferred_are_made_at_the_next_write() {
        let limits = TaskLimits::default();
        let q = Category::Research.default_queue();
        let m = MemoryTasks::default();
        let a = task(&q, "a");
        let mut b = task(&q, "b");
        b.state = State::Pending;
        m.submit(&a, Duration::ZERO, limits, dl()).await.unwrap();
        assert_eq!(
            m.depend_on(&a.id, &b.id, dl()).await.unwrap(),
            crate::store::tasks::DependReply::Waiting
        );
        m.submit_pending(&b, std::slice::from_ref(&a.id), limits, dl())
            .await
            .unwrap();
        let lease = Duration::from_secs(30);
        let leased = m
            .lease(&q, "w", lease, &["a"], limits, dl())
            .await
            .unwrap()
            .unwrap();
        // a finish inside a deferral that is never completed
        let ended = m.write(|s, now| {
            s.deferred_releases = Some((limits, Vec::new()));
            let done = Outcome::Succeeded("1".into());
            s.finish(&a.id, leased.token, &done, "{}", limits, now)
        });
        assert_eq!(ended.unwrap(), Some(State::Succeeded));
        let state = |t: Option<Task>| t.map(|t| t.state);
        assert_eq!(
            state(m.get(&b.id, dl()).await.unwrap()),
            Some(State::Pending)
        );
        // any next write makes the release
        m.cancel(&a.id, "late", limits, dl()).await.unwrap();
        assert_eq!(
            state(m.get(&b.id, dl()).await.unwrap()),
            Some(State::Queued)
        );
    }

    /// Queued, scheduled, pending, dead-lettered and running tasks, the
    /// event log and the claims come back exactly; a running task is handed
    /// back first, with its attempt given back.
    #[tokio::test]
    async fn tasks_round_trip_through_an_image() {
        let limits = TaskLimits::default();
        let q = Category::Research.default_queue();
        let m = MemoryTasks::default();
        let minute = Duration::from_secs(60);
        let lease = Duration::from_secs(30);
        let queued = task(&q, "n");
        m.submit(&queued, Duration::ZERO, limits, dl())
            .await
            .unwrap();
        let later = task(&q, "n");
        m.submit(&later, Duration::from_secs(3600), limits, dl())
            .await
            .unwrap();
        let dead = task(&q, "dead");
        m.submit(&dead, Duration::ZERO, limits, dl()).await.unwrap();
        let d = m
            .lease(&q, "w", lease, &["dead"], limits, dl())
            .await
            .unwrap()
            .unwrap();
        let failed = Outcome::Failed("{}".into());
        m.finish(&d.id, d.token, &failed, "{}", limits, dl())
            .await
            .unwrap();
        let running = task(&q, "run");
        m.submit(&running, Duration::ZERO, limits, dl())
            .await
            .unwrap();
        let r = m
            .lease(&q, "w", lease, &["run"], limits, dl())
            .await
            .unwrap()
            .unwrap();
        let pending = task(&q, "p");
        m.depend_on(&r.id, &pending.id, dl()).await.unwrap();
        m.submit_pending(&pending, std::slice::from_ref(&r.id), limits, dl())
            .await
            .unwrap();
        let claim = m.claim_idempotency("k", "v", minute, dl()).await.unwrap();
        assert_eq!(claim, None);

        assert_eq!(m.hand_back_running(limits, &HashSet::new()), 1);
        let image = m.export();
        let json = serde_json::to_string(&image).unwrap();
        let back = MemoryTasks::import(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(back.export(), image);

        let get = |id: TaskId| {
            let back = back.clone();
            async move { back.get(&id, dl()).await.unwrap().unwrap() }
        };
        let r2 = get(r.id.clone()).await;
        assert_eq!((r2.state, r2.attempts, r2.token), (State::Queued, 0, 1));
        assert_eq!(get(later.id.clone()).await.state, State::Scheduled);
        assert_eq!(get(pending.id.clone()).await.state, State::Pending);
        assert_eq!(
            back.dead_letters(&q, 10, dl()).await.unwrap(),
            [dead.id.to_string()]
        );
        assert_eq!(
            back.claim_idempotency("k", "other", minute, dl())
                .await
                .unwrap(),
            Some("v".into())
        );
        let stats = back.queue_stats(&q, dl()).await.unwrap();
        assert_eq!((stats.ready, stats.scheduled, stats.pending), (2, 1, 1));
        // the handed-back task runs, and its dependent is released
        let again = back
            .lease(&q, "w2", lease, &["run"], limits, dl())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.attempts, again.token), (1, 2));
        let succeeded = Outcome::Succeeded("1".into());
        back.finish(&again.id, again.token, &succeeded, "{}", limits, dl())
            .await
            .unwrap();
        assert_eq!(get(pending.id.clone()).await.state, State::Queued);
        // event positions go on from where they were
        let reader = back.event_reader(&q, Some("1"), dl()).await.unwrap();
        assert_eq!(reader.position(), "1");
    }

    /// A waiting task's expiry survives a save and load (its queue's
    /// expiring set with it): the loaded store's sweep ends it CANCELLED
    /// ("cancelled: expired") once it has passed, and not before.
    #[tokio::test]
    async fn an_expiry_survives_a_snapshot() {
        let m = MemoryTasks::default();
        let q = Category::Research.default_queue();
        let limits = TaskLimits::default();
        let mut t = task(&q, "t");
        let at = crate::store::unix_millis(std::time::SystemTime::now()) + 60_000;
        t.expire_ms = Some(at);
        m.submit(&t, Duration::ZERO, limits, dl()).await.unwrap();
        let json = serde_json::to_string(&m.export()).unwrap();
        assert_eq!(json.matches("\"expiring\"").count(), 1, "{json}");
        let back = MemoryTasks::import(serde_json::from_str(&json).unwrap()).unwrap();
        let state =
            |b: &MemoryTasks| b.read(|s, _| s.tasks.get(t.id.as_str()).map(|e| e.task.state));
        back.write(|s, now| s.recover(&q, false, limits, now));
        assert_eq!(state(&back), Some(State::Queued), "not yet");
        back.write(|s, now| s.recover(&q, false, limits, now + 61_000));
        let ended = back.get(&t.id, dl()).await.unwrap().unwrap();
        assert_eq!(ended.state, State::Cancelled);
        assert_eq!(ended.expire_ms, Some(at));
        assert!(
            ended.error.unwrap().contains("cancelled: expired"),
            "the cancel's form"
        );
    }

    /// A paused queue is still paused after a save and load (a queue that
    /// runs saves no pause field); the loaded store leases nothing from it.
    #[tokio::test]
    async fn a_pause_survives_a_snapshot() {
        let m = MemoryTasks::default();
        let queue = |name: &str| QueueName::parse(name).unwrap();
        let (q, other) = (queue("research"), queue("cache"));
        let limits = TaskLimits::default();
        let pause = crate::domain::Pause {
            by: "ops".into(),
            reason: "outage".into(),
            at_ms: 42,
        };
        m.set_pause(&q, Some(&pause), dl()).await.unwrap();
        m.set_pause(&other, None, dl()).await.unwrap();
        let t = task(&q, "t");
        m.submit(&t, Duration::ZERO, limits, dl()).await.unwrap();
        let json = serde_json::to_string(&m.export()).unwrap();
        assert_eq!(json.matches("\"paused\"").count(), 1, "{json}");
        let back = MemoryTasks::import(serde_json::from_str(&json).unwrap()).unwrap();
        let stats = back.queue_stats(&q, dl()).await.unwrap();
        assert_eq!((stats.ready, stats.paused), (1, Some(pause)));
        let lease = Duration::from_secs(60);
        assert_eq!(
            back.lease(&q, "w", lease, &["*"], limits, dl())
                .await
                .unwrap(),
            None
        );
        back.set_pause(&q, None, dl()).await.unwrap();
        let leased = back
            .lease(&q, "w", lease, &["*"], limits, dl())
            .await
            .unwrap();
        assert_eq!(leased.map(|l| l.id), Some(t.id));
    }
}
