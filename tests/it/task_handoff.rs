//! Hand-off of a new task to an idle built-in slot (issue 20, a lone
//! task's latency): the store's `submit_and_lease` (one pipeline on Redis)
//! stores the task and then leases the queue's next task by the lease's
//! own rules; the engine gives a submit to a slot waiting on its board, in
//! the submit's round trip, and never strands the task (a caller that
//! stops waiting, a slot that is gone). On a real redis-server, the
//! embedded store and a Redis Cluster. A stream worker's idle session
//! (WorkerService.Work) takes hand-offs too, within its room.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use koo::domain::task::{Category, Priority, QueueName, State, Task};
use koo::store::tasks::{LeaseAsk, Leased, TaskLimits, TaskStore};
use koo::store::{Deadline, RedisConfig, RedisStore};
use koo::tasks::engine::{NewTask, TaskConfig, TaskEngine};
use koo::tasks::handlers;
use koo::tasks::remote::holds::Holds;
use koo::tasks::remote::{Inbound, Outbound, Routing, Session};
use koo::tasks::worker::{Registry, WorkerPool};

const NOOP: &str = "koo.diagnostics.noop";

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

fn queue() -> QueueName {
    Category::Research.default_queue()
}

/// A store on `backend`, the Redis or Cluster under it kept alive.
struct Store(common::tasks::HeldStore);

