//! Flow control end to end (issue 18): global rate limits, a worker's 429
//! back-off of a key, concurrency caps with their policies, and the round
//! robin of keys, as the store contract states them
//! (`src/store/tasks/backend.rs`, "Flow control" and "Fair order").
//!
//! The scenarios run on one Redis with TWO `koo serve` binaries
//! (built-in workers in each) plus an external worker (this test, over
//! unary `LeaseTask`), submitting through one process and the other; each
//! scenario also runs in one process on each store (`on_both!`), smaller.
//! Every check reads times koo recorded (a task's `start_time` and
//! `end_time`, both from the store's clock) or the external worker's own
//! record, and waits on events or on a bounded poll of the API, never on a
//! sleep. The paused queue (`queues.rs`), expiry (`expiry.rs`) and
//! debounce (`debounce.rs`, two instances included) have their own
//! modules.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::chaos::{KooProc, lazy_channel, now_ms};
use common::tasks::*;
use koo::pb::tasks::v1::{self as pb, task_service_client::TaskServiceClient};
use koo::pb::worker::v1::{self as wpb, worker_service_client::WorkerServiceClient};
use tonic::transport::Channel;

on_all_three!(
    a_small_rate_limit_spaces_its_starts,
    a_key_backs_off_alone,
    a_cap_of_two_is_never_exceeded,
    keys_are_served_round_robin,
    cancel_newest_ends_the_newcomer,
    cancel_oldest_supersedes_the_longest_running,
);

/// A task name no built-in worker serves: only the test's worker leases it.
const EXT: &str = "test.flow.ext";
const NOOP: &str = "koo.diagnostics.noop";
const SLEEP: &str = "koo.diagnostics.sleep";

// ---------------------------------------------------------------------------
// The cluster under test
// ---------------------------------------------------------------------------

/// koo processes sharing one task store, each reached by its own channel.
struct Cluster {
    channels: Vec<Channel>,
    /// The shared Redis, if the store is one.
    redis_url: Option<String>,
    /// What must live as long as the test: an in-process koo, or the
    /// binaries with their Redis and log directory.
    _keep: Keep,
}

/// Held only for their `Drop`, which stops them.
enum Keep {
    InProcess {
        _koo: Box<Koo>,
    },
    Binaries {
        _procs: Vec<KooProc>,
        _redis: common::TestRedis,
        _logs: tempfile::TempDir,
    },
}

impl Cluster {
    /// One in-process koo on `backend` with `workers` built-in slots.
    async fn single(backend: Backend, workers: usize) -> Self {
        let koo = start_on(backend, workers).await;
        Self {
            channels: vec![koo.server.channel.clone()],
            redis_url: koo.redis.as_ref().map(common::TestRedis::url),
            _keep: Keep::InProcess {
                _koo: Box::new(koo),
            },
        }
    }

    /// Two `koo serve` binaries on one fresh Redis, `workers` built-in
    /// slots each, with short task intervals.
    async fn two_binaries(workers: usize) -> Self {
        let redis = common::TestRedis::start().await;
        let dir = tempfile::tempdir().expect("a log directory");
        let procs = common::chaos::serve_pair(redis.url(), workers, dir.path()).await;
        let channels = procs
            .iter()
            .map(|p| lazy_channel(p.port.expect("a serve port")))
            .collect();
        Self {
            channels,
            redis_url: Some(redis.url()),
            _keep: Keep::Binaries {
                _procs: procs,
                _redis: redis,
                _logs: dir,
            },
        }
    }

    /// A TaskService client of process `i` (round the processes).
    fn tasks(&self, i: usize) -> TaskServiceClient<Channel> {
        TaskServiceClient::new(self.channels[i % self.channels.len()].clone())
    }

    /// A WorkerService client of the last process (submits go through the
    /// first: the two meet only in the store).
    fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.channels[self.channels.len() - 1].clone())
    }
}

// ---------------------------------------------------------------------------
// Setting limits
// ---------------------------------------------------------------------------
//
// SWITCH POINT for the integrator: [`LIMITS_VIA`]. The final version sets
// limits through the API (SetRateLimit, SetConcurrencyLimit). While those
// handlers are stubs, `Via::Redis` writes them straight into Redis in their
// stored form (`HSET koo:v1:limits r:keys/p "50 1000 1 api"`, then `INCR
// koo:v1:limits:version`; the value is `Limit::encode()`), so that the
// enforcement can be tried on Redis alone: the embedded store has no such
// back door (its runs then fail at the first limit).

