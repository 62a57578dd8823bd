//! Helpers for the task tests: a koo server on either store with short
//! task intervals, `koo worker` processes, and waiting on tasks through
//! WatchTask (an event, not a timer).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use koo::domain::task::{Category, Priority, QueueName, State, Task, TaskId};
use koo::pb::tasks::v1::{self as pb, task_service_client::TaskServiceClient};
use koo::server::Settings;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{TestRedis, TestServer, memory_settings, redis_settings, test_settings};

pub const KOO: &str = env!("CARGO_BIN_EXE_koo");

/// Where a test's tasks live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    /// A Redis Cluster (three masters, three replicas): see
    /// [`on_cluster_too!`](crate::on_cluster_too).
    Cluster,
}

/// A task store on `backend` with a clock the test can move (leases lapse
/// and tokens free without waiting), for the store-level suites
/// (`task_store`, `flow_store`): the Redis under it (kept as long as the
/// store), the store, and its clock.
pub async fn clocked_store(
    backend: Backend,
) -> (
    Option<TestRedis>,
    koo::store::tasks::TaskStore,
    koo::store::clock::Clock,
) {
    use koo::store::tasks::TaskStore;
    let clock = koo::store::clock::Clock::system();
    match backend {
        Backend::Memory => (None, TaskStore::memory_with_clock(clock.clone()), clock),
        Backend::Cluster => {
            unreachable!("a Cluster's store keeps its cluster: clocked_cluster_store")
        }
        Backend::Redis => {
            let redis = TestRedis::start().await;
            let config = koo::store::RedisConfig::new(redis.url());
            let store = koo::store::RedisStore::connect(&config).unwrap();
            let tasks = TaskStore::redis_with_clock(store, "koo", clock.clone());
            (Some(redis), tasks, clock)
        }
    }
}

/// [`clocked_store`] on a fresh Redis Cluster (three masters, three
/// replicas): the cluster (kept as long as the store), the store, its
/// clock.
pub async fn clocked_cluster_store() -> (
    super::cluster::TestCluster,
    koo::store::tasks::TaskStore,
    koo::store::clock::Clock,
) {
    let cluster = super::cluster::TestCluster::start().await;
    let clock = koo::store::clock::Clock::system();
    let config = koo::store::RedisConfig::new(cluster.url());
    let store = koo::store::RedisStore::connect(&config).unwrap();
    let tasks = koo::store::tasks::TaskStore::redis_with_clock(store, "koo", clock.clone());
    (cluster, tasks, clock)
}

/// Follows `task`'s queue events until it has ended (an event, not a
/// timer), failing after [`super::EVENT_TIMEOUT`]; the task then.
pub async fn wait_final(
    engine: &koo::tasks::engine::TaskEngine,
    task: &koo::domain::task::Task,
) -> koo::domain::task::Task {
    let deadline = || koo::store::Deadline::after(std::time::Duration::from_secs(5));
    let mut events = engine
        .store()
        .event_reader(&task.id.queue(), None, deadline())
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + super::EVENT_TIMEOUT;
    loop {
        let current = engine.get(task.id.as_str(), deadline()).await.unwrap();
        if current.state.is_final() {
            return current;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "task never ended: {current:?}"
        );
        events
            .next(std::time::Duration::from_millis(500), 1000)
            .await
            .unwrap();
    }
}

/// A store on a [`Backend`] for the store-level suites, with the Redis or
/// Cluster under it kept as long as the store.
pub struct HeldStore {
    pub store: koo::store::tasks::TaskStore,
    pub redis: Option<TestRedis>,
    pub cluster: Option<super::cluster::TestCluster>,
}

impl HeldStore {
    pub async fn on(backend: Backend) -> Self {
        let (redis, cluster, store) = match backend {
            Backend::Cluster => {
                let (cluster, store, _) = clocked_cluster_store().await;
                (None, Some(cluster), store)
            }
            other => {
                let (redis, store, _) = clocked_store(other).await;
                (redis, None, store)
            }
        };
        Self {
            store,
            redis,
            cluster,
        }
    }
}

/// A koo server and, on Redis, its Redis.
pub struct Koo {
    pub redis: Option<TestRedis>,
    pub server: TestServer,
    /// The Redis Cluster, on [`Backend::Cluster`].
    pub cluster: Option<super::cluster::TestCluster>,
}

impl Koo {
    pub fn redis(&self) -> &TestRedis {
        self.redis.as_ref().expect("a Redis-backed test")
    }
}

/// A koo server on `backend` (a fresh Redis, or embedded) with short task
/// intervals and `workers` built-in worker slots.
pub async fn start_on(backend: Backend, workers: usize) -> Koo {
    start_on_with(backend, workers, |_| {}).await
}

