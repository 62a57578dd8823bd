//! The task engine's Redis transitions (issue 3, in progress), against a
//! real redis-server: priority order, leases and fencing tokens, recovery of
//! lapsed leases, retries, dead letters, time limits and result expiry.

mod common;

use std::time::{Duration, Instant};

use common::TestRedis;
use koo::keys::QueueKeys;
use koo::store::redis::{Outcome, TaskLimits};
use koo::store::{Deadline, RedisConfig, RedisStore};
use koo::tasks::model::{Category, Priority, QueueName, State, Task, TaskId};
use redis::AsyncCommands;

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

struct Fixture {
    redis: TestRedis,
    store: RedisStore,
    keys: QueueKeys,
    queue: QueueName,
}

async fn fixture() -> Fixture {
    let redis = TestRedis::start().await;
    let store = RedisStore::connect(&RedisConfig::new(redis.url())).unwrap();
    let queue = QueueName::parse("research").unwrap();
    let keys = QueueKeys::new("koo", &queue);
    Fixture {
        redis,
        store,
        keys,
        queue,
    }
}

impl Fixture {
    fn task(&self, name: &str, priority: Priority, max_retries: u32) -> Task {
        Task {
            id: TaskId::generate(&self.queue),
            name: name.into(),
            category: Category::Research,
            priority,
            args: "[]".into(),
            kwargs: "{}".into(),
            state: State::Queued,
            attempts: 0,
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
        }
    }

    async fn submit(&self, task: &Task) {
        self.store
            .submit_task(
                &self.keys,
                task,
                Duration::ZERO,
                TaskLimits::default(),
                later(),
            )
            .await
            .unwrap();
    }

    async fn lease(&self, worker: &str, lease: Duration) -> Option<Task> {
        self.store
            .lease_task(
                &self.keys,
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
        self.store
            .finish_task(
                &self.keys,
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
            .get_task(&self.keys, id, later())
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
            .recover_tasks(&self.keys, acks_late, TaskLimits::default(), later())
            .await
            .unwrap()
            == 0
        {
            assert!(Instant::now() < until, "lease never lapsed");
            tokio::task::yield_now().await;
        }
    }
}

/// Within a queue, higher priority runs first and equal priorities in
/// submission order.
#[tokio::test]
async fn leases_follow_priority_then_submission_order() {
    let f = fixture().await;
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
#[tokio::test]
async fn lapsed_lease_is_recovered_and_the_old_holder_fenced() {
    let f = fixture().await;
    let task = f.task("t", Priority::Normal, 3);
    f.submit(&task).await;
    let first = f.lease("zombie", Duration::from_millis(1)).await.unwrap();
    assert_eq!(first.attempts, 1);
    f.recover_lapsed(true).await;
    assert_eq!(f.get(&task.id).await.state, State::Queued);
    let heartbeat = f
        .store
        .heartbeat_task(&f.keys, &task.id, 1, Duration::from_secs(60), later())
        .await
        .unwrap();
    assert!(!heartbeat, "zombie heartbeat accepted");
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

/// A task that kills its worker every time is dead-lettered after
/// max_retries + 1 attempts instead of looping.
#[tokio::test]
async fn poison_task_is_dead_lettered() {
    let f = fixture().await;
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
    let mut conn = f.redis.conn().await;
    let dead_ids: Vec<String> = conn.zrange(f.keys.dead(), 0, -1).await.unwrap();
    assert_eq!(dead_ids, [task.id.to_string()]);
}

/// With acks late off, a lost worker's task ends FAILED ('worker lost'),
/// visibly, rather than running again.
#[tokio::test]
async fn acks_early_fails_a_lost_task_visibly() {
    let f = fixture().await;
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
#[tokio::test]
async fn retries_then_fails_when_the_budget_is_spent() {
    let f = fixture().await;
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
#[tokio::test]
async fn workers_lease_only_the_names_they_serve() {
    let f = fixture().await;
    let task = f.task("koo.tasks.ai_service.process_query", Priority::Normal, 3);
    f.submit(&task).await;
    let none = f
        .store
        .lease_task(
            &f.keys,
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
        .lease_task(
            &f.keys,
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
#[tokio::test]
async fn hard_limit_ends_a_task_timed_out() {
    let f = fixture().await;
    let mut task = f.task("slow", Priority::Normal, 3);
    task.hard_ms = 1;
    f.submit(&task).await;
    f.lease("w", Duration::from_secs(60)).await.unwrap();
    // heartbeats do not push a lease past the hard limit
    f.store
        .heartbeat_task(&f.keys, &task.id, 1, Duration::from_secs(60), later())
        .await
        .unwrap();
    f.recover_lapsed(true).await;
    let t = f.get(&task.id).await;
    assert_eq!(t.state, State::TimedOut);
    assert!(t.error.unwrap().contains("hard time limit"));
}

/// A scheduled task is not leased before it is due; an ended task's
/// result expires after its result TTL, and its history summary stays.
#[tokio::test]
async fn scheduling_and_result_expiry() {
    let f = fixture().await;
    let later_task = f.task("later", Priority::Critical, 0);
    f.store
        .submit_task(
            &f.keys,
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
    let mut conn = f.redis.conn().await;
    let ttl: i64 = conn.pttl(f.keys.task(&now_task.id)).await.unwrap();
    assert!(ttl > 0 && ttl <= 5_000, "{ttl}");
    let summary: Option<String> = conn
        .hget(f.keys.history_data(), now_task.id.as_str())
        .await
        .unwrap();
    assert!(summary.unwrap().contains("succeeded"));
    let history_ttl: i64 = conn.pttl(f.keys.history_data()).await.unwrap();
    assert_eq!(history_ttl, -1, "history is bounded by its cap, not a TTL");
}

/// The recovery sweep also queues due scheduled tasks, so that they show as
/// queued even when no worker is looking at their queue.
#[tokio::test]
async fn sweep_queues_due_scheduled_tasks() {
    let f = fixture().await;
    let task = f.task("soon", Priority::Normal, 0);
    f.store
        .submit_task(
            &f.keys,
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