impl std::ops::Deref for Store {
    type Target = common::tasks::HeldStore;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Store {
    async fn on(backend: common::tasks::Backend) -> Self {
        Self(common::tasks::HeldStore::on(backend).await)
    }

    fn task(&self, name: &str) -> Task {
        common::tasks::queued_task(&queue(), name, Priority::Normal, 3)
    }

    /// `submit_and_lease` of a new task named `name` for `worker` serving
    /// `names`: the task, and what the lease found (it must have run).
    async fn submit_and_lease(&self, name: &str, worker: &str, names: &[&str]) -> (Task, Leased) {
        let task = self.task(name);
        let ask = LeaseAsk {
            worker,
            lease: Duration::from_secs(60),
            names,
        };
        let limits = TaskLimits::default();
        let (submitted, leased) = self
            .store
            .submit_and_lease(&task, limits, &ask, limits, later())
            .await;
        submitted.unwrap();
        (task, leased.expect("the lease ran"))
    }

    async fn state(&self, task: &Task) -> (State, String) {
        let t = self.store.get(&task.id, later()).await.unwrap().unwrap();
        (t.state, t.worker.unwrap_or_default())
    }
}

crate::on_all_three!(a_submit_is_stored_then_the_queue_leased_by_its_rules);

/// The new task itself when the queue was empty; an older task first when
/// one waits (the queue's order, not the submit's); nothing for a worker
/// that does not serve the name, or from a paused queue; every task
/// submitted either way is stored.
async fn a_submit_is_stored_then_the_queue_leased_by_its_rules(backend: common::tasks::Backend) {
    let s = Store::on(backend).await;
    let (a, leased) = s.submit_and_lease("a", "w1", &["*"]).await;
    let leased = leased.task().expect("the new task, leased");
    assert_eq!((&leased.id, leased.attempts), (&a.id, 1));
    assert_eq!(s.state(&a).await, (State::Running, "w1".into()));

    let older = s.task("older");
    let limits = TaskLimits::default();
    s.store
        .submit(&older, Duration::ZERO, limits, later())
        .await
        .unwrap();
    let (b, leased) = s.submit_and_lease("b", "w2", &["*"]).await;
    assert_eq!(leased.task().expect("the older task").id, older.id);
    assert_eq!(s.state(&older).await, (State::Running, "w2".into()));
    assert_eq!(s.state(&b).await.0, State::Queued, "b waits its turn");

    let (c, leased) = s.submit_and_lease("c", "w3", &["another.name"]).await;
    assert!(matches!(leased, Leased::Empty), "{leased:?}");
    assert_eq!(s.state(&c).await.0, State::Queued);

    let pause = koo::domain::Pause {
        by: "test".into(),
        reason: "hold".into(),
        at_ms: 0,
    };
    s.store
        .set_pause(&queue(), Some(&pause), later())
        .await
        .unwrap();
    let (d, leased) = s.submit_and_lease("d", "w4", &["*"]).await;
    assert!(leased.task().is_none(), "a paused queue hands out nothing");
    assert_eq!(s.state(&d).await.0, State::Queued);
    assert_eq!(s.state(&b).await.0, State::Queued);
}

crate::on_all_three!(a_failed_submit_reports_what_its_lease_took);

/// A submit that fails (its id is taken) is an error, and what its lease
/// took is reported rather than kept silently (the caller hands it back):
/// on Redis the pipelined lease ran and took the queued task; the embedded
/// store and a Cluster's batch path stop before leasing.
async fn a_failed_submit_reports_what_its_lease_took(backend: common::tasks::Backend) {
    let s = Store::on(backend).await;
    let a = s.task("a");
    let limits = TaskLimits::default();
    // both scripts loaded (a first hand-off loads them), so that the pipelined
    // lease runs rather than meeting NOSCRIPT
    let (_, first) = s.submit_and_lease("first", "w0", &["*"]).await;
    assert!(first.task().is_some());
    s.store
        .submit(&a, Duration::ZERO, limits, later())
        .await
        .unwrap();
    let ask = LeaseAsk {
        worker: "w1",
        lease: Duration::from_secs(60),
        names: &["*"],
    };
    let (submitted, leased) = s
        .store
        .submit_and_lease(&a, limits, &ask, limits, later())
        .await;
    assert!(submitted.is_err(), "the id is taken");
    match backend {
        common::tasks::Backend::Memory => {
            assert!(leased.is_none(), "{leased:?}");
            assert_eq!(s.state(&a).await.0, State::Queued);
        }
        _ => {
            let took = leased.and_then(Leased::task).expect("the queued task");
            assert_eq!(took.id, a.id);
            assert_eq!(s.state(&a).await, (State::Running, "w1".into()));
        }
    }
}

/// Redis lost its scripts (a restart, `SCRIPT FLUSH`): each step is made
/// again the plain way, which loads its script; the task is stored once
/// and leased.
#[tokio::test]
async fn scripts_redis_lost_are_loaded_again() {
    let s = Store::on(common::tasks::Backend::Redis).await;
    let redis = s.redis.as_ref().unwrap();
    let mut conn = redis.conn().await;
    for _ in 0..2 {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (task, leased) = s.submit_and_lease("a", "w1", &["*"]).await;
        assert_eq!(leased.task().expect("the new task").id, task.id);
        assert_eq!(s.state(&task).await, (State::Running, "w1".into()));
    }
    let stats = s.store.queue_stats(&queue(), later()).await.unwrap();
    assert_eq!(
        (stats.ready, stats.running),
        (0, 2),
        "stored once each: {stats:?}"
    );
}

/// An engine on `redis` (the embedded store without one) whose idle
/// slots look at their queue only once a minute: what they do is what
/// submits make them do.
fn engine(redis: Option<&common::TestRedis>) -> TaskEngine {
    let store = match redis {
        Some(r) => TaskStore::redis(
            RedisStore::connect(&RedisConfig::new(r.url())).unwrap(),
            "koo",
        ),
        None => TaskStore::memory(),
    };
    let config = TaskConfig {
        poll_interval: Duration::from_secs(60),
        ..TaskConfig::default()
    };
    TaskEngine::new(store, config)
}

/// [`engine`] on `backend` (a Redis of its own, kept alive with it; the
/// embedded store for any other).
async fn engine_on(backend: common::tasks::Backend) -> (Option<common::TestRedis>, TaskEngine) {
    let redis = match backend {
        common::tasks::Backend::Redis => Some(common::TestRedis::start().await),
        _ => None,
    };
    let engine = engine(redis.as_ref());
    (redis, engine)
}

/// A no-op submitted to the research queue through `engine`.
async fn noop(engine: &TaskEngine) -> Task {
    let new = NewTask::new(NOOP, Category::Research);
    engine.submit(new, later()).await.unwrap()
}

/// Waits for `task` to end: it must have succeeded, on its first attempt.
async fn ran_once(engine: &TaskEngine, task: &Task) {
    let done = common::tasks::wait_final(engine, task).await;
    assert_eq!(
        (done.state, done.attempts),
        (State::Succeeded, 1),
        "{}",
        task.id
    );
}

/// Starts a pool of `slots` diagnostics slots on the research queue and
/// waits (on the board, not a timer) until every slot is idle.
async fn idle_pool(engine: &TaskEngine, slots: usize) -> CancellationToken {
    let mut registry = Registry::default();
    handlers::register_diagnostics(&mut registry);
    let stop = CancellationToken::new();
    let pool = WorkerPool::new(engine.clone(), registry, vec![queue()], slots);
    tokio::spawn(pool.run(stop.clone()));
    idle(engine, slots).await;
    stop
}

/// Waits (on the board's changes) until `n` slots are idle.
async fn idle(engine: &TaskEngine, n: usize) {
    tokio::time::timeout(common::EVENT_TIMEOUT, engine.until_idle_slots(&queue(), n))
        .await
        .unwrap_or_else(|_| panic!("never {n} idle slots"));
}

/// The research queue's hand-offs counted by `engine`.
fn handoffs(engine: &TaskEngine) -> u64 {
    let figures = engine.counters().read();
    figures
        .iter()
        .find(|f| f.queue == "research")
        .unwrap()
        .handed
}

on_both!(a_lone_task_goes_to_one_idle_slot_in_the_submits_call);

/// With four idle slots, a submit goes to one of them in its own round
/// trip: on Redis, the whole task costs three script calls (the submit,
/// its lease, the end), where the slots racing for it cost six or more;
/// the other slots stay idle on the board.
async fn a_lone_task_goes_to_one_idle_slot_in_the_submits_call(backend: common::tasks::Backend) {
    let (redis, engine) = engine_on(backend).await;
    let stop = idle_pool(&engine, 4).await;
    // the scripts loaded, so that none is counted twice (NOSCRIPT)
    let warm = NewTask::new(NOOP, Category::Research);
    let warm = engine.submit(warm, later()).await.unwrap();
    assert_eq!(
        common::tasks::wait_final(&engine, &warm).await.state,
        State::Succeeded
    );
    idle(&engine, 4).await;
    let before = match &redis {
        Some(r) => r.command_calls(&["evalsha", "eval"]).await,
        None => 0,
    };
    let task = noop(&engine).await;
    ran_once(&engine, &task).await;
    assert_eq!(handoffs(&engine), 2, "the warm-up's and this one's");
    if let Some(r) = &redis {
        idle(&engine, 4).await;
        let calls = r.command_calls(&["evalsha", "eval"]).await - before;
        assert_eq!(calls, 3, "submit + its lease + the end");
    }
    stop.cancel();
}

/// Redis full (`maxmemory`, `noeviction`): a submit handed to an idle
/// slot, and a burst handed to idle slots, are refused as out of memory
/// (RESOURCE_EXHAUSTED to callers) as a submit that waits in its queue is,
/// not as a backend failure (INTERNAL); nothing is stored.
#[tokio::test]
async fn a_full_redis_refuses_a_handed_off_submit_as_out_of_memory() {
    use koo::store::StoreError;
    use koo::tasks::error::TaskError;
    let (redis, engine) = engine_on(common::tasks::Backend::Redis).await;
    let redis = redis.unwrap();
    let stop = idle_pool(&engine, 2).await;
    let warm = noop(&engine).await; // the scripts loaded
    ran_once(&engine, &warm).await;
    idle(&engine, 2).await;
    let mut conn = redis.conn().await;
    let maxmemory = |limit: &str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(limit)
            .to_owned()
    };
    let () = maxmemory("1").query_async(&mut conn).await.unwrap();
    let one = engine
        .submit(NewTask::new(NOOP, Category::Research), later())
        .await;
    let burst = engine
        .submit_many(
            (0..2)
                .map(|_| NewTask::new(NOOP, Category::Research))
                .collect(),
            later(),
        )
        .await;
    let () = maxmemory("0").query_async(&mut conn).await.unwrap();
    stop.cancel();
    let oom = |e: &TaskError| matches!(e, TaskError::Store(StoreError::OutOfMemory(_)));
    let e = one.expect_err("Redis is full");
    assert!(oom(&e), "{e:?}");
    for r in burst.expect("checked") {
        let e = r.expect_err("Redis is full");
        assert!(oom(&e), "{e:?}");
    }
    assert_eq!(handoffs(&engine), 1, "only the warm-up was handed off");
}

