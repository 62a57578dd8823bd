//! Batched ends of attempts (issue 20): the store's `finish_batch` (one
//! script call on Redis) ends each item as `finish` would and leases the
//! next task for each accepted item that asks; the engine groups the ends
//! made while its calls are under way into one call. On a real
//! redis-server (each test its own, so that its script calls can be
//! counted), on the embedded store, and on a Redis Cluster.

use crate::common;

use std::time::Duration;

use koo::domain::Outcome;
use koo::domain::task::{Category, Priority, QueueName, State, Task};
use koo::store::tasks::{FinishItem, Leased, TaskLimits, TaskStore};
use koo::store::{Deadline, RedisConfig, RedisStore};
use koo::tasks::engine::{Finish, NewTask, TaskConfig, TaskEngine};

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

const LEASE: Duration = Duration::from_secs(60);

/// A store on `backend`, the Redis or Cluster under it kept alive.
struct Store {
    _held: common::tasks::HeldStore,
    store: TaskStore,
    queue: QueueName,
}

impl Store {
    async fn on(backend: common::tasks::Backend) -> Self {
        let held = common::tasks::HeldStore::on(backend).await;
        Self {
            store: held.store.clone(),
            _held: held,
            queue: QueueName::parse("research").unwrap(),
        }
    }

    async fn submit(&self, name: &str) -> Task {
        let task = common::tasks::queued_task(&self.queue, name, Priority::Normal, 3);
        self.store
            .submit(&task, Duration::ZERO, TaskLimits::default(), later())
            .await
            .unwrap();
        task
    }

    async fn lease(&self, worker: &str) -> Task {
        self.store
            .lease(
                &self.queue,
                worker,
                LEASE,
                &["*"],
                TaskLimits::default(),
                later(),
            )
            .await
            .unwrap()
            .expect("a task to lease")
    }

    /// One `finish_batch` of `items`, leasing any task (`*`).
    async fn batch(&self, items: &[FinishItem<'_>]) -> Vec<koo::store::tasks::BatchEnd> {
        self.store
            .finish_batch(
                &self.queue,
                items,
                LEASE,
                &["*"],
                TaskLimits::default(),
                later(),
            )
            .await
            .unwrap()
    }

    async fn state(&self, task: &Task) -> (State, String) {
        let t = self.store.get(&task.id, later()).await.unwrap().unwrap();
        (t.state, t.worker.unwrap_or_default())
    }
}

fn item<'a>(
    task: &'a Task,
    token: u32,
    outcome: &'a Outcome,
    next: Option<&'a str>,
) -> FinishItem<'a> {
    FinishItem {
        id: &task.id,
        token,
        outcome,
        log: "{}",
        next,
    }
}

crate::on_all_three!(a_batch_ends_each_item_and_leases_for_each_that_asks);

