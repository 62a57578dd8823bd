//! The task store's transitions, each scenario on a real redis-server (the
//! Lua scripts) and on the embedded store (its Rust twin), so that both are
//! held to the same behaviour: priority order, leases and fencing tokens,
//! recovery of lapsed leases, retries, dead letters, time limits and result
//! expiry.

use crate::common;

use std::time::{Duration, Instant};

use common::TestRedis;
use koo::domain::Outcome;
use koo::domain::task::{Priority, QueueName, State, Task, TaskId};
use koo::keys::QueueKeys;
use koo::store::Deadline;
use koo::store::clock::Clock;
use koo::store::tasks::{Beat, DependReply, LeaseAsk, TakeOver, TaskLimits, TaskStore};
use redis::AsyncCommands;

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

struct Fixture {
    /// The Redis under the store, when it is Redis.
    redis: Option<TestRedis>,
    /// The Redis Cluster under the store, when it is one.
    cluster: Option<common::cluster::TestCluster>,
    store: TaskStore,
    keys: QueueKeys,
    queue: QueueName,
    /// The store's clock: moving it lets leases lapse and tasks come due
    /// without waiting.
    clock: Clock,
}

impl Fixture {
    async fn redis() -> Self {
        let (redis, store, clock) =
            common::tasks::clocked_store(common::tasks::Backend::Redis).await;
        Self::on(redis, store, clock)
    }

    async fn memory() -> Self {
        let (redis, store, clock) =
            common::tasks::clocked_store(common::tasks::Backend::Memory).await;
        Self::on(redis, store, clock)
    }

    async fn cluster() -> Self {
        let (cluster, store, clock) = common::tasks::clocked_cluster_store().await;
        let mut f = Self::on(None, store, clock);
        f.cluster = Some(cluster);
        f
    }

    /// A direct connection to the Redis node holding the queue's keys
    /// (on a Cluster, its slot's master); `None` on the embedded store.
    async fn raw(&self) -> Option<redis::aio::MultiplexedConnection> {
        if let Some(redis) = &self.redis {
            return Some(redis.conn().await);
        }
        let cluster = self.cluster.as_ref()?;
        let port = cluster.master_of(&self.keys.ready()).await;
        Some(cluster.nodes.iter().find(|n| n.port == port)?.conn().await)
    }

    fn on(redis: Option<TestRedis>, store: TaskStore, clock: Clock) -> Self {
        let queue = QueueName::parse("research").unwrap();
        let keys = QueueKeys::new("koo", &queue);
        Fixture {
            redis,
            cluster: None,
            store,
            keys,
            queue,
            clock,
        }
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
    leases_follow_priority_then_submission_order,
    lapsed_lease_is_recovered_and_the_old_holder_fenced,
    a_take_over_fences_out_the_former_holder,
    poison_task_is_dead_lettered,
    acks_early_fails_a_lost_task_visibly,
    retries_then_fails_when_the_budget_is_spent,
    workers_lease_only_the_names_they_serve,
    hard_limit_ends_a_task_timed_out,
    a_lease_lapsed_before_the_hard_limit_is_a_lost_worker,
    scheduling_and_result_expiry,
    sweep_queues_due_scheduled_tasks,
    progress_and_events_are_fenced_and_ordered,
    finish_and_lease_takes_the_next_task_in_one_step,
    a_paused_queue_leases_nothing_until_resumed,
    an_expired_dead_letter_is_dropped_when_requeued,
    history_is_trimmed_at_the_cap,
    the_store_clock_moves_due_times_and_leases,
    idempotency_claims_expire_on_the_store_clock,
    expired_tasks_never_lease_nor_exhaust_the_scan,
);

/// Scenarios on a Redis Cluster too (three masters, three replicas; the
/// queue's keys in one slot): `task_store::cluster::<scenario>`. Every
/// scenario above passed there; these eleven cover each transition script
/// while keeping the Cluster cases' wall time (a cluster each) bounded.
mod cluster {
    macro_rules! on_cluster {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::cluster().await).await;
                }
            )*
        };
    }

    on_cluster!(
        leases_follow_priority_then_submission_order,
        lapsed_lease_is_recovered_and_the_old_holder_fenced,
        a_take_over_fences_out_the_former_holder,
        poison_task_is_dead_lettered,
        scheduling_and_result_expiry,
        progress_and_events_are_fenced_and_ordered,
        finish_and_lease_takes_the_next_task_in_one_step,
        a_paused_queue_leases_nothing_until_resumed,
        history_is_trimmed_at_the_cap,
        idempotency_claims_expire_on_the_store_clock,
        expired_tasks_never_lease_nor_exhaust_the_scan,
    );
}

impl Fixture {
    fn task(&self, name: &str, priority: Priority, max_retries: u32) -> Task {
        common::tasks::queued_task(&self.queue, name, priority, max_retries)
    }

    async fn submit(&self, task: &Task) {
        self.store
            .submit(task, Duration::ZERO, TaskLimits::default(), later())
            .await
            .unwrap();
    }

