//! Flow control in the task store's lease transition, each scenario on a
//! real redis-server (lease.lua) and on the embedded store, held to the
//! same rules (`TaskBackend`'s "Flow control" and "Fair order"): GCRA
//! buckets by queue, name and key, a key's back-off, concurrency caps with
//! their three policies, and round robin across keys. The store clock is
//! moved instead of waiting for tokens.

use crate::common;

use std::time::Duration;

use common::TestRedis;
use common::cluster::TestCluster;
use koo::domain::Outcome;
use koo::domain::flow::{ConcurrencyLimit, Limit, Policy, RateLimit, Scope, Source};
use koo::domain::task::{Priority, QueueName, State, Task};
use koo::store::Deadline;
use koo::store::clock::Clock;
use koo::store::tasks::{Beat, LeaseAsk, Leased, TaskLimits, TaskStore};

fn later() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

struct Fixture {
    _redis: Option<TestRedis>,
    store: TaskStore,
    queue: QueueName,
    clock: Clock,
}

impl Fixture {
    async fn redis() -> Self {
        Self::on(common::tasks::Backend::Redis).await
    }

    async fn memory() -> Self {
        Self::on(common::tasks::Backend::Memory).await
    }

    async fn on(backend: common::tasks::Backend) -> Self {
        let (redis, store, clock) = common::tasks::clocked_store(backend).await;
        Fixture {
            _redis: redis,
            store,
            queue: QueueName::parse("research").unwrap(),
            clock,
        }
    }

    /// On `cluster`, under key prefix `prefix`, queue `research` (whose
    /// slot is on another master than flow control's `{fc}`).
    fn cluster(cluster: &TestCluster, prefix: &str) -> Self {
        let clock = Clock::system();
        let config = koo::store::RedisConfig::new(cluster.url());
        let store = koo::store::RedisStore::connect(&config).unwrap();
        Fixture {
            _redis: None,
            store: TaskStore::redis_with_clock(store, prefix, clock.clone()),
            queue: QueueName::parse(CLUSTER_QUEUE).unwrap(),
            clock,
        }
    }

    fn task(&self, name: &str, rate_key: Option<&str>, concurrency_key: Option<&str>) -> Task {
        let mut t = common::tasks::queued_task(&self.queue, name, Priority::Normal, 0);
        t.rate_limit_key = rate_key.map(str::to_owned);
        t.concurrency_key = concurrency_key.map(str::to_owned);
        t
    }

    async fn submit(&self, task: &Task) {
        self.store
            .submit(task, Duration::ZERO, TaskLimits::default(), later())
            .await
            .unwrap();
    }

    /// A lease with queue and name limits looked up (`flow`).
    async fn lease(&self) -> Leased {
        let limits = TaskLimits {
            flow: true,
            ..TaskLimits::default()
        };
        self.store
            .lease_or_hold(
                &self.queue,
                "w",
                Duration::from_secs(60),
                &["*"],
                limits,
                later(),
            )
            .await
            .unwrap()
    }

    async fn leased(&self) -> Task {
        match self.lease().await {
            Leased::Task(t) => *t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    async fn finish(&self, t: &Task) -> State {
        self.store
            .finish(
                &t.id,
                t.token,
                &Outcome::Succeeded("null".into()),
                "{\"worker\":\"w\"}",
                TaskLimits::default(),
                later(),
            )
            .await
            .unwrap()
            .expect("not fenced")
            .0
    }

    async fn set(&self, limit: Limit) {
        self.store.set_limit(&limit, later()).await.unwrap();
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}

fn rate(scope: Scope, limit: u32, period_ms: u64, burst: u32) -> Limit {
    Limit::Rate(RateLimit {
        scope,
        limit,
        period: Duration::from_millis(period_ms),
        burst,
        source: Source::Api,
    })
}

fn cap(key: &str, max_running: u32, policy: Policy) -> Limit {
    Limit::Concurrency(ConcurrencyLimit {
        key: key.into(),
        max_running,
        policy,
        source: Source::Api,
    })
}

/// The cluster fixture's queue: its slot (`{t:research}`, 1815) is on the
/// first of three masters, flow control's (`{fc}`, 15689) on the third.
const CLUSTER_QUEUE: &str = "research";

/// Runs each scenario named on one Redis Cluster of three masters, each
/// under its own key prefix.
macro_rules! on_a_cluster {
    ($($name:ident),* $(,)?) => {
        /// Every scenario on a Redis Cluster, where flow control's keys
        /// live in a slot of their own on another master than the queue's:
        /// a lease reserves, leases, gives back (`flow_cluster.rs`).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn every_scenario_holds_on_a_cluster() {
            let cluster = TestCluster::start_with(3, 0).await;
            let flow = cluster.master_of("koo:v1:{fc}:limits").await;
            let queue = format!("koo:v1:{{t:{CLUSTER_QUEUE}}}:ready");
            assert_ne!(flow, cluster.master_of(&queue).await, "one master holds both slots");
            $(
                eprintln!("on a cluster: {}", stringify!($name));
                $name(Fixture::cluster(&cluster, stringify!($name))).await;
            )*
        }
    };
}

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

/// Each scenario named on both stores ([`on_both!`]) and on a Cluster
/// ([`on_a_cluster!`]).
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        on_both!($($name),*);
        on_a_cluster!($($name),*);
    };
}