/// Each item ends as its own finish would (a success, a fenced one that
/// changes nothing and leases nothing, a retry that asks for no next
/// task); each accepted item that asks gets the next task, leased to its
/// worker; once the queue is dry, the later askers hear it.
async fn a_batch_ends_each_item_and_leases_for_each_that_asks(backend: common::tasks::Backend) {
    let s = Store::on(backend).await;
    let [a, b, c] = [
        s.submit("a").await,
        s.submit("b").await,
        s.submit("c").await,
    ];
    let d = s.submit("d").await;
    let e = s.submit("e").await;
    assert_eq!(s.lease("w1").await.id, a.id);
    assert_eq!(s.lease("w2").await.id, b.id);
    assert_eq!(s.lease("w3").await.id, c.id);
    let ok = Outcome::Succeeded("1".into());
    let retry = Outcome::Retry {
        error: r#"{"message":"again","retryable":true}"#.into(),
        delay: Duration::from_secs(60),
    };
    let items = [
        item(&a, 1, &ok, Some("w1")),
        item(&b, 9, &ok, Some("w2")),
        item(&c, 1, &retry, None),
    ];
    let ends = s.batch(&items).await;
    assert_eq!(ends.len(), 3);
    assert_eq!(ends[0].ended.as_ref().unwrap().unwrap().0, State::Succeeded);
    let Some(Leased::Task(next)) = &ends[0].next else {
        panic!("the first item's next task: {:?}", ends[0].next);
    };
    assert_eq!(
        (&next.id, next.state, next.attempts),
        (&d.id, State::Running, 1)
    );
    assert_eq!(s.state(&d).await, (State::Running, "w1".into()));
    // fenced: no change, no lease
    assert!(ends[1].ended.as_ref().unwrap().is_none());
    assert!(ends[1].next.is_none());
    assert_eq!(s.state(&b).await, (State::Running, "w2".into()));
    assert_eq!(ends[2].ended.as_ref().unwrap().unwrap().0, State::Scheduled);
    assert!(ends[2].next.is_none(), "it asked for none");
    assert_eq!(s.state(&e).await.0, State::Queued, "nobody else asked");
    // two askers, one task left: the second hears the queue is dry
    let items = [item(&b, 1, &ok, Some("w2")), item(&d, 1, &ok, Some("w1"))];
    let ends = s.batch(&items).await;
    assert!(
        ends.iter()
            .all(|e| e.ended.as_ref().unwrap().unwrap().0 == State::Succeeded)
    );
    let Some(Leased::Task(next)) = &ends[0].next else {
        panic!("b's worker gets e: {:?}", ends[0].next);
    };
    assert_eq!(next.id, e.id);
    assert_eq!(s.state(&e).await, (State::Running, "w2".into()));
    assert!(
        matches!(ends[1].next, Some(Leased::Empty)),
        "{:?}",
        ends[1].next
    );
    assert_eq!(s.state(&a).await.0, State::Succeeded);
    assert_eq!(s.state(&d).await.0, State::Succeeded);
    // the attempt's log entry ({} here) gained its end, and is JSON
    let logged = s.store.get(&a.id, later()).await.unwrap().unwrap().log;
    let entry: serde_json::Value = serde_json::from_str(&logged[0]).unwrap();
    assert!(entry["ended_ms"].as_i64().unwrap() > 0, "{entry}");
}

/// On Redis an item whose finish raises an error (here a log entry that is
/// not JSON) is that item's error alone: the items around it end, and the
/// failed one is left as it was (nothing written), still held.
#[tokio::test]
async fn an_item_that_fails_alone_leaves_the_others_ended() {
    let s = Store::on(common::tasks::Backend::Redis).await;
    let [a, b, c] = [
        s.submit("a").await,
        s.submit("b").await,
        s.submit("c").await,
    ];
    for w in ["w1", "w2", "w3"] {
        s.lease(w).await;
    }
    let ok = Outcome::Succeeded("1".into());
    let mut bad = item(&b, 1, &ok, Some("w2"));
    bad.log = "not json";
    let items = [item(&a, 1, &ok, None), bad, item(&c, 1, &ok, None)];
    let ends = s.batch(&items).await;
    let err = ends[1].ended.as_ref().unwrap_err().to_string();
    assert!(err.contains("finish"), "{err}");
    assert!(ends[1].next.is_none());
    assert_eq!(s.state(&a).await.0, State::Succeeded);
    assert_eq!(s.state(&b).await, (State::Running, "w2".into()));
    assert_eq!(s.state(&c).await.0, State::Succeeded);
}

/// Script calls Redis has run (`EVALSHA` and `EVAL`).
async fn script_calls(redis: &common::TestRedis) -> u64 {
    redis.command_calls(&["evalsha", "eval"]).await
}

/// An engine on `redis` (the embedded store without one) holding sixteen
/// leased tasks of the research queue (each with its worker), with as many
/// queued behind them, and the single end's script loaded (sixteen
/// concurrent first calls would each meet NOSCRIPT and count twice).
async fn holding_sixteen(redis: Option<&common::TestRedis>) -> (TaskEngine, Vec<(Task, String)>) {
    let store = match redis {
        Some(r) => TaskStore::redis(
            RedisStore::connect(&RedisConfig::new(r.url())).unwrap(),
            "koo",
        ),
        None => TaskStore::memory(),
    };
    let engine = TaskEngine::new(store, TaskConfig::default());
    for i in 0..34 {
        let new = NewTask::new(&format!("t{i}"), Category::Research);
        engine.submit(new, later()).await.unwrap();
    }
    let queue = Category::Research.default_queue();
    let mut held = Vec::new();
    for i in 0..17 {
        let worker = format!("w{i}");
        let task = engine
            .lease(&queue, &worker, &["*"], later())
            .await
            .unwrap()
            .unwrap();
        held.push((task, worker));
    }
    let (warm, worker) = held.pop().unwrap();
    let finish = Finish::Succeeded("null".into());
    engine
        .end_attempt(&warm, warm.token, &worker, finish, Some(&["*"]), later())
        .await
        .unwrap();
    (engine, held)
}

