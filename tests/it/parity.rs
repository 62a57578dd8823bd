//! The model-based parity test of the two task stores.
//!
//! Random sequences of operations (submits with and without dependencies
//! or an expiry, leases, heartbeats, progress, finishes of every kind,
//! finish-and-lease, give-backs, cancels, retries by hand, the passing of
//! time, recovery sweeps and trims) are applied to the Redis backend (the Lua scripts, on a
//! real redis-server) and to the embedded one, step by step. Every step's
//! result must be the same on both, and so must the final state: every task
//! as stored, each queue's figures, history (with its cap), dead letters,
//! active listings and the event log.
//!
//! **Time**: both stores run on one manual [`Clock`] that stands still
//! until an `Advance` step moves it, so leases lapse and tasks come due at
//! exactly the same instant on both, however slow the machine. (Redis
//! scripts take the pinned now instead of `TIME`; see `store::clock`.)
//!
//! **Engine steps**: where the engine, not the store, completes a
//! transition on Redis (releasing a task's dependents after it ends; the
//! sweep, which repairs pending tasks), the test runs the engine's own code
//! on both (`TaskEngine::release_dependents`, `TaskEngine::sweep`; the
//! embedded store has already released them and finds no dependents).
//!
//! Bounded in `scripts/test` (`PARITY_CASES` cases, 48 by default, of up to
//! 60 steps, from a fixed seed: the same cases every run); a longer run,
//! from a fresh seed: `PARITY_CASES=2000 PARITY_SEED=random cargo test
//! --test it parity::` (about 7 minutes here). A failure prints the seed
//! and the shrunk sequence of steps.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

use crate::common::TestRedis;
use koo::domain::Outcome;
use koo::domain::task::{Category, Priority, QueueName, State, Task, TaskId, TraceContext};
use koo::store::clock::Clock;
use koo::store::tasks::{EventReader, LeaseAsk, TaskLimits, TaskStore};
use koo::store::{Deadline, RedisConfig, RedisStore};
use koo::tasks::engine::{TaskConfig, TaskEngine};

/// Results and dead letters outlive any case: Redis expires keys on its
/// own real clock, which the manual clock does not move (see
/// `store::clock`), so expiry is compared elsewhere (`task_store::`), with
/// short real TTLs.
const KEPT_MS: u64 = 30 * 24 * 3600 * 1000;
/// The queues a case uses: two, so that dependencies cross queues (and, on
/// a Redis Cluster, hash slots).
const QUEUES: [&str; 2] = ["alpha", "beta"];
/// Task names; workers serve all, or one of them.
const NAMES: [&str; 2] = ["a", "b"];

/// Small caps, so that sequences reach them: history and dead letters are
/// trimmed at the cap on both stores.
fn limits() -> TaskLimits {
    TaskLimits {
        events: 100_000,
        history: 4,
        lease_scan: 3,
        dead_ttl: Duration::from_millis(KEPT_MS),
        flow: false,
        submit_wait_replicas: 0,
        submit_wait_timeout: Duration::from_millis(200),
    }
}

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(10))
}

/// How a held attempt ends.
#[derive(Debug, Clone, Copy)]
enum End {
    Succeed,
    /// Fails, worth retrying after this many seconds (budget permitting).
    Retry(u8),
    Fail,
    TimeOut,
    Cancelled,
}

