//! A submit made through one koo process wakes the idle workers of another
//! (issue 20: koo nodes that submit and nodes that work): the idle process
//! arms its queues in Redis (`idle` flag, `BLPOP` on `wake`), the submit
//! script pushes a wake, and the task starts in a round trip rather than at
//! the worker's next poll. On a real redis-server and a Redis Cluster, two
//! koo servers over real gRPC channels.

use crate::common;

use std::time::Duration;

use common::cluster::TestCluster;
use common::tasks::{armed, client, short_intervals, submit, submitted, wait_task};
use common::{EVENT_TIMEOUT, TestRedis, TestServer, redis_settings, test_settings};
use koo::domain::task::Category;
use koo::keys::QueueKeys;
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1::{
    self as wpb, work_request::Message as In, work_response::Message as Out,
    worker_service_client::WorkerServiceClient,
};
use koo::tasks::handlers::{FAIL_TIMES, NOOP};
use tonic_health::pb::health_check_response::ServingStatus;

/// The Redis under both koo processes, and a direct connection to the node
/// that holds the research queue's keys.
enum Under {
    Redis(TestRedis),
    Cluster(TestCluster),
}

impl Under {
    fn url(&self) -> String {
        match self {
            Self::Redis(r) => r.url(),
            Self::Cluster(c) => c.url(),
        }
    }

    async fn conn_for(&self, key: &str) -> redis::aio::MultiplexedConnection {
        match self {
            Self::Redis(r) => r.conn().await,
            Self::Cluster(c) => c.conn_to_master_of(key).await,
        }
    }
}

async fn koo(url: &str, workers: usize, poll: Duration) -> TestServer {
    koo_with(url, workers, poll, |_| {}).await
}

async fn koo_with(
    url: &str,
    workers: usize,
    poll: Duration,
    adjust: impl FnOnce(&mut koo::app::Settings),
) -> TestServer {
    let mut settings = test_settings(redis_settings(url));
    short_intervals(&mut settings, workers);
    settings.tasks.config.poll_interval = poll;
    adjust(&mut settings);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    server
}

/// The queue's wake lists (one per arming process), read where they live.
async fn wake_lists(conn: &mut redis::aio::MultiplexedConnection, keys: &QueueKeys) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(keys.wake_to("*"))
        .query_async(conn)
        .await
        .unwrap()
}

