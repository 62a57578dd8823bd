//! Run and wait-time percentiles (`GetTaskMetrics`' `run_time`,
//! `wait_time` and `by_name`): on both stores, attempts with known times
//! (the store's manual clock sets them exactly) give percentiles within the
//! bucket error, names beyond the cap fold into `other`, and old times
//! leave the window; over gRPC, two koo processes on one Redis answer the
//! same figures once the process that ran the tasks has flushed them (about
//! once a second, and when it stops), `koo worker` processes too.

use crate::common;

use std::time::Duration;

use common::TestRedis;
use common::tasks::{client, exits_within, signal, spawn_on, submit, wait_task, worker};
use koo::domain::Outcome;
use koo::domain::task::{Priority, QueueName, State, TaskId};
use koo::domain::times::{NAME_CAP, OTHER, QueueTimes, SLOT_MS, TimeHistogram};
use koo::pb::tasks::v1 as pb;
use koo::store::clock::Clock;
use koo::store::tasks::{TaskLimits, TaskStore};
use koo::store::{Deadline, RedisConfig, RedisStore};

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

/// A store on a manual clock: every time is set by the test.
struct Fixture {
    _redis: Option<TestRedis>,
    store: TaskStore,
    queue: QueueName,
    clock: Clock,
}

impl Fixture {
    async fn redis() -> Self {
        let redis = TestRedis::start().await;
        let store = RedisStore::connect(&RedisConfig::new(redis.url())).unwrap();
        let clock = Clock::manual(koo::store::unix_millis(std::time::SystemTime::now()));
        let tasks = TaskStore::redis_with_clock(store, "koo", clock.clone());
        Self::on(Some(redis), tasks, clock)
    }

    async fn memory() -> Self {
        let clock = Clock::manual(koo::store::unix_millis(std::time::SystemTime::now()));
        Self::on(None, TaskStore::memory_with_clock(clock.clone()), clock)
    }

    fn on(redis: Option<TestRedis>, store: TaskStore, clock: Clock) -> Self {
        Fixture {
            _redis: redis,
            store,
            queue: QueueName::parse("research").unwrap(),
            clock,
        }
    }

    fn advance(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }

    /// Submits a task named `name` (no retries unless `max_retries`).
    async fn submit(&self, name: &str, max_retries: u32) -> TaskId {
        let task = common::tasks::queued_task(&self.queue, name, Priority::Normal, max_retries);
        let limits = TaskLimits::default();
        self.store
            .submit(&task, Duration::ZERO, limits, later())
            .await
            .unwrap();
        task.id
    }

    /// Leases the next task (there must be one), holding it `lease`.
    async fn lease(&self, lease: Duration) -> (TaskId, u32) {
        let limits = TaskLimits::default();
        let t = self
            .store
            .lease(&self.queue, "w", lease, &["*"], limits, later())
            .await
            .unwrap()
            .expect("a task to lease");
        (t.id, t.token)
    }

    /// Leases the next task, runs it `ms` and ends it with `outcome`.
    async fn run(&self, ms: u64, outcome: Outcome) -> State {
        let (id, token) = self.lease(Duration::from_secs(3600)).await;
        self.advance(ms);
        let limits = TaskLimits::default();
        let log = "{\"worker\":\"w\"}";
        self.store
            .finish(&id, token, &outcome, log, limits, later())
            .await
            .unwrap()
            .expect("not fenced")
            .0
    }

    async fn times(&self) -> QueueTimes {
        self.store.task_times(&self.queue, later()).await.unwrap()
    }
}

/// For each `async fn scenario(f: Fixture)`, a test on Redis and one on the
/// embedded store.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn memory() {
                    super::$name(super::Fixture::memory().await).await;
                }
                #[tokio::test]
                async fn redis() {
                    super::$name(super::Fixture::redis().await).await;
                }
            }
        )*
    };
}