/// One step.
#[derive(Debug, Clone)]
enum Step {
    Submit {
        queue: usize,
        name: usize,
        priority: u8,
        delay_s: u8,
        max_retries: u8,
        hard_s: u8,
        /// A dependency: an index into the tasks submitted so far.
        after: Option<usize>,
        /// Expires this long after its countdown (0: never).
        expire_s: u8,
    },
    Lease {
        queue: usize,
        /// 0: every name; 1, 2: one name.
        serves: usize,
        lease_s: u8,
    },
    Heartbeat {
        held: usize,
        stale: bool,
    },
    Progress {
        held: usize,
        stale: bool,
    },
    Finish {
        held: usize,
        end: End,
        stale: bool,
        /// Also lease the queue's next task in the same call.
        and_lease: bool,
    },
    GiveBack {
        held: usize,
    },
    Cancel {
        task: usize,
    },
    Retry {
        task: usize,
    },
    Advance {
        s: u16,
    },
    Sweep {
        acks_late: bool,
    },
    Trim {
        age_s: u16,
        dead_age_s: u16,
    },
    Look {
        task: usize,
    },
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        3 => Just(End::Succeed),
        2 => (1u8..30).prop_map(End::Retry),
        1 => Just(End::Fail),
        1 => Just(End::TimeOut),
        1 => Just(End::Cancelled),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..2usize, 0..2usize, 0..4u8, prop_oneof![3 => Just(0u8), 1 => 1u8..40], 0..3u8,
              prop_oneof![2 => Just(0u8), 1 => 5u8..60], prop::option::weighted(0.25, 0..64usize),
              prop_oneof![3 => Just(0u8), 1 => 1u8..90])
            .prop_map(|(queue, name, priority, delay_s, max_retries, hard_s, after, expire_s)| Step::Submit {
                queue, name, priority, delay_s, max_retries, hard_s, after, expire_s,
            }),
        6 => (0..2usize, 0..3usize, prop_oneof![Just(10u8), Just(45u8)])
            .prop_map(|(queue, serves, lease_s)| Step::Lease { queue, serves, lease_s }),
        2 => (0..8usize, prop::bool::weighted(0.2))
            .prop_map(|(held, stale)| Step::Heartbeat { held, stale }),
        1 => (0..8usize, prop::bool::weighted(0.2))
            .prop_map(|(held, stale)| Step::Progress { held, stale }),
        5 => (0..8usize, end(), prop::bool::weighted(0.1), any::<bool>())
            .prop_map(|(held, end, stale, and_lease)| Step::Finish { held, end, stale, and_lease }),
        1 => (0..8usize).prop_map(|held| Step::GiveBack { held }),
        2 => (0..64usize).prop_map(|task| Step::Cancel { task }),
        1 => (0..64usize).prop_map(|task| Step::Retry { task }),
        3 => prop_oneof![Just(1u16), Just(7), Just(20), Just(50), Just(4000)]
            .prop_map(|s| Step::Advance { s }),
        2 => any::<bool>().prop_map(|acks_late| Step::Sweep { acks_late }),
        1 => (prop_oneof![Just(0u16), Just(30), Just(600)], prop_oneof![Just(0u16), Just(3000)])
            .prop_map(|(age_s, dead_age_s)| Step::Trim { age_s, dead_age_s }),
        1 => (0..64usize).prop_map(|task| Step::Look { task }),
    ]
}

/// One backend under test, with the engine that completes its transitions
/// and a reader of each queue's events from the start.
struct Side {
    store: TaskStore,
    engine: TaskEngine,
    /// The same store with `acks_late` (a lapsed lease requeues).
    engine_late: TaskEngine,
    readers: Vec<EventReader>,
}

impl Side {
    async fn new(store: TaskStore) -> Self {
        let config = TaskConfig {
            limits: limits(),
            ..TaskConfig::default()
        };
        let engine = TaskEngine::new(store.clone(), config.clone());
        let engine_late = TaskEngine::new(
            store.clone(),
            TaskConfig {
                acks_late: true,
                ..config
            },
        );
        let mut readers = Vec::new();
        for q in QUEUES {
            let queue = QueueName::parse(q).unwrap();
            readers.push(store.event_reader(&queue, None, later()).await.unwrap());
        }
        Side {
            store,
            engine,
            engine_late,
            readers,
        }
    }
}

/// A case's world: the two sides, the tasks submitted (the same ids on
/// both) and the attempts held (task, token).
struct World {
    clock: Clock,
    sides: [Side; 2],
    tasks: Vec<TaskId>,
    held: Vec<(TaskId, u32)>,
}

fn queue(i: usize) -> QueueName {
    QueueName::parse(QUEUES[i % QUEUES.len()]).unwrap()
}

