//! The task engine and built-in worker pool, each scenario on a real
//! redis-server and on the embedded store: tasks run to an end state, retries follow the backoff, soft and hard time
//! limits hold (even for a handler that ignores cancellation), a paused
//! worker is fenced, and two pools drain one queue with every task done once.

use crate::common;

use std::time::Duration;

use common::TestRedis;
use koo::domain::task::{Category, QueueName, State, Task};
use koo::store::tasks::TaskStore;
use koo::store::{Deadline, RedisConfig, RedisStore};
use koo::tasks::engine::{Finish, NewTask, TaskConfig, TaskEngine, TaskError};
use koo::tasks::handlers::{self, FAIL_TIMES, NOOP, SLEEP, STUBBORN};
use koo::tasks::retry::Backoff;
use koo::tasks::worker::{Registry, WorkerPool};
use tokio_util::sync::CancellationToken;

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

fn config() -> TaskConfig {
    TaskConfig {
        lease: Duration::from_millis(600),
        sweep_interval: Duration::from_millis(50),
        poll_interval: Duration::from_millis(20),
        backoff: Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        ..TaskConfig::default()
    }
}

fn queue() -> QueueName {
    Category::Research.default_queue()
}

/// Where a test's tasks live.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    Redis,
    Cluster,
}

/// The Redis a test's engines share: one server or a Cluster.
enum Held {
    Redis(TestRedis),
    Cluster(common::cluster::TestCluster),
}

impl Held {
    fn url(&self) -> String {
        match self {
            Held::Redis(r) => r.url(),
            Held::Cluster(c) => c.url(),
        }
    }
}

/// For each `async fn scenario(backend: Backend)`, a test on the embedded
/// store and one on Redis.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name(super::Backend::Memory).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name(super::Backend::Redis).await;
                }
            }
        )*
    };
}

on_both!(
    tasks_run_to_success_with_progress,
    retries_follow_the_backoff_schedule,
    soft_and_hard_time_limits,
    a_paused_worker_is_fenced,
    two_pools_drain_a_queue_exactly_once,
    bad_submits_and_ids,
    history_pages_through_same_millisecond_ties,
    a_task_outliving_its_lease_with_heartbeats_runs_once,
    a_missed_dependency_release_is_repaired_by_the_sweep,
);

/// Scenarios on a Redis Cluster too: `task_engine::cluster::<scenario>`
/// (every scenario above passed there; these five keep the Cluster cases'
/// wall time bounded).
mod cluster {
    macro_rules! on_cluster {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Cluster).await;
                }
            )*
        };
    }

    on_cluster!(
        tasks_run_to_success_with_progress,
        retries_follow_the_backoff_schedule,
        soft_and_hard_time_limits,
        a_paused_worker_is_fenced,
        two_pools_drain_a_queue_exactly_once,
    );
}

/// An engine on `backend`, and its Redis if any.
async fn engine(backend: Backend) -> (Option<Held>, TaskEngine) {
    let held = match backend {
        Backend::Memory => return (None, TaskEngine::new(TaskStore::memory(), config())),
        Backend::Redis => Held::Redis(TestRedis::start().await),
        Backend::Cluster => Held::Cluster(common::cluster::TestCluster::start().await),
    };
    let engine = redis_engine(&held.url());
    (Some(held), engine)
}

fn redis_engine(url: &str) -> TaskEngine {
    let store = RedisStore::connect(&RedisConfig::new(url)).unwrap();
    TaskEngine::new(TaskStore::redis(store, "koo"), config())
}

struct Koo {
    engine: TaskEngine,
    stop: CancellationToken,
    _redis: Option<Held>,
}

impl Koo {
    /// An engine with `pools` worker pools of `concurrency` slots and a
    /// recovery loop, all on one fresh store.
    async fn start(backend: Backend, pools: usize, concurrency: usize) -> Koo {
        let (redis, engine) = self::engine(backend).await;
        let stop = CancellationToken::new();
        for _ in 0..pools {
            let mut registry = Registry::default();
            handlers::register_diagnostics(&mut registry);
            // on Redis each pool gets its own engine and connections, as
            // separate processes would
            let pool_engine = match &redis {
                Some(held) => redis_engine(&held.url()),
                None => engine.clone(),
            };
            let pool = WorkerPool::new(pool_engine, registry, vec![queue()], concurrency);
            tokio::spawn(pool.run(stop.clone()));
        }
        tokio::spawn(engine.clone().run_recovery(vec![queue()], stop.clone()));
        Koo {
            engine,
            stop,
            _redis: redis,
        }
    }