on_both!(
    known_times_give_their_percentiles,
    retries_add_runs_and_lost_attempts_their_wait,
    names_beyond_the_cap_fold_into_other,
    old_times_leave_the_window,
);

fn succeeded() -> Outcome {
    Outcome::Succeeded("null".into())
}

/// The exact nearest-rank `q` quantile of sorted `v` (ms).
fn exact(v: &[u64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1] as f64
}

/// `h`'s figures against the exact ones of `truth`: percentiles, max and
/// mean within a bucket's error (12.5%, or 0.5 ms), the count exact.
fn assert_close(h: &TimeHistogram, truth: &mut [u64]) {
    truth.sort_unstable();
    let s = h.stats().expect("times were recorded");
    assert_eq!(s.count, truth.len() as u64);
    let mean = truth.iter().sum::<u64>() as f64 / truth.len() as f64;
    let max = *truth.last().unwrap() as f64;
    for (got, want, what) in [
        (s.p50, exact(truth, 0.5), "p50"),
        (s.p90, exact(truth, 0.9), "p90"),
        (s.p95, exact(truth, 0.95), "p95"),
        (s.p99, exact(truth, 0.99), "p99"),
        (s.max, max, "max"),
        (s.mean, mean, "mean"),
    ] {
        let got = got.as_secs_f64() * 1000.0;
        assert!(
            (got - want).abs() <= (want * 0.125).max(0.5),
            "{what}: {got} ms, exactly {want} ms"
        );
    }
}

/// A hundred tasks submitted at once, each run in turn for 10 ms more than
/// the one before: their runs (10 ms to 1 s) and waits (the runs before
/// them) give percentiles within the bucket error, per name and queue.
async fn known_times_give_their_percentiles(f: Fixture) {
    for _ in 0..100 {
        f.submit("a", 0).await;
    }
    let (mut runs, mut waits, mut waited) = (Vec::new(), Vec::new(), 0);
    for i in 1..=100 {
        waits.push(waited);
        assert_eq!(f.run(i * 10, succeeded()).await, State::Succeeded);
        runs.push(i * 10);
        waited += i * 10;
    }
    let t = f.times().await;
    assert_eq!(t.by_name.len(), 1);
    assert_eq!(
        (t.by_name[0].name.as_str(), t.by_name[0].recorded()),
        ("a", 200)
    );
    assert_close(&t.by_name[0].run, &mut runs);
    assert_close(&t.by_name[0].wait, &mut waits);
    let (run, wait) = t.totals();
    assert_eq!(
        (run, wait),
        (t.by_name[0].run.clone(), t.by_name[0].wait.clone())
    );
    let minutes = t.window.as_secs() / 60;
    assert!((55..=60).contains(&minutes), "{:?}", t.window);
}

/// A retried task counts each attempt's run but only its first wait; an
/// attempt lost with its worker counts its wait, not a run.
async fn retries_add_runs_and_lost_attempts_their_wait(f: Fixture) {
    f.submit("flaky", 3).await;
    f.advance(40);
    let retry = Outcome::Retry {
        error: "{}".into(),
        delay: Duration::ZERO,
    };
    assert_eq!(f.run(50, retry).await, State::Scheduled);
    f.advance(1000);
    assert_eq!(f.run(70, succeeded()).await, State::Succeeded);
    f.submit("lost", 0).await;
    f.advance(30);
    f.lease(Duration::from_millis(100)).await;
    f.advance(200);
    let recovered = f
        .store
        .recover(&f.queue, false, TaskLimits::default(), later());
    assert_eq!(recovered.await.unwrap().handled, 1);

    let t = f.times().await;
    let by = |name: &str| t.by_name.iter().find(|n| n.name == name).unwrap();
    assert_close(&by("flaky").run, &mut [50, 70]);
    assert_close(&by("flaky").wait, &mut [40]);
    assert_eq!(by("lost").run.count(), 0);
    assert_close(&by("lost").wait, &mut [30]);
    assert_eq!(by("flaky").recorded(), 3);
}