/// [`start_on`] with adjusted settings.
pub async fn start_on_with(
    backend: Backend,
    workers: usize,
    adjust: impl FnOnce(&mut Settings),
) -> Koo {
    match backend {
        Backend::Redis => {
            let redis = TestRedis::start().await;
            let mut settings = test_settings(redis_settings(&redis.url()));
            short_intervals(&mut settings, workers);
            adjust(&mut settings);
            let server = TestServer::spawn(settings).await;
            server.wait_health("", ServingStatus::Serving).await;
            Koo {
                redis: Some(redis),
                server,
                cluster: None,
            }
        }
        Backend::Cluster => {
            let cluster = super::cluster::TestCluster::start().await;
            let mut settings = test_settings(redis_settings(&cluster.url()));
            short_intervals(&mut settings, workers);
            adjust(&mut settings);
            let server = TestServer::spawn(settings).await;
            server.wait_health("", ServingStatus::Serving).await;
            Koo {
                redis: None,
                server,
                cluster: Some(cluster),
            }
        }
        Backend::Memory => {
            let mut settings = test_settings(memory_settings());
            settings.tasks.redis = None;
            short_intervals(&mut settings, workers);
            adjust(&mut settings);
            let server = TestServer::spawn(settings).await;
            server.wait_health("", ServingStatus::Serving).await;
            Koo {
                redis: None,
                server,
                cluster: None,
            }
        }
    }
}

/// A koo server on a fresh Redis.
pub async fn start(workers: usize) -> Koo {
    start_on(Backend::Redis, workers).await
}

/// Another koo server on `redis`, running tasks with short intervals.
pub async fn spawn_on(redis: &TestRedis, workers: usize) -> TestServer {
    let mut settings = test_settings(redis_settings(&redis.url()));
    let koo::server::StoreSettings::Redis(r) = &settings.store else {
        unreachable!()
    };
    settings.tasks.redis = Some(r.clone());
    short_intervals(&mut settings, workers);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    server
}

pub fn short_intervals(settings: &mut Settings, workers: usize) {
    settings.tasks.workers = workers;
    settings.tasks.config.lease = Duration::from_millis(1000);
    settings.tasks.config.sweep_interval = Duration::from_millis(100);
    settings.tasks.config.poll_interval = Duration::from_millis(20);
    settings.tasks.config.idempotency_takeover = Duration::from_millis(500);
    settings.tasks.config.backoff = koo::tasks::retry::Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
}

pub fn client(server: &TestServer) -> TaskServiceClient<Channel> {
    TaskServiceClient::new(server.channel.clone())
}

pub fn submit(name: &str, kwargs: serde_json::Value) -> pb::SubmitTaskRequest {
    let kwargs = match koo_json(kwargs).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Some(s),
        _ => None,
    };
    pb::SubmitTaskRequest {
        name: name.into(),
        category: pb::TaskCategory::Research as i32,
        kwargs,
        ..Default::default()
    }
}

pub fn koo_json(v: serde_json::Value) -> prost_types::Value {
    koo::grpc::json::from_json(&v.to_string()).expect("valid JSON")
}

/// Waits until `check` accepts the task, following it with WatchTask
/// between reads (an event, not a timer; the same on both stores).
pub async fn wait_task(
    client: &mut TaskServiceClient<Channel>,
    id: &str,
    check: impl Fn(&pb::Task) -> bool,
) -> pb::Task {
    let mut watch = client
        .watch_task(pb::WatchTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner();
    let until = tokio::time::Instant::now() + super::EVENT_TIMEOUT;
    let mut ended = false;
    loop {
        let task = client
            .get_task(pb::GetTaskRequest { task_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        if check(&task) {
            return task;
        }
        assert!(!ended, "the task ended without getting there: {task:?}");
        match tokio::time::timeout_at(until, watch.message()).await {
            Err(_) => panic!("task never got there: {task:?}"),
            Ok(Ok(Some(_))) => {}
            // the stream ends after the final state: one last read
            Ok(Ok(None)) => ended = true,
            Ok(Err(e)) => panic!("WatchTask failed: {e}"),
        }
    }
}

pub fn is_final(t: &pb::Task) -> bool {
    t.state >= pb::TaskState::Succeeded as i32
}

/// A `koo worker` process started against `redis`.
pub fn worker(redis: &TestRedis) -> Child {
    worker_with(redis, &[])
}

/// A `koo worker` process with extra environment (later entries win).
pub fn worker_with(redis: &TestRedis, env: &[(&str, &str)]) -> Child {
    Command::new(KOO)
        .arg("worker")
        .env("KOO_WORKER_CONCURRENCY", "1")
        .env("REDIS_URL", redis.url())
        .env("KOO_TASK_LEASE", "1s")
        .env("KOO_TASK_SWEEP_INTERVAL", "100ms")
        .env("KOO_WORKER_POLL_INTERVAL", "20ms")
        .env("KOO_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn koo worker")
}

/// Waits for a child process to exit; false if it is still running after
/// `limit`.
pub async fn exits_within(child: &mut Child, limit: Duration) -> bool {
    let until = tokio::time::Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        // a process exit has no event to await here
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// For each `async fn scenario(backend: Backend)`, a test on the embedded
/// store and one on Redis.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name($crate::common::tasks::Backend::Memory).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name($crate::common::tasks::Backend::Redis).await;
                }
            }
        )*
    };
}