    async fn submit(
        &self,
        name: &str,
        kwargs: serde_json::Value,
        adjust: impl FnOnce(&mut NewTask),
    ) -> Task {
        let mut new = NewTask::new(name, Category::Research);
        new.kwargs = kwargs.to_string();
        adjust(&mut new);
        self.engine.submit(new, later()).await.unwrap()
    }

    /// Waits for a task to end by following its queue's events (an event,
    /// not a timer), then returns it.
    async fn wait_final(&self, task: &Task) -> Task {
        common::tasks::wait_final(&self.engine, task).await
    }
}

impl Drop for Koo {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A no-op runs to SUCCEEDED with one attempt; progress reports land on the
/// task as the sleep handler goes.
async fn tasks_run_to_success_with_progress(backend: Backend) {
    let koo = Koo::start(backend, 1, 2).await;
    let noop = koo.submit(NOOP, serde_json::json!({}), |_| {}).await;
    let sleep = koo
        .submit(
            SLEEP,
            serde_json::json!({ "seconds": 0.2, "steps": 4 }),
            |_| {},
        )
        .await;
    let done = koo.wait_final(&noop).await;
    assert_eq!((done.state, done.attempts), (State::Succeeded, 1));
    assert_eq!(done.result.as_deref(), Some("null"));
    let slept = koo.wait_final(&sleep).await;
    assert_eq!(slept.state, State::Succeeded);
    let progress: serde_json::Value =
        serde_json::from_str(slept.progress.as_deref().unwrap()).unwrap();
    assert_eq!(progress["percent"], 100.0);
    assert_eq!(progress["message"], "step 4 of 4");
}

/// Retryable failures are retried with growing backoff until the handler
/// succeeds; the log records each failed attempt's retry time.
async fn retries_follow_the_backoff_schedule(backend: Backend) {
    let koo = Koo::start(backend, 1, 1).await;
    let task = koo
        .submit(FAIL_TIMES, serde_json::json!({ "failures": 3 }), |_| {})
        .await;
    let done = koo.wait_final(&task).await;
    assert_eq!(done.state, State::Succeeded);
    assert_eq!(done.attempts, 4);
    assert_eq!(done.result.as_deref(), Some("{\"attempt\":4}"));
    assert_eq!(
        done.error, None,
        "a success clears the earlier attempts' error"
    );
    let log: Vec<serde_json::Value> = done
        .log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 4);
    let waits: Vec<i64> = log[..3]
        .iter()
        .map(|e| e["retry_at_ms"].as_i64().unwrap() - e["ended_ms"].as_i64().unwrap())
        .collect();
    // base 20 ms doubling, with jitter in [ceiling/2, ceiling]
    for (i, wait) in waits.iter().enumerate() {
        let ceiling = 20 << i;
        assert!(
            *wait >= ceiling / 2 && *wait <= ceiling,
            "retry {i}: waited {wait} ms, ceiling {ceiling}"
        );
    }
    // zero retries means one attempt
    let once = koo
        .submit(FAIL_TIMES, serde_json::json!({ "failures": 1 }), |t| {
            t.max_retries = Some(0)
        })
        .await;
    let failed = koo.wait_final(&once).await;
    assert_eq!((failed.state, failed.attempts), (State::Failed, 1));
}

/// At the soft limit a cooperative handler is told to stop (and its error is
/// recorded); a handler that ignores cancellation is abandoned at the hard
/// limit, the task ends TIMED_OUT, and the slot runs the next task while the
/// abandoned thread still sleeps.
async fn soft_and_hard_time_limits(backend: Backend) {
    let koo = Koo::start(backend, 1, 1).await;
    let soft = koo
        .submit(SLEEP, serde_json::json!({ "seconds": 30 }), |t| {
            t.soft_time_limit = Some(Duration::from_millis(100));
            t.time_limit = Some(Duration::from_secs(20));
            t.max_retries = Some(0);
        })
        .await;
    let done = koo.wait_final(&soft).await;
    assert_eq!(done.state, State::Failed);
    assert!(done.error.unwrap().contains("soft time limit"));
    let stubborn = koo
        .submit(STUBBORN, serde_json::json!({ "seconds": 2 }), |t| {
            t.soft_time_limit = Some(Duration::from_millis(50));
            t.time_limit = Some(Duration::from_millis(200));
        })
        .await;
    let next = koo.submit(NOOP, serde_json::json!({}), |_| {}).await;
    let timed_out = koo.wait_final(&stubborn).await;
    assert_eq!(timed_out.state, State::TimedOut);
    assert_eq!(koo.wait_final(&next).await.state, State::Succeeded);
}