/// Beyond the cap a sub-window counts new names as `other`; the busiest
/// names come first.
async fn names_beyond_the_cap_fold_into_other(f: Fixture) {
    for i in 0..NAME_CAP + 5 {
        f.submit(&format!("n{i:02}"), 0).await;
        f.run(5, succeeded()).await;
    }
    f.submit("n07", 0).await;
    f.run(5, succeeded()).await;
    let t = f.times().await;
    assert_eq!(t.by_name.len(), NAME_CAP + 1, "{:?}", t.by_name);
    assert_eq!(
        (t.by_name[0].name.as_str(), t.by_name[0].recorded()),
        ("n07", 4)
    );
    let other = t.by_name.last().unwrap();
    assert_eq!((other.name.as_str(), other.run.count()), (OTHER, 5));
    assert!(!t.by_name.iter().any(|n| n.name == "n20"));
    assert_eq!(t.totals().0.count(), NAME_CAP as u64 + 6);
}

/// Times older than the window are no longer counted: an attempt 30
/// minutes old still is, one 70 minutes old is not.
async fn old_times_leave_the_window(f: Fixture) {
    f.submit("early", 0).await;
    f.run(5, succeeded()).await;
    f.advance(30 * 60 * 1000);
    f.submit("late", 0).await;
    f.run(7, succeeded()).await;
    assert_eq!(f.times().await.totals().0.count(), 2);
    f.advance(40 * 60 * 1000);
    let t = f.times().await;
    let names: Vec<&str> = t.by_name.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["late"]);
    f.advance(SLOT_MS as u64 * 12);
    assert!(f.times().await.by_name.is_empty());
}

/// One queue's times as GetTaskMetrics shows them.
async fn research_times(
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
) -> (Option<prost_types::Duration>, pb::QueueMetrics) {
    let m = c
        .get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    let q = m
        .queues
        .into_iter()
        .find(|q| q.queue == "research")
        .unwrap();
    (m.times_window, q)
}