on_every_store!(
    a_key_limit_admits_its_burst_then_holds_until_a_token_frees,
    queue_and_name_limits_hold_only_when_looked_up,
    a_back_off_holds_its_key_and_only_it,
    a_cap_of_two_waits_and_frees_at_each_end,
    cancel_newest_ends_the_task_past_the_cap,
    cancel_oldest_asks_the_longest_running_to_stop_once,
    keys_take_turns_within_a_priority,
    limits_are_listed_with_their_state_and_versioned,
    many_held_keys_ahead_do_not_hide_a_free_one,
    a_held_candidate_takes_no_token_of_another_scope,
);

/// 10 per second with a burst of 2 on `keys/*`: two start at once, the
/// third is held until the bucket frees a token 100 ms later (the lease
/// says when), and the tasks of another key and unkeyed ones are not held.
async fn a_key_limit_admits_its_burst_then_holds_until_a_token_frees(f: Fixture) {
    f.set(rate(Scope::Key("*".into()), 10, 1000, 2)).await;
    for _ in 0..3 {
        f.submit(&f.task("t", Some("p"), None)).await;
    }
    f.leased().await;
    f.leased().await;
    let before = f.now_ms();
    let Leased::Held(Some(at)) = f.lease().await else {
        panic!("the third start must be held with a time");
    };
    assert!(
        at > before && at <= before + 200,
        "frees at {at}, now {before}"
    );
    // another key has its own bucket; an unkeyed task none
    f.submit(&f.task("other", Some("q"), None)).await;
    assert_eq!(f.leased().await.name, "other");
    f.clock.advance(Duration::from_millis(250));
    assert_eq!(f.leased().await.rate_limit_key.as_deref(), Some("p"));
    assert!(matches!(f.lease().await, Leased::Empty));
}