    async fn lease(&self, worker: &str, lease: Duration) -> Option<Task> {
        self.store
            .lease(
                &self.queue,
                worker,
                lease,
                &["*"],
                TaskLimits::default(),
                later(),
            )
            .await
            .unwrap()
    }

    async fn finish(&self, id: &TaskId, token: u32, outcome: Outcome) -> Option<State> {
        self.finish_waited(id, token, outcome)
            .await
            .map(|(state, _)| state)
    }

    /// [`Self::finish`], and whether tasks wait on it.
    async fn finish_waited(
        &self,
        id: &TaskId,
        token: u32,
        outcome: Outcome,
    ) -> Option<(State, bool)> {
        self.store
            .finish(
                id,
                token,
                &outcome,
                "{\"worker\":\"w\"}",
                TaskLimits::default(),
                later(),
            )
            .await
            .unwrap()
    }

    async fn get(&self, id: &TaskId) -> Task {
        self.store
            .get(id, later())
            .await
            .unwrap()
            .expect("task exists")
    }

    /// Runs recovery until it has recovered something (a lease of 1 ms lapses
    /// on Redis's clock within a few milliseconds).
    async fn recover_lapsed(&self, acks_late: bool) {
        let until = Instant::now() + common::EVENT_TIMEOUT;
        while self
            .store
            .recover(&self.queue, acks_late, TaskLimits::default(), later())
            .await
            .unwrap()
            .handled
            == 0
        {
            assert!(Instant::now() < until, "lease never lapsed");
            tokio::task::yield_now().await;
        }
    }
}

/// A full Redis (`maxmemory` under `noeviction`) refuses writes, but not a
/// heartbeat, which grows nothing: a healthy worker keeps its lease while
/// Redis is full, instead of losing it and burning the task's retries; nor
/// a take-over (a worker re-attaching its task after a koo restart).
#[tokio::test]
async fn a_full_redis_still_takes_heartbeats() {
    let f = Fixture::redis().await;
    let mut conn = f.raw().await.expect("a Redis");
    let task = f.task("t", Priority::Normal, 3);
    f.submit(&task).await;
    f.lease("w", Duration::from_secs(60)).await.unwrap();
    let full = |limit: &str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(limit)
            .to_owned()
    };
    let () = full("1").query_async(&mut conn).await.unwrap();
    let refused: redis::RedisResult<()> = conn.set("grows", "x").await;
    let refused = refused.expect_err("Redis is full").to_string();
    let beat = f
        .store
        .heartbeat(&task.id, 1, Duration::from_secs(60), later())
        .await;
    let lease = Duration::from_secs(60);
    let took = f.store.take_over(&task.id, 1, "w2", lease, later()).await;
    let () = full("0").query_async(&mut conn).await.unwrap();
    assert!(refused.contains("OOM"), "{refused}");
    assert_eq!(beat.unwrap(), Beat::Held);
    let cancel = None;
    assert_eq!(took.unwrap(), TakeOver::Taken { token: 2, cancel });
}