/// A task made ready through another process wakes this one's idle
/// pool: one slot is told to look, not every slot. Of twelve idle slots
/// the wake costs one lease call (and the task found, one look of the
/// idle peer it engages), where twelve slots leasing for the one task
/// cost twelve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_from_another_process_engages_one_idle_slot() {
    let redis = common::TestRedis::start().await;
    let api = engine(Some(&redis));
    let workers = engine(Some(&redis));
    let stop = idle_pool(&workers, 12).await;
    tokio::spawn(workers.clone().run_wakes(vec![queue()], stop.clone()));
    let flag = koo::keys::QueueKeys::new("koo", &queue()).idle();
    let mut conn = redis.conn().await;
    // the first round loads the scripts, so that none is counted twice
    // (NOSCRIPT)
    for round in 0..2 {
        common::tasks::armed(&mut conn, &flag).await;
        let before = redis.command_calls(&["evalsha", "eval"]).await;
        let task = noop(&api).await;
        ran_once(&api, &task).await;
        // every look has ended
        idle(&workers, 12).await;
        let calls = redis.command_calls(&["evalsha", "eval"]).await - before;
        assert!(
            round == 0 || calls <= 5,
            "the submit, one slot's lease, its end, a peer's look (and a flush of times): {calls}"
        );
    }
    let figures = workers.counters().read();
    let research = figures.iter().find(|f| f.queue == "research").unwrap();
    assert_eq!(research.woken, 2);
    stop.cancel();
}