/// A queue's and a task name's limits are looked up only when the caller
/// says some may exist (`TaskLimits::flow`); then a name limit holds only
/// that name, and a queue limit the whole queue.
async fn queue_and_name_limits_hold_only_when_looked_up(f: Fixture) {
    f.set(rate(Scope::Task("slow".into()), 1, 60_000, 1)).await;
    for name in ["slow", "slow", "fast"] {
        f.submit(&f.task(name, None, None)).await;
    }
    assert_eq!(f.leased().await.name, "slow");
    // the second "slow" is held; "fast" behind it starts
    assert_eq!(f.leased().await.name, "fast");
    assert!(matches!(f.lease().await, Leased::Held(Some(_))));
    // unlooked-up, the name limit does not apply (a process that knows of
    // no such limit pays nothing for it)
    let plain = f
        .store
        .lease(
            &f.queue,
            "w",
            Duration::from_secs(60),
            &["*"],
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap();
    assert_eq!(plain.map(|t| t.name).as_deref(), Some("slow"));
    // a queue limit holds everything in the queue
    f.set(rate(Scope::Queue(f.queue.as_str().into()), 1, 60_000, 1))
        .await;
    f.submit(&f.task("fast", None, None)).await;
    f.submit(&f.task("fast", None, None)).await;
    assert_eq!(f.leased().await.name, "fast");
    assert!(matches!(f.lease().await, Leased::Held(Some(_))));
}

/// A worker's 429 for key `a` holds every task of `a` for its back-off and
/// no other task; a shorter back-off does not shorten it.
async fn a_back_off_holds_its_key_and_only_it(f: Fixture) {
    f.submit(&f.task("a1", Some("a"), None)).await;
    f.submit(&f.task("b1", Some("b"), None)).await;
    let until = f
        .store
        .back_off("a", Duration::from_secs(10), later())
        .await
        .unwrap();
    let shorter = f
        .store
        .back_off("a", Duration::from_secs(1), later())
        .await
        .unwrap();
    assert!(shorter >= until - 50, "{shorter} < {until}");
    assert_eq!(f.leased().await.name, "b1");
    let Leased::Held(Some(at)) = f.lease().await else {
        panic!("a is backed off");
    };
    assert!(at >= f.now_ms() + 8_000, "held until {at}");
    f.clock.advance(Duration::from_secs(11));
    assert_eq!(f.leased().await.name, "a1");
}

/// At most two of key `c` run: the third waits (held, no time: a cap frees
/// when a task ends), and each end of an attempt (finish, release) lets
/// the next one start.
async fn a_cap_of_two_waits_and_frees_at_each_end(f: Fixture) {
    f.set(cap("c", 2, Policy::Wait)).await;
    for i in 0..4 {
        f.submit(&f.task(&format!("c{i}"), None, Some("c"))).await;
    }
    let first = f.leased().await;
    let second = f.leased().await;
    assert_eq!(f.lease().await, Leased::Held(None));
    assert_eq!(f.finish(&first).await, State::Succeeded);
    let third = f.leased().await;
    assert_eq!(f.lease().await, Leased::Held(None));
    let released = f
        .store
        .release(&third.id, third.token, "{}", TaskLimits::default(), later())
        .await
        .unwrap();
    assert!(released);
    // the released task is back at its turn, ahead of the fourth
    assert_eq!(f.leased().await.id, third.id);
    assert_eq!(f.lease().await, Leased::Held(None));
    f.finish(&second).await;
    assert_eq!(f.leased().await.name, "c3");
}

/// cancel_newest: a task that would start past the cap ends CANCELLED
/// without running, naming the key; the running one is untouched.
async fn cancel_newest_ends_the_task_past_the_cap(f: Fixture) {
    f.set(cap("c", 1, Policy::CancelNewest)).await;
    let a = f.task("a", None, Some("c"));
    let b = f.task("b", None, Some("c"));
    f.submit(&a).await;
    f.submit(&b).await;
    let running = f.leased().await;
    assert_eq!(running.id, a.id);
    assert_eq!(f.lease().await, Leased::Empty);
    let ended = f.store.get(&b.id, later()).await.unwrap().unwrap();
    assert_eq!(ended.state, State::Cancelled);
    assert_eq!(ended.attempts, 0);
    assert!(
        ended
            .error
            .as_deref()
            .unwrap()
            .contains("cancelled: concurrency cap of c reached"),
        "{:?}",
        ended.error
    );
    assert_eq!(
        f.store.get(&a.id, later()).await.unwrap().unwrap().state,
        State::Running
    );
}

/// cancel_oldest: the longest-running task of the key is asked to cancel
/// (its heartbeat says so, naming the newcomer), once; the newcomer starts
/// when it has ended.
async fn cancel_oldest_asks_the_longest_running_to_stop_once(f: Fixture) {
    f.set(cap("c", 1, Policy::CancelOldest)).await;
    let old = f.task("old", None, Some("c"));
    let new = f.task("new", None, Some("c"));
    f.submit(&old).await;
    let running = f.leased().await;
    f.submit(&new).await;
    assert_eq!(f.lease().await, Leased::Held(None));
    assert_eq!(f.lease().await, Leased::Held(None));
    let beat = f
        .store
        .heartbeat(&running.id, running.token, Duration::from_secs(60), later())
        .await
        .unwrap();
    assert_eq!(
        beat,
        Beat::CancelRequested(format!("concurrency cap of c: superseded by {}", new.id))
    );
    // the worker stops it: a failure under a cancel ends it CANCELLED
    let state = f
        .store
        .finish(
            &running.id,
            running.token,
            &Outcome::Failed("{\"message\":\"stopped\"}".into()),
            "{}",
            TaskLimits::default(),
            later(),
        )
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(state, State::Cancelled);
    assert_eq!(f.leased().await.id, new.id);
}

/// Ten of key A, then two each of B and C, in one priority: the keys take
/// turns (A B C A B C A ...) instead of A's ten going first; a higher
/// priority still goes before every turn.
async fn keys_take_turns_within_a_priority(f: Fixture) {
    for i in 0..6 {
        f.submit(&f.task(&format!("A{i}"), None, Some("A"))).await;
    }
    for key in ["B", "C"] {
        for i in 0..2 {
            f.submit(&f.task(&format!("{key}{i}"), None, Some(key)))
                .await;
        }
    }
    let mut urgent = f.task("urgent", None, Some("A"));
    urgent.priority = Priority::Critical;
    f.submit(&urgent).await;
    let mut order = Vec::new();
    while let Leased::Task(t) = f.lease().await {
        order.push(t.name);
    }
    assert_eq!(
        order,
        [
            "urgent", "A0", "B0", "C0", "A1", "B1", "C1", "A2", "A3", "A4", "A5"
        ]
    );
}

/// Forty keys at their cap of one, each with a task waiting at the head
/// of the queue, and behind them a task of a free key: a lease passes over
/// the forty and starts it (on a Cluster too, where each held key was once
/// a reservation's round trip of its own and a lease gave up after
/// sixteen); the next lease finds everything held.
async fn many_held_keys_ahead_do_not_hide_a_free_one(f: Fixture) {
    f.set(cap("*", 1, Policy::Wait)).await;
    const KEYS: usize = 40;
    for round in 0..2 {
        for k in 0..KEYS {
            let key = format!("k{k}");
            f.submit(&f.task(&format!("{key}-{round}"), None, Some(&key)))
                .await;
        }
    }
    for _ in 0..KEYS {
        assert!(f.leased().await.name.ends_with("-0"));
    }
    // behind every held one (a lower priority goes after every turn)
    let mut free = f.task("free", None, Some("free"));
    free.priority = Priority::Low;
    f.submit(&free).await;
    assert_eq!(f.leased().await.name, "free");
    assert_eq!(f.lease().await, Leased::Held(None));
}

/// A candidate that passes its queue's limit but is held by its key's
/// takes no token of the queue's: with 3 an hour on the queue and 1 an
/// hour on key `x`, x1 starts, x2 is held (by its key) each time it is met,
/// y1 and y2 start behind it, and then the queue is held (3 tokens taken,
/// not 3 plus one per time x2 was looked at).
async fn a_held_candidate_takes_no_token_of_another_scope(f: Fixture) {
    let queue = Scope::Queue(f.queue.as_str().to_owned());
    f.set(rate(queue, 3, 3_600_000, 3)).await;
    f.set(rate(Scope::Key("x".into()), 1, 3_600_000, 1)).await;
    for (name, key) in [
        ("x1", "x"),
        ("x2", "x"),
        ("y1", "y"),
        ("y2", "y"),
        ("y3", "y"),
    ] {
        f.submit(&f.task(name, Some(key), None)).await;
    }
    let mut started = Vec::new();
    while let Leased::Task(t) = f.lease().await {
        started.push(t.name);
    }
    assert_eq!(started, ["x1", "y1", "y2"]);
    assert!(
        matches!(f.lease().await, Leased::Held(Some(_))),
        "held until a token frees"
    );
}

/// Limits are listed by field with their live state; a delete says whether
/// there was one; every change moves the version.
async fn limits_are_listed_with_their_state_and_versioned(f: Fixture) {
    let v0 = f.store.limits_version(later()).await.unwrap();
    f.set(rate(Scope::Key("p".into()), 1, 60_000, 1)).await;
    f.set(cap("c", 3, Policy::Wait)).await;
    let v1 = f.store.limits_version(later()).await.unwrap();
    assert_ne!(v0, v1);
    f.submit(&f.task("t", Some("p"), Some("c"))).await;
    f.leased().await;
    let (version, limits) = f.store.limits(later()).await.unwrap();
    assert_eq!(version, v1);
    let find = |field: &str| {
        limits
            .iter()
            .find(|(l, _)| l.field() == field)
            .unwrap_or_else(|| panic!("{field} listed"))
            .1
    };
    let bucket = find("r:keys/p");
    assert!(bucket.next_free_ms.unwrap() > f.now_ms() + 50_000);
    assert_eq!(find("c:keys/c").running, 1);
    assert!(f.store.delete_limit("c:keys/c", later()).await.unwrap());
    assert!(!f.store.delete_limit("c:keys/c", later()).await.unwrap());
    assert_ne!(f.store.limits_version(later()).await.unwrap(), v1);
}

/// Redis keeps each key's last turn in the queue's fair hash; turns behind
/// the queue's clock change nothing, and the sweep drops them once the hash
/// holds over 1,000 keys, a bounded slice per call, so that a key per
/// tenant or document does not grow it for ever.
#[tokio::test]
async fn fair_turns_behind_the_clock_are_trimmed_by_the_sweep() {
    use redis::AsyncCommands;
    let f = Fixture::redis().await;
    let keys: Vec<Task> = (0..1_200)
        .map(|i| f.task("t", None, Some(&format!("k{i}"))))
        .collect();
    for t in &keys {
        f.submit(t).await;
    }
    // two more turns for the last key: every key's first turn is the
    // clock's start, the last key's next two come after; leasing all but
    // one moves the clock past every first turn, and the last is ahead
    f.submit(&f.task("t", None, Some("k1199"))).await;
    f.submit(&f.task("t", None, Some("k1199"))).await;
    for _ in 0..1_201 {
        f.leased().await;
    }
    let mut conn = f._redis.as_ref().unwrap().conn().await;
    let hash = "koo:v1:{t:research}:fair";
    // down to the bound (stale turns under it cost a field each, no more)
    let (before, after) = sweep_fair(&f, &mut conn, hash).await;
    assert!(before > 1_200, "{before} fields");
    assert!(after <= 1_000, "{after} fields left of {before}");
    let kept: Option<String> = conn.hget(hash, "k:2:k1199").await.unwrap();
    assert!(kept.is_some(), "a turn ahead of the clock is kept");
    // keys of one task each, each leased before the next arrives (a key
    // per document): each starts one turn after the clock and moves it on,
    // so their turns fall behind it and are trimmed too (starting at the
    // clock, they all took its turn and the hash kept every one)
    f.leased().await;
    for i in 0..1_100 {
        f.submit(&f.task("t", None, Some(&format!("doc{i}")))).await;
        f.leased().await;
    }
    let (before, after) = sweep_fair(&f, &mut conn, hash).await;
    assert!(before > 1_000, "{before} fields");
    assert!(after <= 1_000, "{after} fields left of {before}");
}

/// The fair hash's field count before and after 20 sweeps of the queue.
async fn sweep_fair(
    f: &Fixture,
    conn: &mut redis::aio::MultiplexedConnection,
    hash: &str,
) -> (usize, usize) {
    use redis::AsyncCommands;
    let before: usize = conn.hlen(hash).await.unwrap();
    for _ in 0..20 {
        f.store
            .recover(&f.queue, true, TaskLimits::default(), later())
            .await
            .unwrap();
    }
    (before, conn.hlen(hash).await.unwrap())
}

/// What only a Cluster has: reservations racing between processes, and a
/// dead process's running-set entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_reservations_race_and_repair() {
    let cluster = TestCluster::start_with(3, 0).await;
    racing_reservations_admit_exactly_the_limit(&cluster).await;
    a_dead_process_entry_is_repaired_at_the_cap(&cluster).await;
    a_chained_lease_passes_a_held_head_in_one_reservation(&cluster).await;
}