/// A worker paused past its lease (it holds the task but sends no
/// heartbeats) is fenced: the task is recovered and completed by the pool,
/// and the paused worker's late completion is refused, so the first result
/// stays.
async fn a_paused_worker_is_fenced(backend: Backend) {
    let (redis, engine) = engine(backend).await;
    let task = engine
        .submit(NewTask::new(NOOP, Category::Research), later())
        .await
        .unwrap();
    let zombie = engine
        .lease(&queue(), "zombie", &["*"], later())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(zombie.id, task.id);
    // the pool starts only now, so the zombie's lease is the first
    let stop = CancellationToken::new();
    let mut registry = Registry::default();
    handlers::register_diagnostics(&mut registry);
    tokio::spawn(WorkerPool::new(engine.clone(), registry, vec![queue()], 1).run(stop.clone()));
    tokio::spawn(engine.clone().run_recovery(vec![queue()], stop.clone()));
    let koo = Koo {
        engine: engine.clone(),
        stop,
        _redis: redis,
    };
    let done = koo.wait_final(&task).await;
    assert_eq!((done.state, done.attempts), (State::Succeeded, 2));
    let late = engine
        .finish(
            &zombie,
            1,
            "zombie",
            Finish::Succeeded("\"zombie\"".into()),
            later(),
        )
        .await
        .unwrap_err();
    assert!(matches!(late, TaskError::Fenced(_)), "{late:?}");
    assert_eq!(
        engine
            .get(task.id.as_str(), later())
            .await
            .unwrap()
            .result
            .as_deref(),
        Some("null")
    );
}

/// Two worker pools (as two koo processes would) drain one queue of 1000
/// tasks: every task succeeds, each after exactly one attempt.
async fn two_pools_drain_a_queue_exactly_once(backend: Backend) {
    let koo = Koo::start(backend, 2, 4).await;
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        tasks.push(koo.submit(NOOP, serde_json::json!({}), |_| {}).await);
    }
    for task in &tasks {
        let done = koo.wait_final(task).await;
        assert_eq!(
            (done.state, done.attempts),
            (State::Succeeded, 1),
            "{}",
            task.id
        );
        assert_eq!(done.log.len(), 1);
    }
}

/// Bad submits are refused naming the field; unknown and malformed ids are
/// told apart.
async fn bad_submits_and_ids(backend: Backend) {
    let (_redis, engine) = engine(backend).await;
    let cases: Vec<(NewTask, &str)> = vec![
        (NewTask::new("", Category::Cache), "name"),
        (
            NewTask {
                args: "{}".into(),
                ..NewTask::new("x", Category::Cache)
            },
            "args",
        ),
        (
            NewTask {
                kwargs: "[]".into(),
                ..NewTask::new("x", Category::Cache)
            },
            "kwargs",
        ),
        (
            NewTask {
                args: "[".into(),
                ..NewTask::new("x", Category::Cache)
            },
            "args",
        ),
        (
            NewTask {
                soft_time_limit: Some(Duration::from_secs(10)),
                time_limit: Some(Duration::from_secs(5)),
                ..NewTask::new("x", Category::Cache)
            },
            "soft_time_limit",
        ),
    ];
    for (new, field) in cases {
        match engine.submit(new.clone(), later()).await {
            Err(TaskError::InvalidArgument { field: f, .. }) => assert_eq!(f, field, "{new:?}"),
            other => panic!("{new:?}: {other:?}"),
        }
    }
    assert!(matches!(
        engine.get("nonsense", later()).await,
        Err(TaskError::InvalidArgument { .. })
    ));
    let unknown = koo::domain::task::TaskId::generate(&queue());
    assert!(matches!(
        engine.get(unknown.as_str(), later()).await,
        Err(TaskError::NotFound(_))
    ));
}