/// How the tests set limits.
#[derive(PartialEq)]
enum Via {
    Api,
    #[allow(dead_code)] // the switch's other position
    Redis,
}

const LIMITS_VIA: Via = Via::Api;

/// Writes `limit` into the cluster's Redis as the store keeps it.
async fn store_in_redis(cluster: &Cluster, limit: &koo::domain::flow::Limit) {
    let url = cluster
        .redis_url
        .as_deref()
        .expect("Via::Redis needs a Redis: the embedded store has no back door");
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test Redis");
    let base = koo::keys::flow_base("koo");
    let _: () = redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(format!("{base}limits"))
        .arg(limit.field())
        .arg(limit.encode())
        .ignore()
        .cmd("INCR")
        .arg(format!("{base}limits:version"))
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("HSET the limit");
}

/// Sets the rate limit `name` (e.g. `keys/p`): `limit` per `period_ms`,
/// `burst` at once. Returns it as stored.
async fn set_rate_limit(
    cluster: &Cluster,
    name: &str,
    limit: u32,
    period_ms: u64,
    burst: u32,
) -> pb::RateLimit {
    let asked = pb::RateLimit {
        name: name.into(),
        limit,
        period: Some(millis(period_ms)),
        burst,
        ..Default::default()
    };
    if LIMITS_VIA == Via::Redis {
        use koo::domain::flow::{Limit, RateLimit, Scope, Source};
        let stored = Limit::Rate(RateLimit {
            scope: Scope::parse(name).expect("a limit name"),
            limit,
            period: Duration::from_millis(period_ms),
            burst: burst.max(1),
            source: Source::Api,
        });
        store_in_redis(cluster, &stored).await;
        return pb::RateLimit {
            burst: burst.max(1),
            ..asked
        };
    }
    cluster
        .tasks(0)
        .set_rate_limit(pb::SetRateLimitRequest {
            rate_limit: Some(asked),
        })
        .await
        .unwrap_or_else(|e| panic!("SetRateLimit {name}: {e:?}"))
        .into_inner()
        .rate_limit
        .expect("the limit as stored")
}

/// Sets the concurrency cap `name` (e.g. `keys/*`).
async fn set_cap(
    cluster: &Cluster,
    name: &str,
    max_running: u32,
    policy: pb::ConcurrencyPolicy,
) -> pb::ConcurrencyLimit {
    let asked = pb::ConcurrencyLimit {
        name: name.into(),
        max_running,
        policy: policy as i32,
        ..Default::default()
    };
    if LIMITS_VIA == Via::Redis {
        use koo::domain::flow::{ConcurrencyLimit, Limit, Policy, Source};
        let policy = match policy {
            pb::ConcurrencyPolicy::CancelNewest => Policy::CancelNewest,
            pb::ConcurrencyPolicy::CancelOldest => Policy::CancelOldest,
            _ => Policy::Wait,
        };
        let key = name.strip_prefix("keys/").expect("a cap is on keys/");
        let stored = Limit::Concurrency(ConcurrencyLimit {
            key: key.into(),
            max_running,
            policy,
            source: Source::Api,
        });
        store_in_redis(cluster, &stored).await;
        return asked;
    }
    cluster
        .tasks(0)
        .set_concurrency_limit(pb::SetConcurrencyLimitRequest {
            concurrency_limit: Some(asked),
        })
        .await
        .unwrap_or_else(|e| panic!("SetConcurrencyLimit {name}: {e:?}"))
        .into_inner()
        .concurrency_limit
        .expect("the cap as stored")
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn ms_of(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn error_message(t: &pb::Task) -> String {
    t.error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default()
}

/// A submit of `name` with flow keys (empty: none) in `category`.
fn keyed(
    name: &str,
    rate_key: &str,
    cc_key: &str,
    kwargs: serde_json::Value,
) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        rate_limit_key: rate_key.into(),
        concurrency_key: cc_key.into(),
        ..submit(name, kwargs)
    }
}