/// A stream worker (WorkerService `Work`) on `server` serving task `name`
/// of the research queue with room for `concurrency`: the sender that
/// keeps it open, and what koo sends it.
async fn stream_worker(
    server: &TestServer,
    name: &str,
    concurrency: i32,
) -> (
    tokio::sync::mpsc::Sender<wpb::WorkRequest>,
    tonic::Streaming<wpb::WorkResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(wpb::WorkRequest {
        message: Some(In::Hello(wpb::Hello {
            name: "wake".into(),
            task_names: vec![name.into()],
            queues: vec!["research".into()],
            concurrency,
            accept_batches: false,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let stream = WorkerServiceClient::new(server.channel.clone())
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// The id of the next task pushed to a stream worker, within the event
/// timeout.
async fn pushed(stream: &mut tonic::Streaming<wpb::WorkResponse>) -> String {
    loop {
        let next = tokio::time::timeout(EVENT_TIMEOUT, stream.message()).await;
        match next.expect("a task within the event timeout").unwrap() {
            Some(wpb::WorkResponse {
                message: Some(Out::Task(t)),
            }) => return t.task.map(|t| t.id).unwrap_or_default(),
            Some(_) => continue,
            None => panic!("the stream ended"),
        }
    }
}

/// Submits `req` (task `i` of a test) through the API node and waits for
/// it to succeed within [`EVENT_TIMEOUT`] (the worker node polls once a
/// minute); it ran on a worker (the API node has none: the worker node's).
async fn succeeds_in_time(
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    req: pb::SubmitTaskRequest,
    i: usize,
) {
    let id = submitted(c, req).await;
    let done = wait_task(c, &id, |t| t.state == pb::TaskState::Succeeded as i32).await;
    let ran_on = done.attempt_log.first().map(|a| a.worker.as_str());
    assert!(ran_on.is_some_and(|w| !w.is_empty()), "task {i}: {done:?}");
}

/// koo A has no workers (an API node); koo B's built-in slots poll once a
/// minute. Tasks submitted through A run on B at once, one after another
/// (B re-arms after each wake), and so does a failed task retried through
/// A; the flag's TTL is bounded and the wake list is gone or expiring.
async fn a_submit_elsewhere_wakes_idle_workers(under: Under) {
    let url = under.url();
    let api = koo(&url, 0, Duration::from_secs(60)).await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let workers = koo_with(&url, 2, Duration::from_secs(60), |s| {
        s.http_listen = Some(http)
    })
    .await;
    let keys = QueueKeys::new("koo", &Category::Research.default_queue());
    let mut conn = under.conn_for(&keys.idle()).await;
    let mut c = client(&api);
    for i in 0..3 {
        let pttl = armed(&mut conn, &keys.idle()).await;
        assert!(
            pttl <= 3_000,
            "the flag outlives its arming by 2 s at most: {pttl}"
        );
        // B's slots next look in a minute: only the wake starts it in time
        succeeds_in_time(&mut c, submit(NOOP, serde_json::json!({})), i).await;
    }
    // a retry through A (the task back in its queue) wakes B the same way
    let mut failing = submit(FAIL_TIMES, serde_json::json!({ "failures": 1 }));
    failing.max_retries = Some(0);
    armed(&mut conn, &keys.idle()).await;
    let id = submitted(&mut c, failing).await;
    wait_task(&mut c, &id, |t| t.state == pb::TaskState::Failed as i32).await;
    armed(&mut conn, &keys.idle()).await;
    c.retry_task(pb::RetryTaskRequest {
        task_id: id.clone(),
    })
    .await
    .unwrap();
    let retried = wait_task(&mut c, &id, |t| t.attempt_log.len() == 2).await;
    assert_eq!(
        retried.state,
        pb::TaskState::Succeeded as i32,
        "{retried:?}"
    );
    // five wakes reached B (three submits, the failing one, the retry)
    let (status, text) = crate::metrics::http_get(&http.to_string(), "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let woken = crate::metrics::sample(&text, "koo_task_wakes_total", &[r#"queue="research""#]);
    assert!(woken.is_some_and(|n| n >= 5.0), "{woken:?}");
    // every wake list (B's) is taken (gone) or expiring
    for list in wake_lists(&mut conn, &keys).await {
        let wake_ttl: i64 = redis::cmd("PTTL")
            .arg(&list)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            wake_ttl == -2 || (0..=10_000).contains(&wake_ttl),
            "{list}: {wake_ttl}"
        );
    }
    drop(workers);
    drop(api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_through_another_process_wakes_its_idle_workers() {
    a_submit_elsewhere_wakes_idle_workers(Under::Redis(TestRedis::start().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_through_another_process_wakes_its_idle_workers_on_a_cluster() {
    a_submit_elsewhere_wakes_idle_workers(Under::Cluster(TestCluster::start().await)).await;
}

/// A process with no idle worker arms nothing, so that a submit costs
/// two `GET`s and no wake is pushed: B's one slot busy on a long task, the
/// flag it set lapses, and a second submit pushes no wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_workers_arm_nothing() {
    let redis = TestRedis::start().await;
    let url = redis.url();
    let api = koo(&url, 0, Duration::from_secs(60)).await;
    let _workers = koo(&url, 1, Duration::from_millis(20)).await;
    let keys = QueueKeys::new("koo", &Category::Research.default_queue());
    let mut conn = redis.conn().await;
    armed(&mut conn, &keys.idle()).await;
    let mut c = client(&api);
    let long = submit(
        koo::tasks::handlers::SLEEP,
        serde_json::json!({ "seconds": 10, "steps": 1 }),
    );
    let id = submitted(&mut c, long).await;
    wait_task(&mut c, &id, |t| t.state == pb::TaskState::Running as i32).await;
    // the slot is busy: the flag it set lapses and is not set again
    let until = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(keys.idle())
            .query_async(&mut conn)
            .await
            .unwrap();
        if exists == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "the flag stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // (the first submit's wake may still be there if B's poll leased the
    // task between two armings: only this submit's push is checked)
    let llen = || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let mut n = 0;
            for list in wake_lists(&mut conn, &keys).await {
                let len: i64 = redis::cmd("LLEN")
                    .arg(list)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                n += len;
            }
            n
        }
    };
    let before = llen().await;
    c.submit_task(submit(NOOP, serde_json::json!({})))
        .await
        .unwrap();
    assert_eq!(
        llen().await,
        before,
        "a submit with no process armed pushes no wake"
    );
}

/// A task due later is made ready by whichever process's recovery sweep
/// gets to it first: here koo A's (every 100 ms; koo B sweeps once a
/// minute and its slots poll once a minute), and A's sweep wakes B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_made_due_by_another_process_s_sweep_wakes_idle_workers() {
    let redis = TestRedis::start().await;
    let url = redis.url();
    let api = koo(&url, 0, Duration::from_secs(60)).await;
    let minute = Duration::from_secs(60);
    let _workers = koo_with(&url, 2, minute, |s| s.tasks.config.sweep_interval = minute).await;
    let keys = QueueKeys::new("koo", &Category::Research.default_queue());
    let mut conn = redis.conn().await;
    armed(&mut conn, &keys.idle()).await;
    let mut c = client(&api);
    let mut later = submit(NOOP, serde_json::json!({}));
    later.countdown = Some(common::tasks::millis(300));
    succeeds_in_time(&mut c, later, 0).await;
}

/// A process arms only the queues an idle worker of its own would lease
/// from (a wake of another queue must reach a process that would take it):
/// B has no built-in slots and one stream worker serving the research
/// queue; B arms research and not cache, and a task submitted through A is
/// pushed to the stream at once (B polls once a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_arms_only_the_queues_its_idle_workers_serve() {
    let redis = TestRedis::start().await;
    let url = redis.url();
    let api = koo(&url, 0, Duration::from_secs(60)).await;
    let workers = koo(&url, 0, Duration::from_secs(60)).await;
    let name = "test.wake.stream";
    let (tx, mut stream) = stream_worker(&workers, name, 1).await;
    let research = QueueKeys::new("koo", &Category::Research.default_queue());
    let cache = QueueKeys::new("koo", &Category::Cache.default_queue());
    let mut conn = redis.conn().await;
    armed(&mut conn, &research.idle()).await;
    // an arming sets every flag it arms before its BLPOP, in one pipeline:
    // by the time research's flag is read, the cache queue's would be set
    let other: i64 = redis::cmd("EXISTS")
        .arg(cache.idle())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(other, 0, "a queue no idle worker here serves was armed");
    let mut c = client(&api);
    let id = submitted(
        &mut c,
        pb::SubmitTaskRequest {
            name: name.into(),
            category: pb::TaskCategory::Research as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(pushed(&mut stream).await, id);
    drop(tx);
}

/// A unary `LeaseTask` long-poll (grpcurl's way of working) waits on its
/// process's board as an idle slot does: koo B has no slots and polls once
/// a minute, and a call waiting there up to a minute gets a task submitted
/// through A at once (B armed the queue for it); then a call waiting on A
/// itself is handed a task submitted through A in the submit's own round
/// trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_long_poll_is_woken_and_handed_tasks() {
    let redis = TestRedis::start().await;
    let url = redis.url();
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let minute = Duration::from_secs(60);
    let api = koo_with(&url, 0, minute, |s| s.http_listen = Some(http)).await;
    let workers = koo(&url, 0, minute).await;
    let keys = QueueKeys::new("koo", &Category::Research.default_queue());
    let mut conn = redis.conn().await;
    let long_poll = |server: &TestServer| {
        let mut w = WorkerServiceClient::new(server.channel.clone());
        tokio::spawn(async move {
            let req = wpb::LeaseTaskRequest {
                worker_name: "unary-wake".into(),
                queues: vec!["research".into()],
                wait: Some(common::tasks::millis(60_000)),
                ..Default::default()
            };
            w.lease_task(req).await.map(|r| r.into_inner().task)
        })
    };
    let taken = |call: tokio::task::JoinHandle<Result<Option<pb::Task>, tonic::Status>>| async {
        let got = tokio::time::timeout(EVENT_TIMEOUT, call).await;
        let task = got.expect("the long-poll answered within the event timeout");
        task.unwrap().unwrap().expect("a task").id
    };
    let mut c = client(&api);

    let on_b = long_poll(&workers);
    armed(&mut conn, &keys.idle()).await;
    let id = submitted(&mut c, submit(NOOP, serde_json::json!({}))).await;
    assert_eq!(taken(on_b).await, id);

    // B's call has ended (B arms nothing now): the flag set next is A's
    let _: i64 = redis::cmd("DEL")
        .arg(keys.idle())
        .query_async(&mut conn)
        .await
        .unwrap();
    let on_a = long_poll(&api);
    armed(&mut conn, &keys.idle()).await;
    let id = submitted(&mut c, submit(NOOP, serde_json::json!({}))).await;
    assert_eq!(taken(on_a).await, id);
    let (status, text) = crate::metrics::http_get(&http.to_string(), "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let handed = crate::metrics::sample(&text, "koo_task_handoffs_total", &[r#"queue="research""#]);
    assert_eq!(handed, Some(1.0), "{text}");
}

/// A wake goes to a process whose idle workers serve the task's name: koo
/// B's built-in slots serve koo's own task names; koo C has no slots and a
/// stream worker serving `test.wake.named`; both wait idle, armed, and poll
/// once a minute. Four tasks of that name submitted through A are each
/// pushed to C's worker at once, and B is never woken. (With one flag per
/// queue, the longest-blocked of B and C took each wake, B about half the
/// time, and the task then waited for C's poll.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_goes_to_a_process_that_serves_the_task_s_name() {
    let redis = TestRedis::start().await;
    let url = redis.url();
    let minute = Duration::from_secs(60);
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let api = koo(&url, 0, minute).await;
    let _builtin = koo_with(&url, 2, minute, |s| s.http_listen = Some(http)).await;
    let streams = koo(&url, 0, minute).await;
    let keys = QueueKeys::new("koo", &Category::Research.default_queue());
    let mut conn = redis.conn().await;
    armed(&mut conn, &keys.idle_for(NOOP)).await;
    let name = "test.wake.named";
    let (tx, mut stream) = stream_worker(&streams, name, 8).await;
    let mut c = client(&api);
    for i in 0..4 {
        // C (with room for more) armed again after each wake
        armed(&mut conn, &keys.idle_for(name)).await;
        let req = pb::SubmitTaskRequest {
            name: name.into(),
            category: pb::TaskCategory::Research as i32,
            ..Default::default()
        };
        let id = submitted(&mut c, req).await;
        assert_eq!(pushed(&mut stream).await, id, "task {i}");
    }
    let (status, text) = crate::metrics::http_get(&http.to_string(), "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let woken = crate::metrics::sample(&text, "koo_task_wakes_total", &[r#"queue="research""#]);
    assert!(woken.is_none_or(|n| n == 0.0), "B was woken: {woken:?}");
    drop(tx);
}