/// The same for a task made ready in this process without a hand-off
/// (here a retry): one idle slot looks. Of twelve idle slots the retry
/// costs one lease call (and a peer's look), where twelve cost twelve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_engages_one_idle_slot() {
    let redis = common::TestRedis::start().await;
    let engine = engine(Some(&redis));
    let stop = idle_pool(&engine, 12).await;
    let mut failing = NewTask::new(handlers::FAIL_TIMES, Category::Research);
    failing.kwargs = r#"{"failures": 1}"#.into();
    failing.max_retries = Some(0);
    let task = engine.submit(failing, later()).await.unwrap();
    let failed = common::tasks::wait_final(&engine, &task).await;
    assert_eq!(failed.state, State::Failed);
    idle(&engine, 12).await;
    let before = redis.command_calls(&["evalsha", "eval"]).await;
    engine.retry(task.id.as_str(), later()).await.unwrap();
    let done = common::tasks::wait_final(&engine, &task).await;
    assert_eq!((done.state, done.attempts), (State::Succeeded, 2));
    idle(&engine, 12).await;
    let calls = redis.command_calls(&["evalsha", "eval"]).await - before;
    assert!(
        calls <= 6,
        "the retry (loaded on first use), one slot's lease, its end, a peer's look: {calls}"
    );
    stop.cancel();
}

on_both!(a_burst_gives_each_idle_slot_a_task_in_the_submits_call);