/// A task as a submit stores it (what the engine's `prepare` builds).
fn new_task(
    id: TaskId,
    created_ms: i64,
    name: usize,
    priority: u8,
    max_retries: u8,
    hard_s: u8,
) -> Task {
    let priority = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ][priority as usize % 4];
    Task {
        id,
        name: NAMES[name % NAMES.len()].into(),
        category: Category::Research,
        priority,
        args: "[1]".into(),
        kwargs: "{}".into(),
        state: State::Queued,
        depends_on: vec![],
        schedule: None,
        schedule_tick_ms: None,
        cache_result: None,
        attempts: 0,
        token: 0,
        takeovers: 0,
        max_retries: max_retries as u32,
        worker: None,
        progress: None,
        result: None,
        error: None,
        created_ms,
        started_ms: None,
        finished_ms: None,
        soft_ms: 0,
        hard_ms: hard_s as u64 * 1000,
        result_ttl_ms: KEPT_MS,
        log: vec![],
        // half the tasks carry a trace context (some with a tracestate),
        // which both stores keep through every transition
        trace: name.is_multiple_of(2).then(|| TraceContext {
            parent: format!("00-{:032x}-{:016x}-01", created_ms + 1, name + 1),
            state: name.is_multiple_of(4).then(|| "vendor=x".to_owned()),
        }),
        debounce_key: None,
        expire_ms: None,
        rate_limit_key: None,
        concurrency_key: None,
    }
}

/// A task with its log entries as JSON values (the Lua side writes them
/// with cjson, whose key order differs from serde's) and the same for its
/// JSON fields.
fn comparable(task: &Task) -> String {
    let json = |s: &Option<String>| {
        s.as_deref()
            .map(|t| serde_json::from_str::<serde_json::Value>(t).unwrap_or(t.into()))
    };
    let log: Vec<serde_json::Value> = task
        .log
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or(e.as_str().into()))
        .collect();
    let mut t = task.clone();
    t.log = vec![];
    let (progress, result, error) = (json(&t.progress), json(&t.result), json(&t.error));
    t.progress = None;
    t.result = None;
    t.error = None;
    format!("{t:?} progress={progress:?} result={result:?} error={error:?} log={log:?}")
}

fn outcome(end: End) -> Outcome {
    let error = |m: &str, retryable: bool| {
        serde_json::json!({ "message": m, "retryable": retryable }).to_string()
    };
    match end {
        End::Succeed => Outcome::Succeeded("{\"ok\":true}".into()),
        End::Retry(s) => Outcome::Retry {
            error: error("flaky", true),
            delay: Duration::from_secs(s as u64),
        },
        End::Fail => Outcome::Failed(error("broken", false)),
        End::TimeOut => Outcome::TimedOut(error("hard time limit reached", false)),
        End::Cancelled => Outcome::Cancelled(error("cancelled", false)),
    }
}

impl World {
    async fn new(redis: &RedisStore, case: u64) -> Self {
        // from the real now: Redis sets some expiries at absolute times
        let clock = Clock::manual(koo::store::unix_millis(std::time::SystemTime::now()));
        let prefix = format!("parity{case}");
        let on_redis = TaskStore::redis_with_clock(redis.clone(), &prefix, clock.clone());
        let in_memory = TaskStore::memory_with_clock(clock.clone());
        World {
            sides: [Side::new(on_redis).await, Side::new(in_memory).await],
            clock,
            tasks: vec![],
            held: vec![],
        }
    }

    fn task(&self, i: usize) -> Option<TaskId> {
        (!self.tasks.is_empty()).then(|| self.tasks[i % self.tasks.len()].clone())
    }

    /// The held attempt `i` refers to, and its token (one ahead when stale).
    fn held(&self, i: usize, stale: bool) -> Option<(TaskId, u32)> {
        if self.held.is_empty() {
            return None;
        }
        let (id, token) = self.held[i % self.held.len()].clone();
        Some((id, if stale { token + 1 } else { token }))
    }

    /// Runs `step` on both sides: what each saw, as text. A submit's id
    /// (and its dependency) is chosen once, for both.
    async fn apply(&mut self, step: &Step) -> [String; 2] {
        if let Step::Advance { s } = step {
            self.clock.advance(Duration::from_secs(*s as u64));
        }
        let submit = match step {
            Step::Submit {
                queue: q, after, ..
            } => Some(Submit {
                id: TaskId::generate(&queue(*q)),
                after: after.and_then(|a| self.task(a)),
            }),
            _ => None,
        };
        let mut seen = [String::new(), String::new()];
        for (i, out) in seen.iter_mut().enumerate() {
            *out = self.apply_on(i, step, submit.as_ref()).await;
        }
        if let Some(submit) = submit {
            self.tasks.push(submit.id);
        }
        self.remember(step, &seen[1]);
        seen
    }