/// What a task's end leaves in Redis expires with its result: the hash, its
/// log, and the set of the tasks that wait on it; a task cancelled while it
/// waits takes its own set of dependencies along; a success after a retried
/// attempt carries no error, and its attempt no progress of the one before.
/// (The end of an attempt reads and writes only what exists: these are the
/// cases it must still cover.)
#[tokio::test]
async fn what_an_ended_task_leaves_in_redis_expires_with_it() {
    let f = Fixture::redis().await;
    let mut conn = f.raw().await.expect("a Redis");
    let key = |id: &TaskId, suffix: &str| format!("{}{suffix}", f.keys.task(id));
    let a = f.task("a", Priority::Normal, 1);
    f.submit(&a).await;
    let b = f.task("b", Priority::Normal, 0);
    let c = f.task("c", Priority::Normal, 0);
    for t in [&b, &c] {
        let reply = f.store.depend_on(&a.id, &t.id, later()).await.unwrap();
        assert!(matches!(reply, DependReply::Waiting), "{reply:?}");
        f.store
            .submit_pending(
                t,
                std::slice::from_ref(&a.id),
                TaskLimits::default(),
                later(),
            )
            .await
            .unwrap();
    }
    f.store
        .cancel(&c.id, "not needed", TaskLimits::default(), later())
        .await
        .unwrap();
    let c_deps: i64 = conn.pttl(key(&c.id, ":deps")).await.unwrap();
    assert!(
        c_deps > 0,
        "a cancelled waiting task's :deps expires: PTTL {c_deps}"
    );

    // a: a first attempt with progress that asks for a retry, then a success
    let first = f.lease("w", Duration::from_secs(60)).await.unwrap();
    assert_eq!((first.id.clone(), first.attempts), (a.id.clone(), 1));
    f.store
        .progress(&a.id, 1, "{\"done\":0.5}", TaskLimits::default(), later())
        .await
        .unwrap();
    let retry = Outcome::Retry {
        error: "{\"message\":\"once\"}".into(),
        delay: Duration::ZERO,
    };
    assert_eq!(f.finish(&a.id, 1, retry).await, Some(State::Scheduled));
    let second = f.lease("w", Duration::from_secs(60)).await.unwrap();
    assert_eq!((second.id.clone(), second.attempts), (a.id.clone(), 2));
    assert_eq!(second.progress, None, "progress belongs to its attempt");
    let (state, waited_on) = f
        .finish_waited(&a.id, 2, Outcome::Succeeded("1".into()))
        .await
        .expect("not fenced");
    assert_eq!((state, waited_on), (State::Succeeded, true));
    let ended = f.get(&a.id).await;
    assert_eq!(
        ended.error, None,
        "a success clears the earlier attempt's error"
    );
    for suffix in ["", ":log", ":dependents"] {
        let ttl: i64 = conn.pttl(key(&a.id, suffix)).await.unwrap();
        assert!(
            ttl > 0 && ttl <= 60_000,
            "{suffix:?} of the ended task: PTTL {ttl}"
        );
    }
    let deps: bool = conn.exists(key(&a.id, ":deps")).await.unwrap();
    assert!(!deps, "a task that waited on nothing has no :deps");

    // a task nobody waits on ends without a :dependents set, and says so
    let lone = f.task("lone", Priority::Normal, 0);
    f.submit(&lone).await;
    let leased = f.lease("w", Duration::from_secs(60)).await.unwrap();
    assert_eq!(leased.id, lone.id);
    let (_, waited_on) = f
        .finish_waited(&lone.id, 1, Outcome::Succeeded("2".into()))
        .await
        .expect("not fenced");
    assert!(!waited_on);
    for suffix in [":deps", ":dependents"] {
        let exists: bool = conn.exists(key(&lone.id, suffix)).await.unwrap();
        assert!(!exists, "{suffix} of a task nobody waited on");
    }
    let ttl: i64 = conn.pttl(key(&lone.id, "")).await.unwrap();
    assert!(ttl > 0, "PTTL {ttl}");
}

/// Within a queue, higher priority runs first and equal priorities in
/// submission order.
async fn leases_follow_priority_then_submission_order(f: Fixture) {
    let order = [
        ("low", Priority::Low),
        ("normal-1", Priority::Normal),
        ("critical", Priority::Critical),
        ("high", Priority::High),
        ("normal-2", Priority::Normal),
    ];
    for (name, priority) in order {
        // Submits in the same Redis millisecond tie on score and fall back
        // on the id, a v7 uuid that orders by creation within a process.
        f.submit(&f.task(name, priority, 3)).await;
    }
    let mut leased = Vec::new();
    while let Some(t) = f.lease("w", Duration::from_secs(60)).await {
        assert_eq!(t.state, State::Running);
        assert_eq!(t.attempts, 1);
        leased.push(t.name);
    }
    assert_eq!(leased, ["critical", "high", "normal-1", "normal-2", "low"]);
}

/// A lapsed lease goes back to the queue with its attempt counted; the old
/// holder is fenced (heartbeat and completion refused) and the new holder's
/// completion stands, with both attempts in the log.
async fn lapsed_lease_is_recovered_and_the_old_holder_fenced(f: Fixture) {
    let task = f.task("t", Priority::Normal, 3);
    f.submit(&task).await;
    let first = f.lease("zombie", Duration::from_millis(1)).await.unwrap();
    assert_eq!(first.attempts, 1);
    f.recover_lapsed(true).await;
    assert_eq!(f.get(&task.id).await.state, State::Queued);
    let heartbeat = f
        .store
        .heartbeat(&task.id, 1, Duration::from_secs(60), later())
        .await
        .unwrap();
    assert_eq!(heartbeat, Beat::Lost, "zombie heartbeat accepted");
    let second = f.lease("healthy", Duration::from_secs(60)).await.unwrap();
    assert_eq!(second.attempts, 2);
    assert_eq!(
        f.finish(&task.id, 1, Outcome::Succeeded("\"late\"".into()))
            .await,
        None
    );
    assert_eq!(
        f.finish(&task.id, 2, Outcome::Succeeded("\"ok\"".into()))
            .await,
        Some(State::Succeeded)
    );
    let done = f.get(&task.id).await;
    assert_eq!(done.result.as_deref(), Some("\"ok\""));
    assert_eq!(done.attempts, 2);
    assert_eq!(done.log.len(), 2, "{:?}", done.log);
    assert!(done.log[0].contains("worker lost"), "{:?}", done.log);
    // the first result stays: a second completion is refused
    assert_eq!(
        f.finish(&task.id, 2, Outcome::Succeeded("\"again\"".into()))
            .await,
        None
    );
}