/// A batch of eight submitted to four idle slots: the batch's call leases
/// one task for each slot (four hand-offs), the rest wait in the queue and
/// are taken by the slots as they end theirs; all eight succeed once.
async fn a_burst_gives_each_idle_slot_a_task_in_the_submits_call(backend: common::tasks::Backend) {
    let (_redis, engine) = engine_on(backend).await;
    let stop = idle_pool(&engine, 4).await;
    let news = (0..8)
        .map(|_| NewTask::new(NOOP, Category::Research))
        .collect();
    let tasks = engine.submit_many(news, later()).await.unwrap();
    assert_eq!(handoffs(&engine), 4, "one per idle slot");
    for task in tasks {
        ran_once(&engine, &task.unwrap()).await;
    }
    stop.cancel();
}

/// A submit whose caller stops waiting (a cancelled RPC) still hands the
/// task it stored to the slot it claimed: the task is never left leased to
/// nobody.
#[tokio::test]
async fn a_caller_that_stops_waiting_does_not_strand_the_task() {
    let redis = common::TestRedis::start().await;
    let engine = engine(Some(&redis));
    let names: Arc<[String]> = vec!["*".to_owned()].into();
    let mut slot = engine.wait_idle(&[queue()], "w-test", names);
    let submit = engine.submit(NewTask::new(NOOP, Category::Research), later());
    // polled once (the claim and the store call start), then dropped
    let cancelled = tokio::time::timeout(Duration::ZERO, submit).await;
    assert!(cancelled.is_err(), "the caller stopped waiting");
    let handed = tokio::time::timeout(common::EVENT_TIMEOUT, slot.handed())
        .await
        .expect("the hand-off went on")
        .expect("a lease answered");
    let task = handed.task().expect("the task, leased to the slot");
    assert_eq!(task.worker.as_deref(), Some("w-test"));
    let stored = engine.get(task.id.as_str(), later()).await.unwrap();
    assert_eq!(
        (stored.state, stored.worker.as_deref()),
        (State::Running, Some("w-test"))
    );
}

on_both!(a_task_for_a_slot_that_is_gone_goes_back_to_its_queue);

/// A slot that stops in the instant a submit claims it: the task the
/// submit leased for it is handed back to its queue at once (QUEUED, its
/// attempt given back), not left to a lease nobody renews; the submit
/// succeeds.
async fn a_task_for_a_slot_that_is_gone_goes_back_to_its_queue(backend: common::tasks::Backend) {
    let (_redis, engine) = engine_on(backend).await;
    let names: Arc<[String]> = vec!["*".to_owned()].into();
    let mut slot = engine.wait_idle(&[queue()], "w-gone", names);
    slot.close();
    assert_eq!(engine.idle_slots(&queue()), 1, "still on the board");
    let task = noop(&engine).await;
    let stored = engine.get(task.id.as_str(), later()).await.unwrap();
    assert_eq!((stored.state, stored.attempts), (State::Queued, 0));
    assert_eq!(engine.idle_slots(&queue()), 0, "claimed once");
    drop(slot);
    // and a worker gets it
    let leased = engine
        .lease(&queue(), "w2", &["*"], later())
        .await
        .unwrap()
        .expect("the task is back in its queue");
    assert_eq!(leased.id, task.id);
}

on_both!(a_task_given_to_a_slot_that_stops_before_taking_it_goes_back);

/// A slot given its task in the instant it stops (a stream that closed, koo
/// stopping: its holder returns without taking what it was handed): the
/// task goes back to its queue at once, its attempt given back, and an idle
/// slot of the process runs it (the engine polls once a minute: only the
/// hand-back's wake-up makes it in time; without the hand-back the task
/// would wait for its lease to lapse).
async fn a_task_given_to_a_slot_that_stops_before_taking_it_goes_back(
    backend: common::tasks::Backend,
) {
    let (_redis, engine) = engine_on(backend).await;
    let names: Arc<[String]> = vec!["*".to_owned()].into();
    let slot = engine.wait_idle(&[queue()], "w-stopping", names);
    let task = noop(&engine).await;
    let stored = engine.get(task.id.as_str(), later()).await.unwrap();
    assert_eq!(
        (stored.state, stored.worker.as_deref()),
        (State::Running, Some("w-stopping")),
        "handed: leased for the slot"
    );
    assert_eq!(handoffs(&engine), 1);
    drop(slot);
    let stop = idle_pool(&engine, 1).await;
    ran_once(&engine, &task).await;
    stop.cancel();
}