/// Submits `reqs` in batches of 100 (SubmitTasks), round the processes:
/// the stored tasks, in order.
async fn submit_all(cluster: &Cluster, reqs: Vec<pb::SubmitTaskRequest>) -> Vec<pb::Task> {
    let mut out: Vec<pb::Task> = Vec::with_capacity(reqs.len());
    for (i, chunk) in reqs.chunks(100).enumerate() {
        let tasks = cluster
            .tasks(i)
            .submit_tasks(pb::SubmitTasksRequest {
                tasks: chunk.to_vec(),
            })
            .await
            .expect("SubmitTasks")
            .into_inner()
            .tasks;
        out.extend(tasks);
    }
    assert_eq!(out.len(), reqs.len(), "every submit stored");
    out
}

/// Waits until every task ended; returns them as they ended.
async fn wait_all(c: &mut TaskServiceClient<Channel>, ids: &[String]) -> Vec<pb::Task> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(wait_task(c, id, is_final).await);
    }
    out
}

fn lease_req(names: &[&str], wait_ms: u64) -> wpb::LeaseTaskRequest {
    wpb::LeaseTaskRequest {
        worker_name: "flow-ext".into(),
        task_names: names.iter().map(|s| s.to_string()).collect(),
        queues: vec![],
        wait: (wait_ms > 0).then(|| millis(wait_ms)),
    }
}

/// One unary lease (None when nothing was handed out within `wait_ms`).
async fn lease(
    w: &mut WorkerServiceClient<Channel>,
    names: &[&str],
    wait_ms: u64,
) -> Option<wpb::LeaseTaskResponse> {
    let r = w
        .lease_task(lease_req(names, wait_ms))
        .await
        .expect("LeaseTask")
        .into_inner();
    r.task.is_some().then_some(r)
}

async fn complete(w: &mut WorkerServiceClient<Channel>, r: &wpb::LeaseTaskResponse) {
    w.complete_task(wpb::CompleteTaskRequest {
        task_id: r.task.as_ref().unwrap().id.clone(),
        lease_token: r.lease_token,
        lease_secret: r.lease_secret.clone(),
        result: None,
    })
    .await
    .expect("CompleteTask");
}

/// What the external worker ran: task id and when it had it (its clock).
type Ran = Arc<Mutex<Vec<(String, i64)>>>;