/// A take-over (a worker re-attaching its task to a new stream) moves the
/// lease to the new worker under the next token, the same attempt: the
/// former holder's heartbeat, take-over and report are fenced, the lease
/// runs on from the take-over, and a cancel asked for comes with it.
async fn a_take_over_fences_out_the_former_holder(f: Fixture) {
    let task = f.task("t", Priority::Normal, 3);
    f.submit(&task).await;
    let first = f.lease("old", Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.token, 1);
    f.clock.advance(Duration::from_secs(8));
    let lease = Duration::from_secs(60);
    let took = f.store.take_over(&task.id, 1, "new", lease, later()).await;
    let took = took.unwrap();
    assert_eq!(
        took,
        TakeOver::Taken {
            token: 2,
            cancel: None
        }
    );
    let t = f.get(&task.id).await;
    assert_eq!(
        (t.state, t.attempts, t.token, t.worker.as_deref()),
        (State::Running, 1, 2, Some("new"))
    );
    // not a give-back: a task re-attached often keeps its hand-backs
    assert_eq!((t.takeovers, t.given_back()), (1, 0));
    let beat = f.store.heartbeat(&task.id, 1, lease, later()).await;
    assert_eq!(beat.unwrap(), Beat::Lost, "the former holder's heartbeat");
    let again = f
        .store
        .take_over(&task.id, 1, "third", lease, later())
        .await;
    assert_eq!(again.unwrap(), TakeOver::Lost);
    // past the first lease's end: the taken-over one still runs
    f.clock.advance(Duration::from_secs(8));
    let recovered = f
        .store
        .recover(&f.queue, true, TaskLimits::default(), later())
        .await
        .unwrap()
        .handled;
    assert_eq!(recovered, 0, "the taken-over lease runs from the take-over");
    f.store
        .cancel(&task.id, "stop", TaskLimits::default(), later())
        .await
        .unwrap();
    let took = f
        .store
        .take_over(&task.id, 2, "newer", lease, later())
        .await;
    let cancel = Some("stop".to_owned());
    assert_eq!(took.unwrap(), TakeOver::Taken { token: 3, cancel });
    let late = Outcome::Succeeded("\"late\"".into());
    assert_eq!(f.finish(&task.id, 2, late).await, None);
    let ok = Outcome::Succeeded("\"ok\"".into());
    assert_eq!(f.finish(&task.id, 3, ok).await, Some(State::Succeeded));
    assert_eq!(f.get(&task.id).await.attempts, 1);
}

/// A task that kills its worker every time is dead-lettered after
/// max_retries + 1 attempts instead of looping.
async fn poison_task_is_dead_lettered(f: Fixture) {
    let task = f.task("poison", Priority::Normal, 1);
    f.submit(&task).await;
    for attempt in 1..=2 {
        let t = f
            .lease("w", Duration::from_millis(1))
            .await
            .expect("leasable");
        assert_eq!(t.attempts, attempt);
        f.recover_lapsed(true).await;
    }
    let dead = f.get(&task.id).await;
    assert_eq!(dead.state, State::Failed);
    assert!(dead.error.unwrap().contains("worker lost"));
    assert!(f.lease("w", Duration::from_secs(1)).await.is_none());
    let stats = f.store.queue_stats(&f.queue, later()).await.unwrap();
    assert_eq!(stats.dead, 1);
    assert_eq!(stats.counts.get(koo::domain::Count::Lost), 2);
    if let Some(mut conn) = f.raw().await {
        let dead_ids: Vec<String> = conn.zrange(f.keys.dead(), 0, -1).await.unwrap();
        assert_eq!(dead_ids, [task.id.to_string()]);
    }
}

/// With acks late off, a lost worker's task ends FAILED ('worker lost'),
/// visibly, rather than running again.
async fn acks_early_fails_a_lost_task_visibly(f: Fixture) {
    let task = f.task("t", Priority::Normal, 3);
    f.submit(&task).await;
    f.lease("w", Duration::from_millis(1)).await.unwrap();
    f.recover_lapsed(false).await;
    let t = f.get(&task.id).await;
    assert_eq!(t.state, State::Failed);
    assert_eq!(t.attempts, 1);
}

/// A retryable failure reschedules the task after its backoff and runs it
/// again; when the budget is spent it fails for good. The log records each
/// attempt's retry time.
async fn retries_then_fails_when_the_budget_is_spent(f: Fixture) {
    let task = f.task("flaky", Priority::Normal, 2);
    f.submit(&task).await;
    let retry = || Outcome::Retry {
        error: "{\"message\":\"try again\"}".into(),
        delay: Duration::ZERO,
    };
    for attempt in 1..=3 {
        let t = f
            .lease("w", Duration::from_secs(60))
            .await
            .expect("due again");
        assert_eq!(t.attempts, attempt);
        let expected = if attempt < 3 {
            State::Scheduled
        } else {
            State::Failed
        };
        assert_eq!(f.finish(&task.id, attempt, retry()).await, Some(expected));
    }
    let t = f.get(&task.id).await;
    assert_eq!(t.state, State::Failed);
    assert_eq!(t.log.len(), 3);
    assert!(
        t.log[0].contains("retry_at_ms") && t.log[1].contains("retry_at_ms"),
        "{:?}",
        t.log
    );
}