/// Redis gone under a hand-off: the submit and the burst answer an error
/// (within their deadline), the slots they claimed are let go and come back
/// to the board, and once Redis is back a submit is handed off and runs
/// (its scripts loaded again after the restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hand_off_lets_its_slots_go() {
    let mut redis = common::TestRedis::start().await;
    let engine = engine(Some(&redis));
    let stop = idle_pool(&engine, 4).await;
    redis.kill();
    let short = || Deadline::after(Duration::from_secs(2));
    assert_eq!(engine.idle_slots(&queue()), 4);
    let lone = NewTask::new(NOOP, Category::Research);
    assert!(engine.submit(lone, short()).await.is_err());
    let burst = (0..4)
        .map(|_| NewTask::new(NOOP, Category::Research))
        .collect();
    assert!(engine.submit_many(burst, short()).await.is_err());
    // (every slot was idle: both claimed slots, and the failures let them
    // go; how soon each is back on the board depends on its own failed
    // lease, so it is not asserted before Redis is back)
    assert_eq!(handoffs(&engine), 0);
    redis.restart().await;
    idle(&engine, 4).await;
    let task = noop(&engine).await;
    ran_once(&engine, &task).await;
    assert_eq!(handoffs(&engine), 1);
    stop.cancel();
}

/// A stream worker's session (WorkerService.Work, driven here as the gRPC
/// adapter drives it) on `engine`: serving every name of the research
/// queue, `concurrency` at a time. Its inbox, its outbox and its stop.
struct StreamSession {
    inbox: tokio::sync::mpsc::Sender<Inbound>,
    outbox: tokio::sync::mpsc::Receiver<Outbound>,
    /// Messages of a batch not yet looked at.
    pending: std::collections::VecDeque<Outbound>,
    stop: CancellationToken,
}

impl StreamSession {
    fn open(engine: &TaskEngine, concurrency: u32) -> Self {
        let known = [queue()];
        let routing = Routing::new(&[], &[queue().to_string()], &known).unwrap();
        let tally = Holds::new(100).tally("test-identity", None);
        let session = Session::new(
            engine.clone(),
            None,
            "sdk",
            routing,
            concurrency,
            "127.0.0.1:1".into(),
            tally,
        )
        .unwrap();
        let (inbox, inbound) = tokio::sync::mpsc::channel(16);
        let (out, outbox) = tokio::sync::mpsc::channel(16);
        let stop = CancellationToken::new();
        let inbound = tokio_stream::wrappers::ReceiverStream::new(inbound);
        tokio::spawn(session.run(inbound, out, stop.clone()));
        Self {
            inbox,
            outbox,
            pending: Default::default(),
            stop,
        }
    }

    /// The next task pushed to the worker, and its lease secret (replies
    /// to its reports passed over, batches opened).
    async fn task(&mut self) -> (Task, String) {
        loop {
            let next = match self.pending.pop_front() {
                Some(m) => m,
                None => tokio::time::timeout(common::EVENT_TIMEOUT, self.outbox.recv())
                    .await
                    .expect("a message within the timeout")
                    .expect("the session goes on"),
            };
            match next {
                Outbound::Task { task, secret } => return (*task, secret),
                Outbound::Batch(items) => self.pending.extend(items),
                Outbound::Reply { outcome, .. } => assert!(outcome.is_ok(), "{outcome:?}"),
                other => panic!("expected a task, got {other:?}"),
            }
        }
    }

    async fn complete(&self, (task, secret): (Task, String)) {
        let done = Inbound::Complete {
            id: task.id.to_string(),
            token: task.token,
            secret,
            result: serde_json::json!("done"),
        };
        self.inbox.send(done).await.unwrap();
    }
}

on_both!(an_idle_stream_worker_takes_a_submit_in_its_round_trip);