    /// Bookkeeping shared by both sides: new tasks and held attempts (read
    /// from the embedded side's answer; the sides agreed or the case failed).
    fn remember(&mut self, step: &Step, seen: &str) {
        if let Step::Finish { held, .. } | Step::GiveBack { held } = step
            && !self.held.is_empty()
            && !seen.contains("fenced")
        {
            let i = held % self.held.len();
            self.held.remove(i);
        }
        if let Some(lease) = seen.split("leased ").nth(1) {
            let mut parts = lease.split_whitespace();
            if let (Some(id), Some(token)) = (parts.next(), parts.next()) {
                let id = TaskId::parse(id).unwrap();
                self.held.retain(|(h, _)| *h != id);
                self.held.push((id, token.parse().unwrap()));
            }
        }
    }

    async fn apply_on(&self, side: usize, step: &Step, submit: Option<&Submit>) -> String {
        let s = &self.sides[side];
        let store = &s.store;
        match step {
            Step::Submit {
                name,
                priority,
                delay_s,
                max_retries,
                hard_s,
                expire_s,
                ..
            } => {
                let submit = submit.expect("a submit's id is chosen in apply");
                let mut task = new_task(
                    submit.id.clone(),
                    self.clock.now_ms(),
                    *name,
                    *priority,
                    *max_retries,
                    *hard_s,
                );
                let delay = Duration::from_secs(*delay_s as u64);
                if *expire_s > 0 {
                    // after its countdown, as the engine requires
                    let after_ms = (u64::from(*delay_s) + u64::from(*expire_s)) * 1000;
                    task.expire_ms = Some(self.clock.now_ms() + after_ms as i64);
                }
                if let Some(dep) = submit.after.clone() {
                    task.depends_on = vec![dep.to_string()];
                    let reply = store.depend_on(&dep, &task.id, later()).await.unwrap();
                    let stored = match reply {
                        koo::store::tasks::DependReply::Waiting => {
                            task.state = State::Pending;
                            store
                                .submit_pending(
                                    &task,
                                    std::slice::from_ref(&dep),
                                    limits(),
                                    later(),
                                )
                                .await
                        }
                        koo::store::tasks::DependReply::Ended(State::Succeeded) => {
                            store.submit(&task, delay, limits(), later()).await
                        }
                        _ => return format!("refused: {reply:?}"),
                    };
                    format!("stored {:?} after {reply:?}", stored.is_ok())
                } else {
                    let stored = store.submit(&task, delay, limits(), later()).await;
                    format!("stored {:?}", stored.is_ok())
                }
            }
            Step::Lease {
                queue: q,
                serves,
                lease_s,
            } => {
                let names: &[&str] = match serves {
                    0 => &["*"],
                    1 => &["a"],
                    _ => &["b"],
                };
                let leased = store
                    .lease(
                        &queue(*q),
                        "w1",
                        Duration::from_secs(*lease_s as u64),
                        names,
                        limits(),
                        later(),
                    )
                    .await
                    .unwrap();
                match leased {
                    Some(t) => format!("leased {} {} {}", t.id, t.token, comparable(&t)),
                    None => "nothing".into(),
                }
            }
            Step::Heartbeat { held, stale } => {
                let Some((id, token)) = self.held(*held, *stale) else {
                    return "none held".into();
                };
                let beat = store
                    .heartbeat(&id, token, Duration::from_secs(10), later())
                    .await
                    .unwrap();
                format!("{beat:?}")
            }
            Step::Progress { held, stale } => {
                let Some((id, token)) = self.held(*held, *stale) else {
                    return "none held".into();
                };
                let ok = store
                    .progress(&id, token, "{\"percent\":50}", limits(), later())
                    .await
                    .unwrap();
                format!("progress {ok}")
            }
            Step::Finish {
                held,
                end,
                stale,
                and_lease,
            } => self.finish(side, *held, *end, *stale, *and_lease).await,
            Step::GiveBack { held } => {
                let Some((id, token)) = self.held(*held, false) else {
                    return "none held".into();
                };
                let log = serde_json::json!({ "outcome": "released", "worker": "w1" }).to_string();
                match store.release(&id, token, &log, limits(), later()).await {
                    Ok(true) => "released".into(),
                    Ok(false) => "fenced".into(),
                    Err(e) => format!("error {e}"),
                }
            }
            Step::Cancel { task } => {
                let Some(id) = self.task(*task) else {
                    return "no tasks".into();
                };
                let reply = store.cancel(&id, "by the test", limits(), later()).await;
                let reply = reply.unwrap();
                if reply == koo::store::tasks::CancelReply::Cancelled {
                    s.engine
                        .release_dependents(&id, State::Cancelled, later())
                        .await
                        .unwrap();
                }
                format!("{reply:?}")
            }
            Step::Retry { task } => {
                let Some(id) = self.task(*task) else {
                    return "no tasks".into();
                };
                format!("{:?}", store.retry(&id, limits(), later()).await.unwrap())
            }
            Step::Advance { .. } => "advanced".into(),
            Step::Sweep { acks_late } => {
                // the engine's own sweep: every queue's lapsed leases and
                // due tasks, then every queue's pending tasks
                let engine = if *acks_late {
                    &s.engine_late
                } else {
                    &s.engine
                };
                let queues: Vec<QueueName> = (0..QUEUES.len()).map(queue).collect();
                format!("recovered {:?}", engine.sweep(&queues).await)
            }
            Step::Trim { age_s, dead_age_s } => {
                let now = self.clock.now_ms();
                let mut trimmed = Vec::new();
                for q in 0..QUEUES.len() {
                    let t = store
                        .trim(
                            &queue(q),
                            now - *age_s as i64 * 1000,
                            now - *dead_age_s as i64 * 1000,
                            limits(),
                            later(),
                        )
                        .await
                        .unwrap();
                    // events are trimmed approximately on Redis (MAXLEN ~)
                    trimmed.push((t.history, t.dead));
                }
                format!("trimmed {trimmed:?}")
            }
            Step::Look { task } => {
                let Some(id) = self.task(*task) else {
                    return "no tasks".into();
                };
                match store.get(&id, later()).await.unwrap() {
                    Some(t) => comparable(&t),
                    None => "gone".into(),
                }
            }
        }
    }