/// An external worker over unary LeaseTask that serves `names`, sleeping a
/// task's `kwargs.seconds` (0 when absent) before it completes it; it
/// records what it ran. It stops when the handle is aborted (or dropped
/// with the runtime).
fn external_worker(
    cluster: &Cluster,
    names: &'static [&'static str],
) -> (tokio::task::JoinHandle<()>, Ran) {
    let ran: Ran = Arc::default();
    let mut w = cluster.workers();
    let record = ran.clone();
    let handle = tokio::spawn(async move {
        loop {
            let Ok(r) = w.lease_task(lease_req(names, 500)).await else {
                // koo refused (e.g. stopping): pace the retry
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let r = r.into_inner();
            let Some(task) = &r.task else {
                // the wait ran out (or koo answered at once, held): a
                // short pause, so that a koo that does not wait is not
                // polled in a busy loop
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            record.lock().unwrap().push((task.id.clone(), now_ms()));
            let secs = task
                .kwargs
                .as_ref()
                .and_then(|k| k.fields.get("seconds"))
                .and_then(|v| match v.kind {
                    Some(prost_types::value::Kind::NumberValue(n)) => Some(n),
                    _ => None,
                })
                .unwrap_or(0.0);
            if secs > 0.0 {
                // the handler's work, not a wait for an event
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
            let _ = w
                .complete_task(wpb::CompleteTaskRequest {
                    task_id: task.id.clone(),
                    lease_token: r.lease_token,
                    lease_secret: r.lease_secret.clone(),
                    result: None,
                })
                .await;
        }
    });
    (handle, ran)
}

/// Every ended task named `name` (ListTaskHistory, all pages): id → start
/// time (ms) of those that ran.
async fn history_starts(c: &mut TaskServiceClient<Channel>, name: &str) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_task_history(pb::ListTaskHistoryRequest {
                name: name.into(),
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("ListTaskHistory")
            .into_inner();
        for t in page.tasks {
            if let Some(ms) = ms_of(&t.start_time) {
                out.insert(t.id, ms);
            }
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

// ---------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------

/// What a rate-limit run saw: the starts inside the window after the first
/// one, the most in any one period (a sliding window over every start), and
/// how many the external worker ran.
struct RateRun {
    in_window: usize,
    max_per_period: usize,
    external: usize,
}

/// Sets `keys/p` to `rate` per second with `burst`, submits `n` no-op tasks
/// with rate-limit key `p` through every process, served by the built-in
/// workers and an external one, and counts their starts over the
/// `window_s` seconds after the first start, once a start past the window
/// shows it closed (a bounded poll of the history).
async fn run_rate_limit(
    cluster: &Cluster,
    (rate, burst): (u32, u32),
    window_s: i64,
    n: usize,
) -> RateRun {
    let mut c = cluster.tasks(0);
    let stored = set_rate_limit(cluster, "keys/p", rate, 1000, burst).await;
    assert_eq!((stored.limit, stored.burst), (rate, burst), "{stored:?}");
    let (ext, ran) = external_worker(cluster, &[NOOP, EXT]);
    // every tenth task is one only the external worker serves, so that it
    // runs some whoever wins the races for tokens; the key's limit holds
    // across both names
    let reqs = (0..n)
        .map(|i| {
            let name = if i % 10 == 0 { EXT } else { NOOP };
            keyed(name, "p", "", serde_json::json!({ "i": i }))
        })
        .collect();
    let submitted = submit_all(cluster, reqs).await;
    assert_eq!(submitted.len(), n);
    let window_ms = window_s * 1000;
    // every task runs (`n` is a little more than the window holds): the
    // tenth ones too, which the external worker may only get once the
    // built-in workers have run out of the others (they race it for every
    // token, eight to one, and may win them all)
    let until = tokio::time::Instant::now() + Duration::from_secs(n as u64 / u64::from(rate) + 30);
    let starts = loop {
        let mut starts = history_starts(&mut c, NOOP).await;
        starts.extend(history_starts(&mut c, EXT).await);
        if starts.len() >= n {
            break starts;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the window never closed: {} tasks started",
            starts.len()
        );
        // polling the history: a start has no event to await across processes
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    ext.abort();
    let mut sorted: Vec<i64> = starts.values().copied().collect();
    sorted.sort_unstable();
    let first = sorted[0];
    let in_window = sorted.iter().filter(|&&s| s < first + window_ms).count();
    // the most starts in any [t, t + period - 1 ms): at most
    // `rate + burst - 1` (a start's ms is truncated: the full period could
    // hold one more by rounding alone)
    let mut max_per_period = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi] - sorted[lo] >= 999 {
            lo += 1;
        }
        max_per_period = max_per_period.max(hi - lo + 1);
    }
    let external = ran.lock().unwrap().len();
    eprintln!(
        "flow: {rate}/s over {window_s} s: {in_window} started in the window, at most \
         {max_per_period} in a second, {external} by the external worker"
    );
    RateRun {
        in_window,
        max_per_period,
        external,
    }
}

/// The figure: a rate limit of 50/s on `keys/p` admits 500 ± 5 %
/// over 10 s across two koo processes and an external worker (600 tasks
/// waiting, all run), never more than 51 in any second, the external worker
/// ran at least its own tenth (names only it serves) and the built-in ones
/// the rest. A burst of 2: with 1, each
/// worker's lateness for a token (a timer, a round trip on a loaded
/// machine) delays every later token by as much, which the one-process
/// test below shows at 20/s; 2 absorbs it and still bounds every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_two_processes_and_a_worker() {
    let cluster = Cluster::two_binaries(4).await;
    let run = run_rate_limit(&cluster, (50, 2), 10, 600).await;
    assert!(
        (475..=525).contains(&run.in_window),
        "{} started in 10 s, not 500 ± 5 %",
        run.in_window
    );
    assert!(
        run.max_per_period <= 51,
        "{} in one second",
        run.max_per_period
    );
    assert!(
        run.external >= 60,
        "the external worker ran {} (every tenth task is its own)",
        run.external
    );
    assert!(
        run.external < run.in_window,
        "the built-in workers ran none"
    );
}

/// One process: 20/s (burst 1) over 3 s admits 60, -30 % to +5 % (42 to
/// 63), and never more than 20 in a second (the promise). The lower bound
/// is loose on purpose: a burst of 1 passes each worker's lateness for a
/// token on to every later token, so a loaded machine admits less (56 seen
/// with the suite running beside other koo processes, 45 with a benchmark
/// beside it); what it must catch is a limiter that admits half the rate
/// (30) or stalls, and the upper bounds are the promise. On a Cluster the burst is 2: a token
/// is taken a round trip later there (the lease names the task, then the
/// reservation takes it), and with a burst of 1 every late token delays
/// the next (README, "Flow control on a Cluster"). There a start is
/// recorded by the lease, a round trip or more after its token was taken
/// in flow control's slot: a second of starts can hold the tokens of a
/// second and a little more, up to two tokens (100 ms at 20/s) beyond the
/// bucket's `rate + burst - 1`.
async fn a_small_rate_limit_spaces_its_starts(backend: Backend) {
    let cluster = Cluster::single(backend, 4).await;
    let (burst, lateness) = if backend == Backend::Cluster {
        (2, 2)
    } else {
        (1, 0)
    };
    let run = run_rate_limit(&cluster, (20, burst), 3, 72).await;
    assert!(
        (42..=63).contains(&run.in_window),
        "{} started in 3 s, not 60 (-30 %, +5 %)",
        run.in_window
    );
    assert!(
        run.max_per_period <= 19 + burst as usize + lateness,
        "{} in one second",
        run.max_per_period
    );
}

// ---------------------------------------------------------------------------
// A worker's 429: the key backs off
// ---------------------------------------------------------------------------

/// The back-off a worker reports.
const BACK_OFF_MS: i64 = 2000;

/// A worker fails a task of key `a` with `key_retry_after` = 2 s (a
/// provider's 429): no task with key `a`, in any queue, process or worker
/// (built-in or external), starts
/// within the 2 s (they stay QUEUED, no attempt counted), while key `b`'s
/// tasks run meanwhile; then `a`'s run.
async fn a_key_backs_off_alone(backend: Backend) {
    let cluster = Cluster::single(backend, 4).await;
    back_off_scenario(&cluster).await;
}

/// [`a_key_backs_off_alone`] across two koo processes and an external
/// worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_backs_off_across_two_processes() {
    let cluster = Cluster::two_binaries(4).await;
    back_off_scenario(&cluster).await;
}

async fn back_off_scenario(cluster: &Cluster) {
    let mut c = cluster.tasks(0);
    let mut w = cluster.workers();
    let first = submit_ok(&mut c, keyed(EXT, "a", "", serde_json::json!({}))).await;
    let leased = lease(&mut w, &[EXT], 5000)
        .await
        .expect("the provider's task");
    assert_eq!(leased.task.as_ref().unwrap().id, first.id);
    let t0 = now_ms();
    let failed = w
        .fail_task(wpb::FailTaskRequest {
            task_id: first.id.clone(),
            lease_token: leased.lease_token,
            lease_secret: leased.lease_secret.clone(),
            message: "HTTP 429 Too Many Requests".into(),
            retryable: false,
            key_retry_after: Some(millis(BACK_OFF_MS as u64)),
            ..Default::default()
        })
        .await
        .expect("FailTask with a key back-off")
        .into_inner();
    assert_eq!(failed.state, pb::TaskState::Failed as i32);
    // from now on an external worker competes with the built-in ones
    let (ext, _) = external_worker(cluster, &[NOOP]);
    // key a in two queues, key b beside it, through every process
    let mut reqs = Vec::new();
    for i in 0..4 {
        reqs.push(keyed(NOOP, "a", "", serde_json::json!({ "i": i })));
        reqs.push(keyed(NOOP, "b", "", serde_json::json!({ "i": i })));
    }
    reqs.push(pb::SubmitTaskRequest {
        category: pb::TaskCategory::PdfProcessing as i32,
        ..keyed(NOOP, "a", "", serde_json::json!({ "queue": "pdf" }))
    });
    let mut a_ids = Vec::new();
    let mut b_ids = Vec::new();
    for (i, req) in reqs.into_iter().enumerate() {
        let key = req.rate_limit_key.clone();
        let task = submit_ok(&mut cluster.tasks(i), req).await;
        let ids = if key == "a" { &mut a_ids } else { &mut b_ids };
        ids.push(task.id);
    }
    // b runs during a's back-off
    for t in wait_all(&mut c, &b_ids).await {
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
        let end = ms_of(&t.end_time).unwrap();
        assert!(
            end < t0 + BACK_OFF_MS,
            "key b waited for a's back-off: {t:?}"
        );
    }
    // a's tasks wait, as submitted: QUEUED, no attempt
    if now_ms() < t0 + BACK_OFF_MS - 200 {
        for id in &a_ids {
            let t = get_ok(&mut c, id).await;
            assert_eq!(t.state, pb::TaskState::Queued as i32, "held: {t:?}");
            assert_eq!(t.attempts, 0, "no attempt while held: {t:?}");
        }
    }
    // then they run, none before the back-off ended
    for t in wait_all(&mut c, &a_ids).await {
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
        assert_eq!(t.attempts, 1, "{t:?}");
        let start = ms_of(&t.start_time).unwrap();
        // 2 ms for the store's and this clock's rounding
        assert!(
            start >= t0 + BACK_OFF_MS - 2,
            "a task of key a started {} ms into the back-off: {t:?}",
            start - t0
        );
    }
    ext.abort();
}

// ---------------------------------------------------------------------------
// Concurrency caps
// ---------------------------------------------------------------------------

/// The most tasks of one key running at once, swept over start and end
/// times (an end at the same ms as a start comes first: the cap frees at
/// the finish, before the next lease).
fn most_at_once(spans: &[(i64, i64)]) -> usize {
    let mut events: Vec<(i64, i32)> = spans.iter().flat_map(|&(s, e)| [(s, 1), (e, -1)]).collect();
    events.sort_unstable();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// A cap of 2 (`keys/*`, and `keys/k0` of its own) on three keys of eight
/// 0.2 s tasks each, with more workers than the caps allow: the ledger of
/// every task's start and end times never shows a key with more than 2 at
/// once, and shows 2 at once (the workers could run more).
async fn a_cap_of_two_is_never_exceeded(backend: Backend) {
    let cluster = Cluster::single(backend, 8).await;
    cap_scenario(&cluster).await;
}

/// [`a_cap_of_two_is_never_exceeded`] across two koo processes and an
/// external worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_holds_across_two_processes() {
    let cluster = Cluster::two_binaries(4).await;
    cap_scenario(&cluster).await;
}

async fn cap_scenario(cluster: &Cluster) {
    let mut c = cluster.tasks(0);
    set_cap(cluster, "keys/*", 2, pb::ConcurrencyPolicy::Wait).await;
    let own = set_cap(cluster, "keys/k0", 2, pb::ConcurrencyPolicy::Unspecified).await;
    assert_eq!(own.max_running, 2, "{own:?}");
    let (ext, _) = external_worker(cluster, &[SLEEP]);
    let reqs = (0..24)
        .map(|i| {
            let key = format!("k{}", i % 3);
            keyed(
                SLEEP,
                "",
                &key,
                serde_json::json!({ "seconds": 0.2, "steps": 1 }),
            )
        })
        .collect();
    let ids: Vec<String> = submit_all(cluster, reqs)
        .await
        .into_iter()
        .map(|t| t.id)
        .collect();
    let ended = wait_all(&mut c, &ids).await;
    ext.abort();
    let mut by_key: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for t in &ended {
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
        assert_eq!(t.attempts, 1, "{t:?}");
        let span = (ms_of(&t.start_time).unwrap(), ms_of(&t.end_time).unwrap());
        by_key
            .entry(t.concurrency_key.clone())
            .or_default()
            .push(span);
    }
    assert_eq!(by_key.len(), 3, "{:?}", by_key.keys());
    let most: HashMap<&String, usize> = by_key.iter().map(|(k, s)| (k, most_at_once(s))).collect();
    assert!(most.values().all(|&m| m <= 2), "over the cap: {most:?}");
    assert!(
        most.values().any(|&m| m == 2),
        "never two at once: {most:?}"
    );
}

/// With one worker slot, keys take turns within a priority: after a keyed
/// task set the queue's turn clock, 20 tasks of `a`, then 5 of `b`, then 5
/// of `c` are handed out as rounds of one task of each key (the first 15
/// starts), then the rest of `a`. No cap is needed for the order.
async fn keys_are_served_round_robin(backend: Backend) {
    let cluster = Cluster::single(backend, 0).await;
    round_robin_scenario(&cluster).await;
}

/// [`keys_are_served_round_robin`], submitting through one koo process and
/// leasing through another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_served_round_robin_across_processes() {
    let cluster = Cluster::two_binaries(2).await;
    round_robin_scenario(&cluster).await;
}

async fn round_robin_scenario(cluster: &Cluster) {
    let mut c = cluster.tasks(0);
    let mut w = cluster.workers();
    // a keyed task leased first sets the queue's clock, so that every key
    // submitted next starts its turns from the same point
    submit_ok(&mut c, keyed(EXT, "", "w", serde_json::json!({}))).await;
    let warm = lease(&mut w, &[EXT], 5000).await.expect("the first task");
    complete(&mut w, &warm).await;
    let mut reqs = Vec::new();
    for (key, n) in [("a", 20), ("b", 5), ("c", 5)] {
        for i in 0..n {
            reqs.push(keyed(EXT, "", key, serde_json::json!({ "i": i })));
        }
    }
    let stored = c
        .submit_tasks(pb::SubmitTasksRequest { tasks: reqs })
        .await
        .expect("SubmitTasks")
        .into_inner()
        .tasks;
    assert_eq!(stored.len(), 30);
    let mut order = String::new();
    for _ in 0..30 {
        let r = lease(&mut w, &[EXT], 5000).await.expect("a task");
        order.push_str(&r.task.as_ref().unwrap().concurrency_key);
        complete(&mut w, &r).await;
    }
    let rounds: Vec<String> = order.as_bytes()[..15]
        .chunks(3)
        .map(|r| {
            let mut r = r.to_vec();
            r.sort_unstable();
            String::from_utf8(r).unwrap()
        })
        .collect();
    assert!(
        rounds.iter().all(|r| r == "abc"),
        "not round robin: handed out {order}"
    );
    assert_eq!(&order[15..], "a".repeat(15), "handed out {order}");
}

/// CANCEL_NEWEST, cap 1: while one task of the key runs, the next one to
/// start ends CANCELLED instead ("cancelled: concurrency cap of k
/// reached", no attempt, never handed out); the running one finishes
/// normally, and the key runs again after it.
async fn cancel_newest_ends_the_newcomer(backend: Backend) {
    let cluster = Cluster::single(backend, 0).await;
    let mut c = cluster.tasks(0);
    let mut w = cluster.workers();
    set_cap(&cluster, "keys/k", 1, pb::ConcurrencyPolicy::CancelNewest).await;
    let running = submit_ok(&mut c, keyed(EXT, "", "k", serde_json::json!({}))).await;
    let first = lease(&mut w, &[EXT], 5000).await.expect("the first task");
    assert_eq!(first.task.as_ref().unwrap().id, running.id);
    let newcomer = submit_ok(&mut c, keyed(EXT, "", "k", serde_json::json!({}))).await;
    // this lease meets the newcomer past the cap: it ends it and hands out
    // nothing
    assert!(
        lease(&mut w, &[EXT], 0).await.is_none(),
        "the newcomer was handed out"
    );
    let ended = wait_task(&mut c, &newcomer.id, is_final).await;
    assert_eq!(ended.state, pb::TaskState::Cancelled as i32, "{ended:?}");
    assert_eq!(
        error_message(&ended),
        "cancelled: concurrency cap of k reached"
    );
    assert_eq!(ended.attempts, 0, "never run: {ended:?}");
    assert!(ended.start_time.is_none(), "{ended:?}");
    complete(&mut w, &first).await;
    let done = get_ok(&mut c, &running.id).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    // the key is free again: its next task runs
    let later = submit_ok(&mut c, keyed(EXT, "", "k", serde_json::json!({}))).await;
    let r = lease(&mut w, &[EXT], 5000)
        .await
        .expect("the key's next task");
    assert_eq!(r.task.as_ref().unwrap().id, later.id);
    complete(&mut w, &r).await;
}

/// CANCEL_OLDEST, cap 1: a new task of the key asks the running one to
/// cancel (its worker is told at its next heartbeat) and waits; the old one
/// ends CANCELLED ("cancelled: concurrency cap of k: superseded by <new
/// id>"), and the new one starts after it ended.
async fn cancel_oldest_supersedes_the_longest_running(backend: Backend) {
    let cluster = Cluster::single(backend, 0).await;
    let mut c = cluster.tasks(0);
    let mut w = cluster.workers();
    set_cap(&cluster, "keys/k", 1, pb::ConcurrencyPolicy::CancelOldest).await;
    let old = submit_ok(&mut c, keyed(EXT, "", "k", serde_json::json!({}))).await;
    let held = lease(&mut w, &[EXT], 5000).await.expect("the old task");
    assert_eq!(held.task.as_ref().unwrap().id, old.id);
    let new = submit_ok(&mut c, keyed(EXT, "", "k", serde_json::json!({}))).await;
    // this lease finds the key at its cap: it asks the old one to cancel
    // and hands out nothing
    assert!(lease(&mut w, &[EXT], 0).await.is_none(), "the cap held");
    let beat = w
        .heartbeat_task(wpb::HeartbeatTaskRequest {
            task_id: old.id.clone(),
            lease_token: held.lease_token,
            lease_secret: held.lease_secret.clone(),
        })
        .await
        .expect("HeartbeatTask")
        .into_inner();
    assert!(
        beat.cancel_requested,
        "the old task was asked to cancel: {beat:?}"
    );
    let stopped = w
        .fail_task(wpb::FailTaskRequest {
            task_id: old.id.clone(),
            lease_token: held.lease_token,
            lease_secret: held.lease_secret.clone(),
            message: "stopped".into(),
            ..Default::default()
        })
        .await
        .expect("FailTask")
        .into_inner();
    assert_eq!(stopped.state, pb::TaskState::Cancelled as i32);
    let ended = get_ok(&mut c, &old.id).await;
    assert_eq!(
        error_message(&ended),
        format!("cancelled: concurrency cap of k: superseded by {}", new.id)
    );
    let r = lease(&mut w, &[EXT], 5000).await.expect("the new task");
    assert_eq!(r.task.as_ref().unwrap().id, new.id);
    complete(&mut w, &r).await;
    let done = get_ok(&mut c, &new.id).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    assert!(
        ms_of(&done.start_time).unwrap() >= ms_of(&ended.end_time).unwrap(),
        "the new task started before the old one ended"
    );
}

// ---------------------------------------------------------------------------
// Pause and expiry, across processes
// ---------------------------------------------------------------------------

/// The pause and expiry on two koo processes and an external
/// worker, with keyed tasks (`queues.rs` and `expiry.rs` cover each in one
/// process): `research` paused through one process hands the external
/// worker nothing through the other while `pdf_processing` runs on the
/// built-in workers; its task that expires meanwhile ends CANCELLED
/// ("cancelled: expired") without an attempt; resumed, the live one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_and_an_expiry_across_two_processes() {
    let cluster = Cluster::two_binaries(2).await;
    let (mut a, mut b) = (cluster.tasks(0), cluster.tasks(1));
    let mut w = cluster.workers();
    a.pause_queue(pb::PauseQueueRequest {
        queue: "research".into(),
        reason: "provider outage".into(),
    })
    .await
    .expect("PauseQueue");
    let short = submit_ok(
        &mut b,
        pb::SubmitTaskRequest {
            expire_after: Some(millis(400)),
            ..keyed(EXT, "p", "t", serde_json::json!({}))
        },
    )
    .await;
    let live = submit_ok(&mut b, keyed(EXT, "p", "t", serde_json::json!({}))).await;
    let other = submit_ok(
        &mut a,
        pb::SubmitTaskRequest {
            category: pb::TaskCategory::PdfProcessing as i32,
            ..keyed(NOOP, "p", "t", serde_json::json!({}))
        },
    )
    .await;
    let ran = wait_task(&mut a, &other.id, is_final).await;
    assert_eq!(ran.state, pb::TaskState::Succeeded as i32, "{ran:?}");
    assert!(
        lease(&mut w, &[EXT], 300).await.is_none(),
        "a paused queue handed out a task"
    );
    let ended = wait_task(&mut a, &short.id, is_final).await;
    assert_eq!(ended.state, pb::TaskState::Cancelled as i32, "{ended:?}");
    assert_eq!(error_message(&ended), "cancelled: expired");
    assert_eq!(ended.attempts, 0, "it never started: {ended:?}");
    assert_eq!(
        get_ok(&mut b, &live.id).await.state,
        pb::TaskState::Queued as i32
    );
    b.resume_queue(pb::ResumeQueueRequest {
        queue: "research".into(),
    })
    .await
    .expect("ResumeQueue");
    let r = lease(&mut w, &[EXT], 5000)
        .await
        .expect("the live task after the resume");
    assert_eq!(r.task.as_ref().unwrap().id, live.id);
    complete(&mut w, &r).await;
    assert_eq!(
        get_ok(&mut a, &live.id).await.state,
        pb::TaskState::Succeeded as i32
    );
}