/// A stream worker with room and nothing to do waits on the board as a
/// built-in slot does: a submit is stored and leased for it in one round
/// trip and pushed to it; it runs to its end.
async fn an_idle_stream_worker_takes_a_submit_in_its_round_trip(backend: common::tasks::Backend) {
    let (_redis, engine) = engine_on(backend).await;
    let mut worker = StreamSession::open(&engine, 2);
    idle(&engine, 1).await;
    let task = noop(&engine).await;
    assert_eq!(handoffs(&engine), 1, "handed to the session");
    let pushed = worker.task().await;
    assert_eq!(pushed.0.id, task.id);
    worker.complete(pushed).await;
    ran_once(&engine, &task).await;
    // idle again, on the board once (one place, whatever its room)
    idle(&engine, 1).await;
    worker.stop.cancel();
}

on_both!(a_busy_stream_worker_is_not_handed_more_than_its_room);

/// A stream worker holding all it may (concurrency 1) is not on the board:
/// a second submit stays queued, and the worker takes it once it reports
/// the first (both run once).
async fn a_busy_stream_worker_is_not_handed_more_than_its_room(backend: common::tasks::Backend) {
    let (_redis, engine) = engine_on(backend).await;
    let mut worker = StreamSession::open(&engine, 1);
    idle(&engine, 1).await;
    let first = noop(&engine).await;
    let pushed = worker.task().await;
    assert_eq!(pushed.0.id, first.id);
    idle(&engine, 0).await;
    let before = handoffs(&engine);
    let second = noop(&engine).await;
    assert_eq!(handoffs(&engine), before, "the second was not handed off");
    let queued = engine.get(second.id.as_str(), later()).await.unwrap();
    assert_eq!(queued.state, State::Queued);
    worker.complete(pushed).await;
    let next = worker.task().await;
    assert_eq!(next.0.id, second.id);
    worker.complete(next).await;
    for task in [&first, &second] {
        ran_once(&engine, task).await;
    }
    worker.stop.cancel();
}

on_both!(a_task_handed_to_a_worker_that_leaves_goes_to_the_next_at_once);

/// A stream worker handed a task leaves before it says a word about it:
/// the task goes back to its queue, its attempt given back, and another
/// idle worker of the process takes it at once (the engine's poll is a
/// minute here: only the hand-back's wake-up can make it in time).
async fn a_task_handed_to_a_worker_that_leaves_goes_to_the_next_at_once(
    backend: common::tasks::Backend,
) {
    let (_redis, engine) = engine_on(backend).await;
    let mut leaving = StreamSession::open(&engine, 1);
    idle(&engine, 1).await;
    let task = noop(&engine).await;
    assert_eq!(leaving.task().await.0.id, task.id);
    let mut next = StreamSession::open(&engine, 1);
    idle(&engine, 1).await;
    drop(leaving);
    let pushed = next.task().await;
    assert_eq!(
        (pushed.0.id.clone(), pushed.0.attempts),
        (task.id.clone(), 1)
    );
    next.complete(pushed).await;
    ran_once(&engine, &task).await;
    next.stop.cancel();
}

/// Redis gone while a stream worker waits on the board: the submit that
/// claimed it answers an error and the session, handed nothing, goes on;
/// once Redis is back it is on the board again and takes the next submit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hand_off_leaves_the_stream_worker_serving() {
    let mut redis = common::TestRedis::start().await;
    let engine = engine(Some(&redis));
    let mut worker = StreamSession::open(&engine, 1);
    idle(&engine, 1).await;
    redis.kill();
    let lost = NewTask::new(NOOP, Category::Research);
    let short = Deadline::after(Duration::from_secs(2));
    assert!(engine.submit(lost, short).await.is_err());
    assert_eq!(handoffs(&engine), 0);
    redis.restart().await;
    idle(&engine, 1).await;
    let task = noop(&engine).await;
    let pushed = worker.task().await;
    assert_eq!(pushed.0.id, task.id);
    worker.complete(pushed).await;
    ran_once(&engine, &task).await;
    assert_eq!(handoffs(&engine), 1);
    worker.stop.cancel();
}