    async fn finish(
        &self,
        side: usize,
        held: usize,
        end: End,
        stale: bool,
        and_lease: bool,
    ) -> String {
        let s = &self.sides[side];
        let Some((id, token)) = self.held(held, stale) else {
            return "none held".into();
        };
        let log =
            serde_json::json!({ "attempt": token, "worker": "w1", "outcome": "x" }).to_string();
        let outcome = outcome(end);
        let (ended, next) = if and_lease {
            let next = LeaseAsk {
                worker: "w1",
                lease: Duration::from_secs(10),
                names: &["*"],
            };
            match s
                .store
                .finish_and_lease(&id, token, &outcome, &log, &next, limits(), later())
                .await
                .unwrap()
            {
                Some((ended, next)) => (Some(ended), next.task()),
                None => (None, None),
            }
        } else {
            let ended = s
                .store
                .finish(&id, token, &outcome, &log, limits(), later())
                .await
                .unwrap();
            (ended, None)
        };
        let Some((state, waited_on)) = ended else {
            return "fenced".into();
        };
        if waited_on {
            s.engine
                .release_dependents(&id, state, later())
                .await
                .unwrap();
        }
        match next {
            Some(t) => format!(
                "ended {state:?}; leased {} {} {}",
                t.id,
                t.token,
                comparable(&t)
            ),
            None => format!("ended {state:?}"),
        }
    }