/// Script calls (`EVALSHA`, `EVAL`) run so far on the masters of the
/// fixture's queue and of flow control (an `EVALSHA` refused for an
/// unloaded script, then sent as `EVAL`, counts once).
async fn script_calls(cluster: &TestCluster) -> u64 {
    let mut calls = 0;
    let queue = format!("koo:v1:{{t:{CLUSTER_QUEUE}}}:ready");
    for key in [queue.as_str(), "koo:v1:{fc}:limits"] {
        let mut conn = cluster.conn_to_master_of(key).await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        calls += info
            .lines()
            .filter_map(|l| l.strip_prefix("cmdstat_eval")?.split_once(":calls="))
            .filter(|(name, _)| name.is_empty() || *name == "sha")
            .map(|(_, rest)| field(rest, "") - field(rest, "failed_calls="))
            .sum::<u64>();
    }
    calls
}

/// A counter of an `INFO commandstats` line's `rest` (`""`: the calls).
fn field(rest: &str, name: &str) -> u64 {
    rest.split(',')
        .find_map(|f| f.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A slot's end of a task leases its next one in the same call (the
/// chained lease); on a Cluster a keyed head makes it name candidates for
/// a reservation. It names several, so that a held head costs no second
/// round: with key `a` at its cap of 1 (a1 running), a2 heading the queue
/// and b1 behind it, ending unkeyed task `r` leases b1 in three script
/// calls (the end and its chained lease naming a2 and b1, one reservation
/// that finds a2 held and reserves b1, the lease of b1), not five.
async fn a_chained_lease_passes_a_held_head_in_one_reservation(cluster: &TestCluster) {
    let f = Fixture::cluster(cluster, "chain");
    f.set(cap("*", 1, Policy::Wait)).await;
    let r = f.task("r", None, None);
    let a1 = f.task("a1", None, Some("a"));
    let a2 = f.task("a2", None, Some("a"));
    // a lower priority: behind a2 whatever the keys' turns
    let mut b1 = f.task("b1", None, Some("b"));
    b1.priority = Priority::Low;
    for t in [&r, &a1, &a2, &b1] {
        f.submit(t).await;
    }
    let r = f.leased().await;
    assert_eq!(f.leased().await.id, a1.id);
    let before = script_calls(cluster).await;
    let ask = LeaseAsk {
        worker: "w",
        lease: Duration::from_secs(60),
        names: &["*"],
    };
    let limits = TaskLimits {
        flow: true,
        ..TaskLimits::default()
    };
    let (_, next) = f
        .store
        .finish_and_lease(
            &r.id,
            r.token,
            &Outcome::Succeeded("null".into()),
            "{}",
            &ask,
            limits,
            later(),
        )
        .await
        .unwrap()
        .expect("not fenced");
    match next {
        Leased::Task(t) => assert_eq!(t.id, b1.id),
        other => panic!("expected b1, got {other:?}"),
    }
    assert_eq!(script_calls(cluster).await - before, 3);
}

/// Two processes, eight lease loops each, on 30 tasks of key `p` limited
/// to 10 an hour (burst 10): exactly 10 start. Loops race for the same
/// head task and reserve it twice; the loser gives its token back, so no
/// token is lost (fewer than 10) and none is spent twice (more). A loop
/// stops at its first "held", which may be a moment when the other loops'
/// reservations hold every token: a last lease after them takes what
/// those gave back.
async fn racing_reservations_admit_exactly_the_limit(cluster: &TestCluster) {
    let a = Fixture::cluster(cluster, "race");
    let b = Fixture::cluster(cluster, "race");
    a.set(rate(Scope::Key("p".into()), 10, 3_600_000, 10)).await;
    for _ in 0..30 {
        a.submit(&a.task("t", Some("p"), None)).await;
    }
    let loops = (0..16).map(|i| {
        let f = if i % 2 == 0 { &a } else { &b };
        async move {
            let mut started = 0;
            while let Leased::Task(_) = f.lease().await {
                started += 1;
            }
            started
        }
    });
    let mut started: usize = futures::future::join_all(loops).await.into_iter().sum();
    while let Leased::Task(_) = a.lease().await {
        started += 1;
    }
    assert_eq!(started, 10, "the limit admits 10");
}

/// A process that dies holding a task of capped key `c` (cap 1) leaves its
/// entry in the key's running set (the end scripts cannot reach it; the
/// process would have removed it). While the task runs, another process's
/// lease finds the entry live and holds the key's next task. Once the
/// lease lapsed and the sweep put the task back (behind the waiting one:
/// a requeued keyed task takes a new turn), a lease at the cap finds the
/// entry stale (its task does not carry it, and it is older than the
/// repair's margin), drops it, and starts the waiting task; the cap of 1
/// then holds the requeued one.
async fn a_dead_process_entry_is_repaired_at_the_cap(cluster: &TestCluster) {
    let dead = Fixture::cluster(cluster, "dead");
    dead.set(cap("c", 1, Policy::Wait)).await;
    let mut task = dead.task("t", None, Some("c"));
    task.max_retries = 1;
    dead.submit(&task).await;
    assert_eq!(dead.leased().await.id, task.id);
    let waiting = dead.task("t", None, Some("c"));
    dead.submit(&waiting).await;
    drop(dead);
    let next = Fixture::cluster(cluster, "dead");
    // while its task runs (and carries it), the entry holds the cap
    assert_eq!(next.lease().await, Leased::Held(None));
    next.clock.advance(Duration::from_secs(61));
    next.store
        .recover(&next.queue, true, TaskLimits::default(), later())
        .await
        .unwrap();
    let requeued = next.store.get(&task.id, later()).await.unwrap().unwrap();
    assert_eq!(requeued.state, State::Queued);
    assert_eq!(next.leased().await.id, waiting.id);
    assert_eq!(next.lease().await, Leased::Held(None));
}