/// Polls `c`'s GetTaskMetrics until the research queue counts `runs` run
/// times (the process that ran them flushes about once a second).
async fn runs_seen(
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    runs: i64,
) -> (Option<prost_types::Duration>, pb::QueueMetrics) {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (window, q) = research_times(c).await;
        let seen = q.run_time.as_ref().map_or(0, |r| r.count);
        if seen == runs {
            return (window, q);
        }
        assert!(seen < runs, "{seen} runs counted, {runs} ran");
        assert!(
            tokio::time::Instant::now() < until,
            "{seen} of {runs} runs after 10 s"
        );
        // a flush in another process has no event to await here
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits `n` no-op tasks through `c` and waits until they succeeded.
async fn run_noops(
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    n: usize,
) {
    for _ in 0..n {
        let req = submit("koo.diagnostics.noop", serde_json::json!({}));
        let id = c
            .submit_task(req)
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap()
            .id;
        wait_task(c, &id, |t| t.state == pb::TaskState::Succeeded as i32).await;
    }
}

/// A `koo worker` process adds up the times of the tasks it runs and
/// flushes them too: another koo sees them about a second later, and the
/// ones it ran just before it was stopped (SIGTERM) once it has exited.
#[tokio::test]
async fn a_koo_worker_flushes_its_times_and_at_shutdown() {
    let redis = TestRedis::start().await;
    let serve = spawn_on(&redis, 0).await;
    let mut c = client(&serve);
    let mut w = worker(&redis);
    run_noops(&mut c, 2).await;
    let (_, q) = runs_seen(&mut c, 2).await;
    assert_eq!(q.wait_time.unwrap().count, 2);
    run_noops(&mut c, 3).await;
    signal(&w, "TERM");
    let exited = exits_within(&mut w, Duration::from_secs(10)).await;
    if !exited {
        let _ = w.kill();
    }
    assert!(exited, "koo worker did not stop");
    let (_, q) = research_times(&mut c).await;
    assert_eq!(q.run_time.unwrap().count, 5);
    assert_eq!(q.by_name.len(), 1);
}

/// Tasks run by one koo process are timed in the shared store: another
/// koo on the same Redis answers GetTaskMetrics with the same run and wait
/// times, per queue and per name (WatchTaskMetrics too), and the sleeps
/// show in the run times.
#[tokio::test]
async fn two_koo_processes_on_one_redis_answer_the_same_times() {
    let redis = TestRedis::start().await;
    let (a, b) = (spawn_on(&redis, 2).await, spawn_on(&redis, 0).await);
    let mut ca = client(&a);
    let mut ids = Vec::new();
    for (name, kwargs) in [
        (
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 0.2 }),
        ),
        ("koo.diagnostics.noop", serde_json::json!({})),
    ] {
        for _ in 0..3 {
            let req = submit(name, kwargs.clone());
            ids.push(
                ca.submit_task(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .task
                    .unwrap()
                    .id,
            );
        }
    }
    for id in &ids {
        wait_task(&mut ca, id, |t| t.state == pb::TaskState::Succeeded as i32).await;
    }
    // b sees them once a has flushed (a's own reads flush first)
    let (_, qb) = runs_seen(&mut client(&b), 6).await;
    let (window, qa) = research_times(&mut ca).await;
    assert_eq!(qa.run_time, qb.run_time);
    assert_eq!(qa.wait_time, qb.wait_time);
    assert_eq!(qa.by_name, qb.by_name);
    // WatchTaskMetrics carries the same figures
    let mut watch = client(&b)
        .watch_task_metrics(pb::WatchTaskMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let snapshot = watch.message().await.unwrap().unwrap();
    let qw = snapshot
        .queues
        .iter()
        .find(|q| q.queue == "research")
        .unwrap();
    assert_eq!((&qw.run_time, &qw.by_name), (&qa.run_time, &qa.by_name));
    assert!(snapshot.times_window.is_some());
    assert_eq!(qa.run_time.as_ref().unwrap().count, 6);
    assert_eq!(qa.wait_time.as_ref().unwrap().count, 6);
    let sleep = qa
        .by_name
        .iter()
        .find(|n| n.name == "koo.diagnostics.sleep")
        .unwrap();
    let run = sleep.run_time.as_ref().unwrap();
    assert_eq!(run.count, 3);
    let p50 = Duration::try_from(run.p50.unwrap()).unwrap();
    assert!(p50 >= Duration::from_millis(175), "{p50:?}");
    assert!(qa.by_name.iter().any(|n| n.name == "koo.diagnostics.noop"));
    let window = Duration::try_from(window.unwrap()).unwrap();
    assert!(window > Duration::from_secs(55 * 60) && window <= Duration::from_secs(3600));
}

/// A process reads its own times of every queue at once: GetTaskMetrics,
/// right after tasks of two queues ended, counts both (each queue's read
/// flushes that queue's times; one read taking them all used to leave the
/// other queues reading before their times were written).
#[tokio::test]
async fn a_process_reads_its_own_times_of_every_queue() {
    let redis = TestRedis::start().await;
    let koo = spawn_on(&redis, 2).await;
    let mut c = client(&koo);
    let categories = [pb::TaskCategory::Research, pb::TaskCategory::Database];
    let mut ids = Vec::new();
    for category in categories {
        for _ in 0..2 {
            let mut req = submit("koo.diagnostics.noop", serde_json::json!({}));
            req.category = category as i32;
            ids.push(common::tasks::submitted(&mut c, req).await);
        }
    }
    for id in &ids {
        wait_task(&mut c, id, |t| t.state == pb::TaskState::Succeeded as i32).await;
    }
    let metrics = c
        .get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    for queue in ["research", "database"] {
        let q = metrics.queues.iter().find(|q| q.queue == queue).unwrap();
        let runs = q.run_time.as_ref().map_or(0, |r| r.count);
        assert_eq!(runs, 2, "{queue}: {q:?}");
    }
}
