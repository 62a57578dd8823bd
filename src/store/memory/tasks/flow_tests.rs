//! Flow control on the embedded store, rule by rule (`TaskBackend`'s "Flow
//! control" and "Fair order"), on a manual clock: every figure below is
//! exact, never a matter of timing.

use std::time::Duration;

use super::MemoryTasks;
use crate::domain::Outcome;
use crate::domain::flow::{ConcurrencyLimit, Limit, Policy, RateLimit, Scope, Source};
use crate::domain::task::{Category, Priority, QueueName, State, Task, TaskId};
use crate::store::clock::Clock;
use crate::store::tasks::{Beat, Leased, TaskBackend, TaskLimits};
use crate::store::{Deadline, unix_millis};

const START: i64 = 1_800_000_000_000;
const LEASE: Duration = Duration::from_secs(30);

fn dl() -> Deadline {
    Deadline::after(Duration::from_secs(5))
}

fn flow_limits() -> TaskLimits {
    TaskLimits {
        flow: true,
        ..TaskLimits::default()
    }
}

fn rate(scope: &str, limit: u32, period: Duration, burst: u32) -> Limit {
    Limit::Rate(RateLimit {
        scope: Scope::parse(scope).unwrap(),
        limit,
        period,
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

/// A store on a manual clock, with one queue.
struct Fx {
    m: MemoryTasks,
    clock: Clock,
    q: QueueName,
}

impl Fx {
    fn new() -> Self {
        let clock = Clock::manual(START);
        Self {
            m: MemoryTasks::with_clock(clock.clone()),
            clock,
            q: Category::Research.default_queue(),
        }
    }

    fn now(&self) -> i64 {
        self.clock.pinned_ms().unwrap()
    }

    fn advance_ms(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }

    async fn set(&self, limit: Limit) {
        self.m.set_limit(&limit, dl()).await.unwrap();
    }

    /// Submits a task named `name` with keys `rate_key` and `conc_key`.
    async fn submit(&self, name: &str, rate_key: Option<&str>, conc_key: Option<&str>) -> TaskId {
        self.submit_at(name, rate_key, conc_key, Priority::Normal)
            .await
    }

    async fn submit_at(
        &self,
        name: &str,
        rate_key: Option<&str>,
        conc_key: Option<&str>,
        priority: Priority,
    ) -> TaskId {
        let t = task(&self.q, name, rate_key, conc_key, priority);
        let limits = flow_limits();
        self.m
            .submit(&t, Duration::ZERO, limits, dl())
            .await
            .unwrap();
        t.id
    }

    async fn lease_with(&self, limits: TaskLimits) -> Leased {
        self.m
            .lease_or_hold(&self.q, "w", LEASE, &["*"], limits, dl())
            .await
            .unwrap()
    }

    async fn lease(&self) -> Leased {
        self.lease_with(flow_limits()).await
    }

    /// Leases a task; panics with what the lease said otherwise.
    async fn leased(&self) -> Task {
        match self.lease().await {
            Leased::Task(t) => *t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    async fn finish(&self, t: &Task) {
        let done = Outcome::Succeeded("1".into());
        let state = self
            .m
            .finish(&t.id, t.token, &done, "{}", flow_limits(), dl())
            .await
            .unwrap();
        assert_eq!(state, Some((State::Succeeded, false)));
    }

    async fn get(&self, id: &TaskId) -> Task {
        self.m.get(id, dl()).await.unwrap().unwrap()
    }

    /// The running count a concurrency limit's state shows.
    async fn running(&self, field: &str) -> u32 {
        let (_, limits) = self.m.limits(dl()).await.unwrap();
        limits
            .into_iter()
            .find(|(l, _)| l.field() == field)
            .map(|(_, s)| s.running)
            .unwrap()
    }
}

fn task(
    queue: &QueueName,
    name: &str,
    rate_key: Option<&str>,
    conc_key: Option<&str>,
    priority: Priority,
) -> Task {
    Task {
        id: TaskId::generate(queue),
        name: name.into(),
        priority,
        state: State::Queued,
        attempts: 0,
        token: 0,
        max_retries: 0,
        result_ttl_ms: 3_600_000,
        rate_limit_key: rate_key.map(str::to_owned),
        concurrency_key: conc_key.map(str::to_owned),
        ..Task::sample(0, 0)
    }
}

/// A name's rate limit of 10/s with a burst of 3 admits 3 at once, then
/// one every 100 ms; a held call says when the next token frees (and the
/// held tasks stay QUEUED with no attempt). Without `limits.flow` the
/// lease does not look the name's limit up.
#[tokio::test]
async fn gcra_admits_the_burst_then_spaces_evenly() {
    let fx = Fx::new();
    fx.set(rate("tasks/n", 10, Duration::from_secs(1), 3)).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(fx.submit("n", None, None).await);
    }
    for _ in 0..3 {
        fx.leased().await;
    }
    let t0 = fx.now();
    assert_eq!(fx.lease().await, Leased::Held(Some(t0 + 100)));
    let held = fx.get(&ids[3]).await;
    assert_eq!((held.state, held.attempts), (State::Queued, 0));
    // another name is not held: the scan goes on past the held ones
    let other = fx.submit("m", None, None).await;
    assert_eq!(fx.leased().await.id, other);
    fx.advance_ms(99);
    assert_eq!(fx.lease().await, Leased::Held(Some(t0 + 100)));
    fx.advance_ms(1);
    fx.leased().await;
    assert_eq!(fx.lease().await, Leased::Held(Some(t0 + 200)));
    // a process that knows of no name or queue limit does not look
    assert!(matches!(
        fx.lease_with(TaskLimits::default()).await,
        Leased::Task(_)
    ));
    // the state shows the next token
    let (_, limits) = fx.m.limits(dl()).await.unwrap();
    assert_eq!(limits[0].1.next_free_ms, Some(t0 + 200));
}

/// A queue's rate limit holds the whole call: nothing is leased, and the
/// call says when its token frees.
#[tokio::test]
async fn a_queue_limit_holds_the_call() {
    let fx = Fx::new();
    fx.set(rate("queues/research", 2, Duration::from_secs(1), 1))
        .await;
    fx.submit("a", None, None).await;
    fx.submit("b", None, None).await;
    fx.leased().await;
    let t0 = fx.now();
    assert_eq!(fx.lease().await, Leased::Held(Some(t0 + 500)));
    fx.advance_ms(500);
    assert_eq!(fx.leased().await.name, "b");
    // nothing waits: empty, whatever the limit
    fx.advance_ms(500);
    assert_eq!(fx.lease().await, Leased::Empty);
}

/// Keys without a limit of their own take `keys/*`, each key its own
/// bucket; a key's own limit replaces it.
#[tokio::test]
async fn keys_default_to_the_star_limit_each_in_its_own_bucket() {
    let fx = Fx::new();
    fx.set(rate("keys/*", 1, Duration::from_secs(3600), 1))
        .await;
    fx.set(rate("keys/fast", 1000, Duration::from_secs(1), 10))
        .await;
    let a1 = fx.submit("n", Some("a"), None).await;
    let a2 = fx.submit("n", Some("a"), None).await;
    let b1 = fx.submit("n", Some("b"), None).await;
    let fast: Vec<TaskId> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(fx.submit("n", Some("fast"), None).await);
        }
        v
    };
    let mut got = Vec::new();
    while let Leased::Task(t) = fx.lease().await {
        got.push(t.id);
    }
    got.sort();
    let mut want = vec![a1, b1];
    want.extend(fast);
    want.sort();
    assert_eq!(got, want);
    assert_eq!(fx.get(&a2).await.state, State::Queued);
    assert_eq!(fx.lease().await, Leased::Held(Some(fx.now() + 3_600_000)));
}

/// A key's back-off holds its tasks only (another key's run), until it
/// ends; a shorter back-off does not shorten it. The limit's state shows it.
#[tokio::test]
async fn a_back_off_holds_only_its_key() {
    let fx = Fx::new();
    fx.set(rate("keys/openai", 100, Duration::from_secs(1), 100))
        .await;
    let until =
        fx.m.back_off("openai", Duration::from_secs(10), dl())
            .await
            .unwrap();
    assert_eq!(until, fx.now() + 10_000);
    let shorter = fx.m.back_off("openai", Duration::from_secs(1), dl()).await;
    assert_eq!(shorter.unwrap(), until);
    let o = fx.submit("n", Some("openai"), None).await;
    let other = fx.submit("n", Some("mistral"), None).await;
    let plain = fx.submit("n", None, None).await;
    let mut ran = vec![fx.leased().await.id, fx.leased().await.id];
    ran.sort();
    let mut want = vec![other, plain];
    want.sort();
    assert_eq!(ran, want);
    assert_eq!(fx.lease().await, Leased::Held(Some(until)));
    let (_, limits) = fx.m.limits(dl()).await.unwrap();
    assert_eq!(limits[0].1.backoff_until_ms, Some(until));
    fx.advance_ms(10_000);
    assert_eq!(fx.leased().await.id, o);
}

/// A cap of 2 with `wait`: the third task stays QUEUED (held, with no
/// time: only a cap holds) until one of the key's tasks ends; another key
/// runs meanwhile. `c:keys/*` caps every key without its own.
#[tokio::test]
async fn a_cap_waits() {
    let fx = Fx::new();
    fx.set(cap("*", 2, Policy::Wait)).await;
    for _ in 0..3 {
        fx.submit("n", None, Some("t1")).await;
    }
    let first = fx.leased().await;
    fx.leased().await;
    assert_eq!(fx.lease().await, Leased::Held(None));
    let other = fx.submit("n", None, Some("t2")).await;
    assert_eq!(fx.leased().await.id, other);
    assert_eq!(fx.lease().await, Leased::Held(None));
    fx.finish(&first).await;
    assert_eq!(fx.leased().await.concurrency_key.as_deref(), Some("t1"));
    assert_eq!(fx.lease().await, Leased::Empty);
}

/// A cap with `cancel_newest`: a task that finds the cap reached and that
/// others wait on waits (its dependents could not be released by a lease
/// on Redis); one that none waits on ends CANCELLED as never run, with the
/// cap's reason.
#[tokio::test]
async fn a_cap_cancels_the_newest() {
    let fx = Fx::new();
    fx.set(cap("doc", 1, Policy::CancelNewest)).await;
    let first = fx.submit("n", None, Some("doc")).await;
    let waited_on = fx.submit("n", None, Some("doc")).await;
    let dependent = task(&fx.q, "d", None, None, Priority::Normal);
    fx.m.depend_on(&waited_on, &dependent.id, dl())
        .await
        .unwrap();
    let waiting = std::slice::from_ref(&waited_on);
    fx.m.submit_pending(&dependent, waiting, flow_limits(), dl())
        .await
        .unwrap();
    let running = fx.leased().await;
    assert_eq!(running.id, first);
    assert_eq!(fx.lease().await, Leased::Held(None));
    assert_eq!(fx.get(&waited_on).await.state, State::Queued);
    // once it runs, a newcomer no task waits on is cancelled
    let token = running.token;
    let ok = Outcome::Succeeded("1".into());
    fx.m.finish(&first, token, &ok, "{}", flow_limits(), dl())
        .await
        .unwrap();
    assert_eq!(fx.leased().await.id, waited_on);
    let late = fx.submit("n", None, Some("doc")).await;
    assert_eq!(fx.lease().await, Leased::Empty);
    let ended = fx.get(&late).await;
    assert_eq!((ended.state, ended.attempts), (State::Cancelled, 0));
    let error = ended.error.unwrap();
    assert!(
        error.contains("cancelled: concurrency cap of doc reached"),
        "{error}"
    );
}

/// A cap with `cancel_oldest`: the key's longest-running task is asked to
/// cancel (told at its heartbeat, superseded by the first waiting task),
/// once while the ask stands, and the waiting tasks start as it ends.
#[tokio::test]
async fn a_cap_cancels_the_oldest() {
    let fx = Fx::new();
    fx.set(cap("doc", 2, Policy::CancelOldest)).await;
    fx.submit("n", None, Some("doc")).await;
    let old = fx.leased().await;
    fx.advance_ms(5);
    fx.submit("n", None, Some("doc")).await;
    let young = fx.leased().await;
    let next = fx.submit("n", None, Some("doc")).await;
    fx.submit("n", None, Some("doc")).await;
    assert_eq!(fx.lease().await, Leased::Held(None));
    let beat = |t: &Task| {
        let (m, id, token) = (fx.m.clone(), t.id.clone(), t.token);
        async move { m.heartbeat(&id, token, LEASE, dl()).await }
    };
    let why = format!("concurrency cap of doc: superseded by {next}");
    assert_eq!(
        beat(&old).await.unwrap(),
        Beat::CancelRequested(why.clone())
    );
    assert_eq!(beat(&young).await.unwrap(), Beat::Held);
    // the ask stands: no second one
    assert_eq!(fx.lease().await, Leased::Held(None));
    assert_eq!(beat(&young).await.unwrap(), Beat::Held);
    // the superseded task stops: anything but success ends it CANCELLED
    let stopped = Outcome::Failed("{}".into());
    let state =
        fx.m.finish(&old.id, old.token, &stopped, "{}", flow_limits(), dl())
            .await
            .unwrap();
    assert_eq!(state, Some((State::Cancelled, false)));
    assert_eq!(fx.leased().await.id, next);
}

/// The running set loses a task at every end of its attempt: finish,
/// release, and the recovery of a lapsed lease.
#[tokio::test]
async fn the_running_set_is_freed_by_every_end_of_an_attempt() {
    let fx = Fx::new();
    fx.set(cap("k", 1, Policy::Wait)).await;
    fx.submit("n", None, Some("k")).await;
    fx.submit("n", None, Some("k")).await;
    let a = fx.leased().await;
    assert_eq!(fx.running("c:keys/k").await, 1);
    assert_eq!(fx.lease().await, Leased::Held(None));
    // release
    let back = fx.m.release(&a.id, a.token, "{}", flow_limits(), dl());
    assert!(back.await.unwrap());
    assert_eq!(fx.running("c:keys/k").await, 0);
    let a = fx.leased().await;
    // recovery of a lapsed lease (its budget spent: FAILED)
    fx.advance_ms(31_000);
    let recovered = fx.m.recover(&fx.q, true, flow_limits(), dl()).await;
    assert_eq!(recovered.unwrap().handled, 1);
    assert_eq!(fx.running("c:keys/k").await, 0);
    assert_eq!(fx.get(&a.id).await.state, State::Failed);
    // finish
    let b = fx.leased().await;
    assert_eq!(fx.running("c:keys/k").await, 1);
    fx.finish(&b).await;
    assert_eq!(fx.running("c:keys/k").await, 0);
}

/// Three keys with 6, 3 and 2 tasks are served round robin (one of each
/// key per round while each has tasks), a higher priority still goes
/// first, and a key that arrives late is served at the next turn rather
/// than behind the backlog. A released task goes back to its own turn.
#[tokio::test]
async fn keys_are_served_round_robin_with_priorities_first() {
    let fx = Fx::new();
    for (key, n) in [("A", 6), ("B", 3), ("C", 2)] {
        for _ in 0..n {
            fx.submit("n", None, Some(key)).await;
        }
    }
    let urgent = fx.submit_at("n", None, Some("A"), Priority::High).await;
    assert_eq!(fx.leased().await.id, urgent);
    let key = |t: Task| t.concurrency_key.unwrap();
    let round = |n: usize| {
        let fx = &fx;
        async move {
            let mut keys = Vec::new();
            for _ in 0..n {
                keys.push(key(fx.leased().await));
            }
            keys.sort();
            keys
        }
    };
    assert_eq!(round(3).await, ["A", "B", "C"]);
    // released: back at its turn, ahead of the keys' later turns
    let again = fx.leased().await;
    let back =
        fx.m.release(&again.id, again.token, "{}", flow_limits(), dl());
    assert!(back.await.unwrap());
    assert_eq!(fx.leased().await.id, again.id);
    let rest = round(2).await;
    assert_eq!(rest.len(), 2);
    // D, submitted a minute later, draws its first turn one after the
    // clock (the latest turn served), not at now: level with the next turn
    // of the keys waiting, so within the next four (the third key of the
    // clock's turn, then A, B and D, the older first), before A's backlog
    fx.advance_ms(60_000);
    let late = fx.submit("n", None, Some("D")).await;
    let mut next = Vec::new();
    for _ in 0..4 {
        next.push(fx.leased().await.id);
    }
    assert!(next.contains(&late), "{next:?}");
    // a rate-limit key is the fair key of a task without a concurrency key
    let r = task(&fx.q, "n", Some("R"), None, Priority::Normal);
    fx.m.submit(&r, Duration::ZERO, flow_limits(), dl())
        .await
        .unwrap();
    let mut later = Vec::new();
    while let Leased::Task(t) = fx.lease().await {
        later.push(t.id);
    }
    let at = later.iter().position(|id| *id == r.id);
    assert!(matches!(at, Some(0 | 1)), "{at:?} in {later:?}");
}

/// Held candidates do not take places of the scan (the first 100 of a
/// call), so a pile of held tasks cannot hide a free one behind it; the
/// 101st does, which bounds the call.
#[tokio::test]
async fn held_candidates_do_not_hide_the_free_ones() {
    let fx = Fx::new();
    fx.set(cap("busy", 1, Policy::Wait)).await;
    let limits = TaskLimits {
        lease_scan: 1,
        ..flow_limits()
    };
    for _ in 0..101 {
        fx.submit("n", None, Some("busy")).await;
    }
    // unkeyed tasks are scored by their submit time: after the busy turns
    fx.advance_ms(1000);
    let free = fx.submit("n", None, None).await;
    assert!(matches!(fx.lease_with(limits).await, Leased::Task(_)));
    // 100 held now stand before the free task: it is found
    match fx.lease_with(limits).await {
        Leased::Task(t) => assert_eq!(t.id, free),
        other => panic!("{other:?}"),
    }
    let hidden = fx.submit("n", None, None).await;
    fx.submit("n", None, Some("busy")).await;
    // 101 held now: the scan ends before the free task
    assert_eq!(fx.lease_with(limits).await, Leased::Held(None));
    assert_eq!(fx.get(&hidden).await.state, State::Queued);
}

/// The version changes at every set and at a delete that removed a limit
/// (not at one that did not); a replaced limit keeps its bucket.
#[tokio::test]
async fn the_version_follows_changes() {
    let fx = Fx::new();
    assert_eq!(fx.m.limits_version(dl()).await.unwrap(), 0);
    fx.set(rate("tasks/n", 1, Duration::from_secs(60), 1)).await;
    fx.submit("n", None, None).await;
    fx.submit("n", None, None).await;
    fx.leased().await;
    fx.set(rate("tasks/n", 2, Duration::from_secs(60), 1)).await;
    assert_eq!(fx.m.limits_version(dl()).await.unwrap(), 2);
    // the bucket's TAT stayed: still held (until the old interval's end)
    assert_eq!(fx.lease().await, Leased::Held(Some(fx.now() + 60_000)));
    assert!(!fx.m.delete_limit("r:tasks/other", dl()).await.unwrap());
    assert_eq!(fx.m.limits_version(dl()).await.unwrap(), 2);
    assert!(fx.m.delete_limit("r:tasks/n", dl()).await.unwrap());
    let (version, limits) = fx.m.limits(dl()).await.unwrap();
    assert_eq!((version, limits.len()), (3, 0));
    fx.leased().await;
}

/// Limits, buckets, back-offs, the version and the fair clocks survive a
/// save and load (the running sets are rebuilt from the RUNNING tasks),
/// and a snapshot from before flow control loads.
#[tokio::test]
async fn flow_control_survives_a_snapshot() {
    let fx = Fx::new();
    fx.set(rate("keys/openai", 1, Duration::from_secs(3600), 1))
        .await;
    fx.set(cap("doc", 1, Policy::Wait)).await;
    let now = unix_millis(std::time::SystemTime::now());
    fx.submit("n", Some("openai"), None).await;
    let held = fx.submit("n", Some("openai"), None).await;
    fx.submit("n", None, Some("doc")).await;
    let capped = fx.submit("n", None, Some("doc")).await;
    fx.leased().await;
    fx.leased().await;
    fx.m.back_off("mistral", Duration::from_secs(600), dl())
        .await
        .unwrap();
    let image = fx.m.export();
    let json = serde_json::to_string(&image).unwrap();
    // imported on the real clock: the saved times are hours ahead of it
    assert!(START > now);
    let back = MemoryTasks::import(serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(back.export().flow, image.flow);
    let (version, limits) = back.limits(dl()).await.unwrap();
    assert_eq!(version, 2);
    let running: Vec<u32> = limits.iter().map(|(_, s)| s.running).collect();
    assert_eq!(running, [1, 0]);
    let leased = back
        .lease_or_hold(&fx.q, "w", LEASE, &["*"], flow_limits(), dl())
        .await
        .unwrap();
    assert!(matches!(leased, Leased::Held(Some(_))), "{leased:?}");
    let mistral = task(&fx.q, "n", Some("mistral"), None, Priority::Normal);
    back.submit(&mistral, Duration::ZERO, flow_limits(), dl())
        .await
        .unwrap();
    let leased = back
        .lease_or_hold(&fx.q, "w", LEASE, &["*"], flow_limits(), dl())
        .await
        .unwrap();
    assert!(matches!(leased, Leased::Held(Some(_))), "backed off too");
    let state = |id: &TaskId| back.read(|s, _| s.tasks[id.as_str()].task.state);
    assert_eq!(
        (state(&held), state(&capped)),
        (State::Queued, State::Queued)
    );
    let turns = back.read(|s, _| s.tasks[held.as_str()].vt);
    assert!(turns.is_some(), "a keyed task keeps its turn");
    // an image from before flow control: no `flow`
    let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
    old.as_object_mut().unwrap().remove("flow");
    let old = MemoryTasks::import(serde_json::from_value(old).unwrap()).unwrap();
    assert_eq!(old.limits(dl()).await.unwrap().0, 0);
}

/// Every entry into `ready` draws a turn, not only a submit: a task that
/// comes due and one requeued by RetryTask take the next turn of their
/// key, not a place behind another key's backlog, however late they come.
#[tokio::test]
async fn a_due_task_and_a_retried_one_draw_turns() {
    let fx = Fx::new();
    for _ in 0..4 {
        fx.submit("n", None, Some("A")).await;
    }
    fx.leased().await;
    fx.advance_ms(10_000);
    // due in a second
    let b = task(&fx.q, "n", None, Some("B"), Priority::Normal);
    let second = Duration::from_secs(1);
    fx.m.submit(&b, second, flow_limits(), dl()).await.unwrap();
    fx.advance_ms(1_000);
    // level with A's next turn (one after the clock): one of the next two
    let first = [fx.leased().await.id, fx.leased().await.id];
    assert!(first.contains(&b.id), "{first:?}");
    // failed, then retried by hand
    let failed = Outcome::Failed("{}".into());
    fx.m.finish(&b.id, 1, &failed, "{}", flow_limits(), dl())
        .await
        .unwrap();
    fx.advance_ms(10_000);
    let retried = fx.m.retry(&b.id, flow_limits(), dl()).await.unwrap();
    assert_eq!(retried, crate::store::tasks::RetryReply::Queued);
    // its key's second turn ties with A's next: one of the next two, not
    // behind A's backlog as a retry at now would be
    let next = [fx.leased().await.id, fx.leased().await.id];
    assert!(next.contains(&b.id), "{next:?}");
}

/// Keys of one task each (a key per document), each leased before the
/// next arrives: each starts one turn after the clock and moves it on, so
/// the sweep drops their turns (at the clock itself they all took its
/// turn, which never moved past them, and the fair order kept one entry
/// per key ever seen).
#[tokio::test]
async fn keys_of_one_task_each_move_the_clock_and_are_dropped() {
    let fx = Fx::new();
    for i in 0..50 {
        fx.submit("n", None, Some(&format!("doc-{i}"))).await;
        fx.leased().await;
    }
    let lanes = |fx: &Fx| fx.m.lock().flow.fair.get(&fx.q).map_or(0, |f| f.last.len());
    assert_eq!(lanes(&fx), 50);
    fx.m.recover(&fx.q, true, flow_limits(), dl())
        .await
        .unwrap();
    assert_eq!(
        lanes(&fx),
        1,
        "only the last document's turn is the clock's"
    );
}