/// The ends of every task `held`, made at once, each asking for the next.
async fn end_all(
    engine: &TaskEngine,
    held: &[(Task, String)],
    deadline: Deadline,
) -> Vec<Result<(State, Leased), koo::tasks::engine::TaskError>> {
    let names: &[&str] = &["*"];
    let ends = held.iter().map(|(task, worker)| {
        let finish = Finish::Succeeded("null".into());
        engine.end_attempt(task, task.token, worker, finish, Some(names), deadline)
    });
    futures::future::join_all(ends).await
}

/// Sixteen ends of one queue made at once through the engine: the first
/// few go alone, at once; the rest wait for those calls and go together in
/// one call. Every end is recorded and every asker gets a task of its own,
/// leased to it. On Redis, the script calls are counted: far fewer than
/// sixteen.
async fn ends_made_together_share_one_call(backend: common::tasks::Backend) {
    let redis = match backend {
        common::tasks::Backend::Redis => Some(common::TestRedis::start().await),
        _ => None,
    };
    let (engine, held) = holding_sixteen(redis.as_ref()).await;
    let deadline = later;
    let before = match &redis {
        Some(r) => script_calls(r).await,
        None => 0,
    };
    let ends = end_all(&engine, &held, deadline()).await;
    let mut next_ids = Vec::new();
    for ((task, worker), end) in held.iter().zip(ends) {
        let (state, next) = end.unwrap();
        assert_eq!(state, State::Succeeded);
        let next = next.task().expect("each asker gets a task");
        assert_eq!(next.worker.as_deref(), Some(worker.as_str()));
        let stored = engine.get(next.id.as_str(), deadline()).await.unwrap();
        assert_eq!(
            (stored.state, stored.worker),
            (State::Running, Some(worker.clone()))
        );
        assert_eq!(
            engine
                .get(task.id.as_str(), deadline())
                .await
                .unwrap()
                .state,
            State::Succeeded
        );
        next_ids.push(next.id);
    }
    next_ids.sort();
    next_ids.dedup();
    assert_eq!(next_ids.len(), 16, "sixteen different tasks");
    if let Some(r) = &redis {
        let calls = script_calls(r).await - before;
        // four alone, then the twelve that waited, in one batch (the batch
        // script's first run adds its EVAL after a NOSCRIPT)
        assert!(calls <= 6, "{calls} script calls for sixteen ends");
    }
}

/// On one thread, so that all sixteen ends are made (four calls sent,
/// twelve waiting) before any reply is read, whatever the machine's load.
mod ends_made_together_share_one_call {
    use super::common::tasks::Backend;
    #[tokio::test]
    async fn memory() {
        super::ends_made_together_share_one_call(Backend::Memory).await;
    }
    #[tokio::test]
    async fn redis() {
        super::ends_made_together_share_one_call(Backend::Redis).await;
    }
}

/// Redis gone under sixteen ends made at once: every caller, the four
/// that called at once and the twelve that waited for a batch, hears an
/// error within its deadline (none hangs; their leases will lapse and the
/// tasks run again).
#[tokio::test]
async fn a_failed_batch_answers_every_caller() {
    let mut redis = common::TestRedis::start().await;
    let (engine, held) = holding_sixteen(Some(&redis)).await;
    redis.kill();
    let deadline = Deadline::after(Duration::from_secs(2));
    // a caller left waiting would hang the test: bounded, it fails instead
    let ends = tokio::time::timeout(Duration::from_secs(20), end_all(&engine, &held, deadline))
        .await
        .expect("every caller answered within its deadline");
    assert_eq!(ends.len(), 16);
    for end in ends {
        assert!(end.is_err(), "{end:?}");
    }
}