/// A worker gets only tasks whose names it serves; others stay queued.
async fn workers_lease_only_the_names_they_serve(f: Fixture) {
    let task = f.task("koo.tasks.ai_service.process_query", Priority::Normal, 3);
    f.submit(&task).await;
    let none = f
        .store
        .lease(
            &f.queue,
            "w",
            Duration::from_secs(1),
            &["koo.noop"],
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap();
    assert!(none.is_none());
    assert_eq!(f.get(&task.id).await.state, State::Queued);
    let some = f
        .store
        .lease(
            &f.queue,
            "w",
            Duration::from_secs(1),
            &["koo.tasks.ai_service.process_query"],
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap();
    assert_eq!(some.unwrap().id, task.id);
}

/// A task running past its hard limit ends TIMED_OUT even if its worker
/// keeps heartbeating.
async fn hard_limit_ends_a_task_timed_out(f: Fixture) {
    let mut task = f.task("slow", Priority::Normal, 3);
    task.hard_ms = 1;
    f.submit(&task).await;
    f.lease("w", Duration::from_secs(60)).await.unwrap();
    // heartbeats do not push a lease past the hard limit
    f.store
        .heartbeat(&task.id, 1, Duration::from_secs(60), later())
        .await
        .unwrap();
    f.recover_lapsed(true).await;
    let t = f.get(&task.id).await;
    assert_eq!(t.state, State::TimedOut);
    assert!(t.error.unwrap().contains("hard time limit"));
}

/// A lease that lapsed before the task's hard limit is a lost worker, its
/// task retried, even when the sweep first looks after the limit (koo
/// down, Redis paused): only a limit that came while the lease held times
/// a task out. (It ended TIMED_OUT with its retries unused.)
async fn a_lease_lapsed_before_the_hard_limit_is_a_lost_worker(f: Fixture) {
    let mut task = f.task("t", Priority::Normal, 3);
    task.hard_ms = 5_000;
    f.submit(&task).await;
    f.lease("gone", Duration::from_secs(1)).await.unwrap();
    // nobody sweeps until the hard limit has passed too
    f.clock.advance(Duration::from_secs(10));
    f.recover_lapsed(true).await;
    let t = f.get(&task.id).await;
    assert_eq!(t.state, State::Queued, "{:?}", t.error);
    assert!(t.log[0].contains("worker lost"), "{:?}", t.log);
}

/// A scheduled task is not leased before it is due; an ended task's
/// result expires after its result TTL, and its history summary stays.
async fn scheduling_and_result_expiry(f: Fixture) {
    let later_task = f.task("later", Priority::Critical, 0);
    f.store
        .submit(
            &later_task,
            Duration::from_secs(60),
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap();
    assert_eq!(f.get(&later_task.id).await.state, State::Scheduled);
    assert!(f.lease("w", Duration::from_secs(1)).await.is_none());
    let mut now_task = f.task("now", Priority::Normal, 0);
    now_task.result_ttl_ms = 5_000;
    f.submit(&now_task).await;
    let t = f.lease("w", Duration::from_secs(60)).await.unwrap();
    assert_eq!(t.id, now_task.id);
    f.finish(&now_task.id, 1, Outcome::Succeeded("42".into()))
        .await;
    let history = f
        .store
        .history_page(&f.queue, i64::MAX, None, 0, 10, later())
        .await
        .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].0, now_task.id.as_str());
    assert!(history[0].2.contains("succeeded"), "{history:?}");
    if let Some(mut conn) = f.raw().await {
        let ttl: i64 = conn.pttl(f.keys.task(&now_task.id)).await.unwrap();
        assert!(ttl > 0 && ttl <= 5_000, "{ttl}");
        let history_ttl: i64 = conn.pttl(f.keys.history_data()).await.unwrap();
        assert_eq!(history_ttl, -1, "history is bounded by its cap, not a TTL");
    }
    // A result of 1 ms expires: the task reads as gone, its summary stays.
    let mut brief = f.task("brief", Priority::Normal, 0);
    brief.result_ttl_ms = 1;
    f.submit(&brief).await;
    f.lease("w", Duration::from_secs(60)).await.unwrap();
    f.finish(&brief.id, 1, Outcome::Succeeded("1".into())).await;
    let until = Instant::now() + common::EVENT_TIMEOUT;
    while f.store.get(&brief.id, later()).await.unwrap().is_some() {
        assert!(Instant::now() < until, "result never expired");
        // the sweep is what forgets expired results on the embedded store
        f.store
            .recover(&f.queue, true, TaskLimits::default(), later())
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    let history = f
        .store
        .history_page(&f.queue, i64::MAX, None, 0, 10, later())
        .await
        .unwrap();
    assert_eq!(history.len(), 2, "summaries outlive results");
}

/// The recovery sweep also queues due scheduled tasks, so that they show as
/// queued even when no worker is looking at their queue.
async fn sweep_queues_due_scheduled_tasks(f: Fixture) {
    let task = f.task("soon", Priority::Normal, 0);
    f.store
        .submit(
            &task,
            Duration::from_millis(1),
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap();
    assert_eq!(f.get(&task.id).await.state, State::Scheduled);
    f.recover_lapsed(true).await;
    assert_eq!(f.get(&task.id).await.state, State::Queued);
    assert_eq!(
        f.lease("w", Duration::from_secs(1)).await.unwrap().id,
        task.id
    );
}

/// Progress is recorded only under the current lease; every transition is an
/// event, in order, and a reader resumed from a position sees exactly what
/// followed it.
async fn progress_and_events_are_fenced_and_ordered(f: Fixture) {
    let mut reader = f.store.event_reader(&f.queue, None, later()).await.unwrap();
    let task = f.task("t", Priority::Normal, 0);
    f.submit(&task).await;
    f.lease("w", Duration::from_secs(60)).await.unwrap();
    let progress = "{\"percent\":50.0}";
    assert!(
        f.store
            .progress(&task.id, 1, progress, TaskLimits::default(), later())
            .await
            .unwrap()
    );
    assert!(
        !f.store
            .progress(&task.id, 2, progress, TaskLimits::default(), later())
            .await
            .unwrap(),
        "progress under a token never issued"
    );
    assert_eq!(f.get(&task.id).await.progress.as_deref(), Some(progress));
    f.finish(&task.id, 1, Outcome::Succeeded("null".into()))
        .await
        .unwrap();
    let mut events = Vec::new();
    while events.len() < 4 {
        let got = reader.next(common::EVENT_TIMEOUT, 1000).await.unwrap();
        assert!(!got.is_empty(), "events stopped after {events:?}");
        events.extend(got);
    }
    let states: Vec<_> = events.iter().map(|e| e.state.as_str()).collect();
    assert_eq!(states, ["queued", "running", "running", "succeeded"]);
    assert_eq!(events[2].progress.as_deref(), Some(progress));
    assert!(
        events
            .iter()
            .all(|e| e.id == task.id.as_str() && e.name == "t")
    );
    let mut resumed = f
        .store
        .event_reader(&f.queue, Some(&events[1].stream_id), later())
        .await
        .unwrap();
    let rest = resumed.next(common::EVENT_TIMEOUT, 1000).await.unwrap();
    let rest: Vec<_> = rest.iter().map(|e| e.stream_id.as_str()).collect();
    assert_eq!(rest, [&events[2].stream_id, &events[3].stream_id]);
    assert_eq!(resumed.position(), events[3].stream_id);
    // nothing more: the wait ends empty
    assert!(
        resumed
            .next(Duration::from_millis(20), 1000)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A busy worker's one call: the finish is recorded and the next task of the
/// queue leased to it; a fenced finish leases nothing.
async fn finish_and_lease_takes_the_next_task_in_one_step(f: Fixture) {
    let first = f.task("a", Priority::High, 0);
    let second = f.task("b", Priority::Normal, 0);
    f.submit(&first).await;
    f.submit(&second).await;
    let leased = f.lease("w", Duration::from_secs(60)).await.unwrap();
    assert_eq!(leased.id, first.id);
    let ask = LeaseAsk {
        worker: "w",
        lease: Duration::from_secs(60),
        names: &["*"],
    };
    let fenced = f
        .store
        .finish_and_lease(
            &first.id,
            7,
            &Outcome::Succeeded("1".into()),
            "{}",
            &ask,
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap();
    assert!(fenced.is_none());
    assert_eq!(
        f.get(&second.id).await.state,
        State::Queued,
        "nothing leased"
    );
    let ((state, _), next) = f
        .store
        .finish_and_lease(
            &first.id,
            1,
            &Outcome::Succeeded("1".into()),
            "{}",
            &ask,
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state, State::Succeeded);
    let next = next.task().expect("the second task");
    assert_eq!(
        (next.id.clone(), next.state, next.attempts),
        (second.id.clone(), State::Running, 1)
    );
    assert_eq!(f.get(&first.id).await.result.as_deref(), Some("1"));
    let (_, none) = f
        .store
        .finish_and_lease(
            &second.id,
            1,
            &Outcome::Succeeded("2".into()),
            "{}",
            &ask,
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(none.task().is_none(), "the queue is empty");
    assert_eq!(f.get(&second.id).await.state, State::Succeeded);
}

/// A paused queue: lease and the chained lease of finish-and-lease hand out
/// nothing (the finish itself applies); a second pause keeps the first's
/// who and why; the stats show it; resumed, the next lease gets the task.
async fn a_paused_queue_leases_nothing_until_resumed(f: Fixture) {
    let first = f.task("a", Priority::High, 0);
    let second = f.task("b", Priority::Normal, 0);
    f.submit(&first).await;
    f.submit(&second).await;
    let leased = f.lease("w", Duration::from_secs(60)).await.unwrap();
    let pause = koo::domain::Pause {
        by: "ops".into(),
        reason: "outage".into(),
        at_ms: 1,
    };
    let now = f
        .store
        .set_pause(&f.queue, Some(&pause), later())
        .await
        .unwrap();
    assert_eq!(now.as_ref(), Some(&pause));
    let other = koo::domain::Pause {
        by: "someone".into(),
        ..pause.clone()
    };
    let kept = f
        .store
        .set_pause(&f.queue, Some(&other), later())
        .await
        .unwrap();
    assert_eq!(kept.as_ref(), Some(&pause), "the first pause stays");
    assert_eq!(f.lease("w", Duration::from_secs(60)).await, None);
    let ask = LeaseAsk {
        worker: "w",
        lease: Duration::from_secs(60),
        names: &["*"],
    };
    let ((state, _), next) = f
        .store
        .finish_and_lease(
            &leased.id,
            leased.token,
            &Outcome::Succeeded("1".into()),
            "{}",
            &ask,
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state, State::Succeeded, "the finish applies");
    assert!(
        next.task().is_none(),
        "no chained lease from a paused queue"
    );
    let stats = f.store.queue_stats(&f.queue, later()).await.unwrap();
    assert_eq!((stats.ready, stats.paused), (1, Some(pause)));
    assert_eq!(
        f.store.set_pause(&f.queue, None, later()).await.unwrap(),
        None
    );
    assert_eq!(
        f.store.set_pause(&f.queue, None, later()).await.unwrap(),
        None
    );
    let resumed = f.lease("w", Duration::from_secs(60)).await.unwrap();
    assert_eq!(resumed.id, second.id);
    assert_eq!(
        f.store.queue_stats(&f.queue, later()).await.unwrap().paused,
        None
    );
}

/// A dead letter whose retention (result and dead-letter TTL) has passed
/// cannot run again: a requeue finds it missing and drops it, so it no
/// longer counts or blocks newer ones.
async fn an_expired_dead_letter_is_dropped_when_requeued(f: Fixture) {
    let mut task = f.task("doomed", Priority::Normal, 0);
    task.result_ttl_ms = 1;
    f.submit(&task).await;
    f.lease("w", Duration::from_secs(60)).await.unwrap();
    let brief = TaskLimits {
        dead_ttl: Duration::from_millis(1),
        ..TaskLimits::default()
    };
    let failed = Outcome::Failed("{}".into());
    f.store
        .finish(&task.id, 1, &failed, "{}", brief, later())
        .await
        .unwrap()
        .expect("the lease holder's finish is accepted");
    assert_eq!(
        f.store.queue_stats(&f.queue, later()).await.unwrap().dead,
        1
    );
    let until = Instant::now() + common::EVENT_TIMEOUT;
    while f.store.get(&task.id, later()).await.unwrap().is_some() {
        assert!(Instant::now() < until, "result never expired");
        f.store
            .recover(&f.queue, true, TaskLimits::default(), later())
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(
        f.store
            .retry(&task.id, TaskLimits::default(), later())
            .await
            .unwrap(),
        koo::store::tasks::RetryReply::Missing
    );
    assert_eq!(
        f.store.queue_stats(&f.queue, later()).await.unwrap().dead,
        0
    );
}

/// History keeps exactly its cap on both stores: the oldest entries (and
/// their summaries) go as soon as it is over, not a hundred at a time.
async fn history_is_trimmed_at_the_cap(f: Fixture) {
    let limits = TaskLimits {
        history: 3,
        ..TaskLimits::default()
    };
    let mut ids = Vec::new();
    for i in 0..5 {
        let t = f.task(&format!("t{i}"), Priority::Normal, 0);
        f.submit(&t).await;
        f.store
            .cancel(&t.id, "done", limits, later())
            .await
            .unwrap();
        ids.push(t.id.to_string());
    }
    let page = f
        .store
        .history_page(&f.queue, i64::MAX, None, 0, 100, later())
        .await
        .unwrap();
    let mut kept: Vec<String> = page.into_iter().map(|(id, _, _)| id).collect();
    kept.sort();
    assert_eq!(kept, ids[2..], "the newest three stay");
    if let Some(mut conn) = f.raw().await {
        let summaries: u64 = conn.hlen(f.keys.history_data()).await.unwrap();
        let entries: u64 = conn.zcard(f.keys.history()).await.unwrap();
        assert_eq!((entries, summaries), (3, 3));
    }
}

/// Moving the store's clock (as the parity test does) brings a scheduled
/// task due and lets a lease lapse, on Redis (the scripts add the offset to
/// `TIME`) as on the embedded store; the old holder is fenced.
async fn the_store_clock_moves_due_times_and_leases(f: Fixture) {
    let t = f.task("later", Priority::Normal, 3);
    f.store
        .submit(&t, Duration::from_secs(60), TaskLimits::default(), later())
        .await
        .unwrap();
    assert!(f.lease("w", Duration::from_secs(30)).await.is_none());
    f.clock.advance(Duration::from_secs(61));
    let leased = f.lease("w", Duration::from_secs(30)).await.expect("due");
    assert_eq!(leased.id, t.id);
    let recovered = f
        .store
        .recover(&f.queue, true, TaskLimits::default(), later())
        .await
        .unwrap()
        .handled;
    assert_eq!(recovered, 0, "the lease still runs");
    f.clock.advance(Duration::from_secs(31));
    let recovered = f
        .store
        .recover(&f.queue, true, TaskLimits::default(), later())
        .await
        .unwrap()
        .handled;
    assert_eq!(recovered, 1);
    assert_eq!(f.get(&t.id).await.state, State::Queued);
    let beat = f
        .store
        .heartbeat(&t.id, leased.token, Duration::from_secs(30), later())
        .await
        .unwrap();
    assert_eq!(beat, Beat::Lost);
}

/// An idempotency claim holds for its TTL on the store's clock: on Redis
/// the key's TTL is stretched by the clock's offset and a claim counts as
/// live only while more than the offset is left, so moving the clock
/// expires claims there as on the embedded store.
async fn idempotency_claims_expire_on_the_store_clock(f: Fixture) {
    let ttl = Duration::from_secs(60);
    let s = &f.store;
    assert_eq!(
        s.claim_idempotency("k", "a", ttl, later()).await.unwrap(),
        None
    );
    let held = s.claim_idempotency("k", "b", ttl, later()).await.unwrap();
    assert_eq!(held.as_deref(), Some("a"));
    let keys = ["k".to_owned(), "other".to_owned()];
    let claimed = s.idempotency_claimed(&keys, later()).await.unwrap();
    assert_eq!(claimed, [true, false]);
    f.clock.advance(Duration::from_secs(30));
    let held = s.claim_idempotency("k", "b", ttl, later()).await.unwrap();
    assert_eq!(held.as_deref(), Some("a"), "30 s into 60 it holds");
    assert!(
        s.swap_idempotency("k", "a", "c", ttl, later())
            .await
            .unwrap()
    );
    f.clock.advance(Duration::from_secs(61));
    let claimed = s.idempotency_claimed(&keys, later()).await.unwrap();
    assert_eq!(claimed, [false, false], "the swapped claim ran its 60 s");
    assert!(
        !s.swap_idempotency("k", "c", "d", ttl, later())
            .await
            .unwrap()
    );
    assert_eq!(
        s.claim_idempotency("k", "e", ttl, later()).await.unwrap(),
        None
    );
    let claimed = s.idempotency_claimed(&keys, later()).await.unwrap();
    assert_eq!(claimed, [true, false]);
}

/// A pile of expired tasks ahead of a live one (more than the scan limit)
/// does not hide it: the lease ends them on the way (CANCELLED, "cancelled:
/// expired", no attempt), hands out the live one, and never an expired one;
/// the sweep ends a scheduled task past its expiry.
async fn expired_tasks_never_lease_nor_exhaust_the_scan(f: Fixture) {
    let limits = TaskLimits {
        lease_scan: 10,
        ..TaskLimits::default()
    };
    let now = koo::store::unix_millis(std::time::SystemTime::now());
    let mut expired = Vec::new();
    for _ in 0..105 {
        let mut t = f.task("job", Priority::Normal, 3);
        t.expire_ms = Some(now + 1_000);
        f.submit(&t).await;
        expired.push(t.id);
    }
    let live = f.task("job", Priority::Normal, 3);
    f.submit(&live).await;
    let mut due = f.task("job", Priority::Normal, 3);
    due.expire_ms = Some(now + 1_000);
    f.store
        .submit(&due, Duration::from_secs(600), limits, later())
        .await
        .unwrap();
    f.clock.advance(Duration::from_secs(2));
    let leased = f
        .store
        .lease(
            &f.queue,
            "w",
            Duration::from_secs(30),
            &["*"],
            limits,
            later(),
        )
        .await
        .unwrap()
        .expect("the live task, behind 105 expired ones");
    assert_eq!(leased.id, live.id);
    for id in [&expired[0], &expired[104]] {
        let t = f.store.get(id, later()).await.unwrap().unwrap();
        assert_eq!((t.state, t.attempts), (State::Cancelled, 0));
        assert!(t.error.unwrap().contains("cancelled: expired"));
    }
    let stats = f.store.queue_stats(&f.queue, later()).await.unwrap();
    assert_eq!((stats.ready, stats.scheduled), (0, 1));
    f.store
        .recover(&f.queue, false, limits, later())
        .await
        .unwrap();
    let t = f.store.get(&due.id, later()).await.unwrap().unwrap();
    assert_eq!(
        t.state,
        State::Cancelled,
        "the sweep ends a due-later task past its expiry"
    );
    let stats = f.store.queue_stats(&f.queue, later()).await.unwrap();
    assert_eq!(stats.scheduled, 0);
}