/// For each `async fn scenario(backend: Backend)`, a test on the embedded
/// store, one on Redis and one on a Redis Cluster (`<scenario>::memory`,
/// `::redis`, `::cluster`), each on a current-thread runtime.
#[macro_export]
macro_rules! on_all_three {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use $crate::common::tasks::Backend;
                #[tokio::test]
                async fn memory() {
                    super::$name(Backend::Memory).await;
                }
                #[tokio::test]
                async fn redis() {
                    super::$name(Backend::Redis).await;
                }
                #[tokio::test]
                async fn cluster() {
                    super::$name(Backend::Cluster).await;
                }
            }
        )*
    };
}

/// For each `async fn scenario(backend: Backend)` named, a test on a Redis
/// Cluster (`<file>::cluster::<scenario>`): the scenarios whose every step
/// applies there (no direct single-Redis access, no flow control).
#[macro_export]
macro_rules! on_cluster_too {
    ($($name:ident),* $(,)?) => {
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::tasks::Backend::Cluster).await;
                }
            )*
        }
    };
}

/// A protobuf duration of `ms` milliseconds.
pub fn millis(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Submits `req` through `c`; the new task's id.
pub async fn submitted(c: &mut TaskServiceClient<Channel>, req: pb::SubmitTaskRequest) -> String {
    c.submit_task(req)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
        .id
}

/// A well-formed id of a task that does not exist.
pub fn unknown_task_id() -> String {
    koo::domain::task::TaskId::generate(&koo::domain::task::Category::Research.default_queue())
        .to_string()
}

/// One queue's figures from GetTaskMetrics.
pub async fn queue_metrics(c: &mut TaskServiceClient<Channel>, queue: &str) -> pb::QueueMetrics {
    c.get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues
        .into_iter()
        .find(|q| q.queue == queue)
        .unwrap_or_else(|| panic!("no metrics for queue {queue}"))
}

/// Reads a task (it must exist).
pub async fn get_ok(c: &mut TaskServiceClient<Channel>, id: &str) -> pb::Task {
    c.get_task(pb::GetTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
}

/// Submits and returns the stored task (the submit must succeed).
pub async fn submit_ok(c: &mut TaskServiceClient<Channel>, req: pb::SubmitTaskRequest) -> pb::Task {
    c.submit_task(req).await.unwrap().into_inner().task.unwrap()
}

/// A task that fails (retryably) `failures` times, then succeeds, with
/// `max_retries` retries allowed.
pub fn failing(failures: u32, max_retries: i32) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        max_retries: Some(max_retries),
        ..submit(
            "koo.diagnostics.fail_times",
            serde_json::json!({ "failures": failures }),
        )
    }
}

/// A task of `queue` as a store takes it at submit: queued, no arguments,
/// nothing run yet (for the tests that drive a task store directly).
pub fn queued_task(queue: &QueueName, name: &str, priority: Priority, max_retries: u32) -> Task {
    Task {
        id: TaskId::generate(queue),
        name: name.into(),
        category: Category::Research,
        priority,
        args: "[]".into(),
        kwargs: "{}".into(),
        state: State::Queued,
        cache_result: None,
        depends_on: vec![],
        schedule: None,
        schedule_tick_ms: None,
        attempts: 0,
        token: 0,
        takeovers: 0,
        max_retries,
        worker: None,
        progress: None,
        result: None,
        error: None,
        created_ms: 0,
        started_ms: None,
        finished_ms: None,
        soft_ms: 0,
        hard_ms: 0,
        result_ttl_ms: 60_000,
        log: vec![],
        trace: None,
        debounce_key: None,
        expire_ms: None,
        rate_limit_key: None,
        concurrency_key: None,
    }
}

/// Waits until a process has armed the queue (its flag is set): the event
/// a submit's wake depends on, read where it happens.
pub async fn armed(conn: &mut redis::aio::MultiplexedConnection, flag: &str) -> i64 {
    let until = tokio::time::Instant::now() + super::EVENT_TIMEOUT;
    loop {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(flag)
            .query_async(conn)
            .await
            .unwrap();
        if pttl > 0 {
            return pttl;
        }
        assert!(tokio::time::Instant::now() < until, "{flag} was never set");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