/// History pages exactly even when many tasks ended in the same
/// millisecond (one recovery sweep ends up to a hundred at once).
async fn history_pages_through_same_millisecond_ties(backend: Backend) {
    use koo::tasks::listing::HistoryFilter;
    let (_redis, engine) = engine(backend).await;
    let mut submitted = Vec::new();
    for _ in 0..90 {
        let mut new = NewTask::new(NOOP, Category::Research);
        new.max_retries = Some(0);
        submitted.push(engine.submit(new, later()).await.unwrap().id.to_string());
    }
    // lease everything with leases that lapse at once, then one sweep fails
    // them all (acks early), in the same millisecond
    let store = engine.store();
    let mut last_started = 0;
    for _ in 0..90 {
        let leased = store
            .lease(
                &queue(),
                "w",
                Duration::from_millis(1),
                &["*"],
                Default::default(),
                later(),
            )
            .await
            .unwrap()
            .unwrap();
        last_started = leased.started_ms.unwrap();
    }
    // every lease has lapsed once the clock passes the last one's end, so
    // the first sweep finds them all
    while koo::store::unix_millis(std::time::SystemTime::now()) <= last_started + 1 {
        tokio::task::yield_now().await;
    }
    let until = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    let mut recovered = 0;
    while recovered < 90 {
        recovered += store
            .recover(&queue(), false, Default::default(), later())
            .await
            .unwrap()
            .handled;
        assert!(tokio::time::Instant::now() < until, "leases never lapsed");
        tokio::task::yield_now().await;
    }
    let filter = HistoryFilter {
        queues: vec![queue()],
        state: None,
        category: None,
        name: None,
        since_ms: 0,
        before_ms: i64::MAX / 2,
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = engine
            .list_history(&filter, 7, &token, later())
            .await
            .unwrap();
        seen.extend(page.into_iter().map(|s| (s.id, s.finished_ms)));
        if next.is_empty() {
            break;
        }
        token = next;
    }
    // the scenario needs many ties (more than the 64 an earlier version
    // could step over)
    let mut per_ms = std::collections::HashMap::<i64, usize>::new();
    for (_, ms) in &seen {
        *per_ms.entry(*ms).or_default() += 1;
    }
    assert!(
        per_ms.values().any(|n| *n > 64),
        "not enough ties: {per_ms:?}"
    );
    let mut ids: Vec<String> = seen.into_iter().map(|(id, _)| id).collect();
    ids.sort();
    submitted.sort();
    assert_eq!(ids, submitted);
}

/// A task that runs five times longer than its lease, heartbeating, is
/// never handed to another worker: one attempt, even with a second pool
/// looking for work all along.
async fn a_task_outliving_its_lease_with_heartbeats_runs_once(backend: Backend) {
    let koo = Koo::start(backend, 2, 1).await;
    let lease = config().lease;
    let task = koo
        .submit(
            SLEEP,
            serde_json::json!({ "seconds": (lease * 5).as_secs_f64(), "steps": 5 }),
            |_| {},
        )
        .await;
    let done = koo.wait_final(&task).await;
    assert_eq!(
        (done.state, done.attempts),
        (State::Succeeded, 1),
        "{done:?}"
    );
    assert_eq!(done.log.len(), 1, "{:?}", done.log);
}

/// A process that dies between a dependency's success and its dependent's
/// release (simulated by ending the dependency with the store's own finish,
/// which releases nothing on Redis) is repaired by the recovery sweep: the
/// dependent is queued anyway.
async fn a_missed_dependency_release_is_repaired_by_the_sweep(backend: Backend) {
    let koo = Koo::start(backend, 0, 1).await;
    let first = koo.submit(NOOP, serde_json::json!({}), |_| {}).await;
    let dependent = koo
        .submit(NOOP, serde_json::json!({}), |t| {
            t.depends_on = vec![first.id.to_string()];
        })
        .await;
    assert_eq!(dependent.state, State::Pending);
    let mut events = koo
        .engine
        .store()
        .event_reader(&dependent.id.queue(), None, later())
        .await
        .unwrap();
    let leased = koo
        .engine
        .lease(&queue(), "w", &["*"], later())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leased.id, first.id);
    let ended = koo
        .engine
        .store()
        .finish(
            &first.id,
            leased.token,
            &koo::domain::Outcome::Succeeded("1".into()),
            "{}",
            Default::default(),
            later(),
        )
        .await
        .unwrap();
    assert_eq!(ended.map(|(state, _)| state), Some(State::Succeeded));
    let until = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    loop {
        let now = koo
            .engine
            .get(dependent.id.as_str(), later())
            .await
            .unwrap();
        if now.state == State::Queued {
            break;
        }
        assert_eq!(now.state, State::Pending);
        assert!(tokio::time::Instant::now() < until, "never released");
        events.next(Duration::from_millis(500), 1000).await.unwrap();
    }
}