    /// Everything either side can be asked about the end state, as text.
    async fn final_state(&mut self, side: usize) -> BTreeMap<String, String> {
        let mut seen = BTreeMap::new();
        let tasks = self.tasks.clone();
        let s = &mut self.sides[side];
        for id in &tasks {
            let t = s.store.get(id, later()).await.unwrap();
            seen.insert(
                format!("task {id}"),
                t.as_ref().map_or("gone".into(), comparable),
            );
        }
        for q in 0..QUEUES.len() {
            let queue = queue(q);
            let stats = s.store.queue_stats(&queue, later()).await.unwrap();
            seen.insert(format!("{queue} stats"), format!("{stats:?}"));
            let times = s.store.task_times(&queue, later()).await.unwrap();
            seen.insert(format!("{queue} times"), format!("{times:?}"));
            let history = s
                .store
                .history_page(&queue, i64::MAX, None, 0, 1000, later())
                .await
                .unwrap()
                .into_iter()
                .map(|(id, ms, summary)| {
                    let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
                    format!("{id} {ms} {v}")
                })
                .collect::<Vec<_>>();
            seen.insert(format!("{queue} history"), format!("{history:?}"));
            let dead = s.store.dead_letters(&queue, 1000, later()).await.unwrap();
            seen.insert(format!("{queue} dead"), format!("{dead:?}"));
            for set in 0..3 {
                let (ids, next) = s
                    .store
                    .list_active(&queue, set, 0, 1000, later())
                    .await
                    .unwrap();
                let ids: Vec<String> = ids.iter().map(|t| t.id.to_string()).collect();
                seen.insert(format!("{queue} active {set}"), format!("{ids:?} {next:?}"));
            }
            // Each task's events, in order. The interleaving of different
            // tasks' events is not promised: on Redis a dependent released
            // by the engine after its dependency's script (or by another
            // koo process) is logged later than the embedded store, which
            // releases it inside the same critical section.
            let mut events: BTreeMap<String, Vec<String>> = BTreeMap::new();
            loop {
                let batch = s.readers[q]
                    .next(Duration::from_millis(20), 1000)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    break;
                }
                for e in batch {
                    let seen = format!("{} {} {:?} {}", e.name, e.state, e.progress, e.at_ms);
                    events.entry(e.id).or_default().push(seen);
                }
            }
            seen.insert(format!("{queue} events"), format!("{events:#?}"));
        }
        seen
    }
}

/// A submit's id and dependency, the same on both sides.
struct Submit {
    id: TaskId,
    after: Option<TaskId>,
}

/// Runs one case: every step on both sides, then the final states.
async fn run_case(redis: &RedisStore, case: u64, steps: &[Step]) -> Result<(), TestCaseError> {
    let mut world = World::new(redis, case).await;
    for (n, step) in steps.iter().enumerate() {
        let [on_redis, in_memory] = world.apply(step).await;
        prop_assert_eq!(on_redis, in_memory, "step {} ({:?}) differs", n, step);
    }
    let on_redis = world.final_state(0).await;
    let in_memory = world.final_state(1).await;
    for (what, seen) in &on_redis {
        prop_assert_eq!(
            Some(seen),
            in_memory.get(what),
            "final state differs: {}",
            what
        );
    }
    prop_assert_eq!(on_redis.len(), in_memory.len());
    Ok(())
}

/// Random step sequences leave the Redis and embedded task stores in the
/// same observable state, step by step and at the end.
#[test]
fn redis_and_embedded_task_stores_agree_on_every_sequence() {
    let cases: u32 = std::env::var("PARITY_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(48);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = rt.block_on(TestRedis::start());
    // the pool spawns its connection tasks on the runtime
    let store = rt.block_on(async { RedisStore::connect(&RedisConfig::new(redis.url())).unwrap() });
    let (mut runner, seed) = runner(Config {
        cases,
        max_shrink_iters: 500,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&prop::collection::vec(step(), 1..60), |steps| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(run_case(&store, n, &steps))
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, steps)) => {
            panic!(
                "the stores disagree (PARITY_SEED={seed}): {why}\nshrunk steps ({}):\n{steps:#?}",
                steps.len()
            )
        }
        Err(e) => panic!("{e}"),
    }
}

/// The cases' random source: a fixed seed unless `PARITY_SEED` names
/// another (a number) or asks for a fresh one (`random`, for the longer
/// runs), so that the suite tries the same cases on every run and CI never
/// fails on a sequence no earlier run tried. A failure prints the seed.
fn runner(config: Config) -> (TestRunner, String) {
    match std::env::var("PARITY_SEED").as_deref() {
        Ok("random") => (TestRunner::new(config), "random".into()),
        other => {
            let n: u64 = other.ok().and_then(|s| s.parse().ok()).unwrap_or(14);
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&n.to_le_bytes());
            let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
            (TestRunner::new_with_rng(config, rng), n.to_string())
        }
    }
}
