//! The task engine on a real Redis Cluster (six `redis-server` processes,
//! three masters and their replicas) through koo's gRPC API: queues placed
//! on different masters by their names' hash tags (`{t:NAME}`), the paths
//! that cross slots (batch submits over several queues, a dependency across
//! queues, idempotency claims, worker records), flow control over queues
//! on three masters (its keys in a slot of their own), and a master `kill -9`ed under submit and lease load
//! failing over to its replica with no acknowledged task lost or stuck.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::TestCluster;
use common::tasks::{client, failing, is_final, short_intervals, submit, wait_task};
use common::{EVENT_TIMEOUT, TestServer, redis_settings, test_settings};
use koo::domain::task::QueueName;
use koo::pb::tasks::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// Three queue names whose keys land on three different masters, with the
/// port of each one's master: which master holds a queue follows from the
/// slot of its hash tag alone (`CLUSTER KEYSLOT "{t:NAME}"`).
async fn queues_on_each_master(cluster: &TestCluster) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for i in 0..200 {
        let name = format!("q{i}");
        let port = cluster.master_of(&format!("{{t:{name}}}")).await;
        if out.iter().all(|(_, p)| *p != port) {
            out.push((name, port));
        }
        if out.len() == 3 {
            return out;
        }
    }
    panic!("no three queues on three masters: {out:?}")
}

/// koo on `cluster` serving `queues` (beyond the category queues) with
/// `workers` built-in slots; each submit waits for `wait_replicas`.
async fn koo_on(
    cluster: &TestCluster,
    queues: &[(String, u16)],
    workers: usize,
    wait_replicas: u32,
) -> TestServer {
    let mut settings = test_settings(redis_settings(&cluster.url()));
    short_intervals(&mut settings, workers);
    settings.tasks.config.extra_queues = queues
        .iter()
        .map(|(q, _)| QueueName::parse(q).unwrap())
        .collect();
    settings.tasks.config.limits.submit_wait_replicas = wait_replicas;
    // a replica's acknowledgement takes microseconds, but this machine's
    // cores are shared with builds: more room than the 200 ms default
    settings.tasks.config.limits.submit_wait_timeout = Duration::from_secs(2);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    server
}

fn on_queue(queue: &str, mut req: pb::SubmitTaskRequest) -> pb::SubmitTaskRequest {
    req.queue = queue.into();
    req
}

fn short_sleep() -> pb::SubmitTaskRequest {
    submit(
        koo::tasks::handlers::SLEEP,
        serde_json::json!({ "seconds": 0.02, "steps": 1 }),
    )
}

/// A batch over three queues on three masters runs whole; a task waits on
/// one in another queue (on another master) and is released or cancelled
/// by its end; concurrent submits of one idempotency key make one task;
/// worker pools are listed; a cap and a rate limit hold across queues on
/// three masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_on_three_masters_work_across_slots() {
    let cluster = TestCluster::start().await;
    let queues = queues_on_each_master(&cluster).await;
    let server = koo_on(&cluster, &queues, 4, 0).await;
    let mut c = client(&server);

    // a batch over every queue: one pipeline per queue's slot
    let batch: Vec<_> = (0..6)
        .map(|i| on_queue(&queues[i % 3].0, short_sleep()))
        .collect();
    let tasks = c
        .submit_tasks(pb::SubmitTasksRequest { tasks: batch })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 6);
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(t.queue, queues[i % 3].0);
        let done = wait_task(&mut c, &t.id, is_final).await;
        assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    }

    // a dependency across queues (and masters): released by a success,
    // cancelled by a failure
    let first = submit_ok(&mut c, on_queue(&queues[1].0, short_sleep())).await;
    let mut after = on_queue(&queues[0].0, short_sleep());
    after.depends_on = vec![first.id.clone()];
    let after = submit_ok(&mut c, after).await;
    let done = wait_task(&mut c, &after.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    // (it starts later, so that the dependent is stored while it waits)
    let mut failed = on_queue(&queues[2].0, failing(5, 0));
    failed.countdown = Some(common::tasks::millis(300));
    let failed = submit_ok(&mut c, failed).await;
    let mut orphan = on_queue(&queues[0].0, short_sleep());
    orphan.depends_on = vec![failed.id.clone()];
    let orphan = submit_ok(&mut c, orphan).await;
    let done = wait_task(&mut c, &orphan.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Cancelled as i32, "{done:?}");

    // one idempotency key, ten submits at once: one task (the claim's slot
    // is not the task's)
    let submits = (0..10).map(|_| {
        let mut c = c.clone();
        let mut req = on_queue(&queues[2].0, short_sleep());
        req.idempotency_key = "one-report".into();
        async move { c.submit_task(req).await.unwrap().into_inner() }
    });
    let replies = futures::future::join_all(submits).await;
    let id = &replies[0].task.as_ref().unwrap().id;
    assert!(replies.iter().all(|r| &r.task.as_ref().unwrap().id == id));
    assert_eq!(replies.iter().filter(|r| !r.deduplicated).count(), 1);

    // the pool's record and the index naming it live in two slots
    let index = koo::keys::workers_index("koo");
    let mut raw = cluster.conn_to_master_of(&index).await;
    let pools: Vec<String> = redis::cmd("ZRANGE")
        .arg(&index)
        .arg(0)
        .arg(-1)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(!pools.is_empty(), "the worker pool is indexed");

    // the health check task reads the store's memory and every queue
    let check = c
        .submit_health_check(pb::SubmitHealthCheckRequest {})
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let done = wait_task(&mut c, &check.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");

    flow_control_spans_masters(&cluster, &mut c, &queues).await;
    // a schedule whose task carries a key is stored as any other
    let mut schedules = koo::pb::schedule::v1::schedule_service_client::ScheduleServiceClient::new(
        server.channel.clone(),
    );
    let created = schedules
        .create_schedule(koo::pb::schedule::v1::CreateScheduleRequest {
            schedule: Some(koo::pb::schedule::v1::Schedule {
                name: "keyed".into(),
                cron: "* * * * *".into(),
                task: Some(koo::pb::schedule::v1::TaskTemplate {
                    name: koo::tasks::handlers::NOOP.into(),
                    category: pb::TaskCategory::Research as i32,
                    rate_limit_key: "openai".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            paused: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        created.schedule.unwrap().task.unwrap().rate_limit_key,
        "openai",
        "the key is kept"
    );
}

/// Flow control on a Cluster (`flow_cluster.rs`): a cap of 1 on key
/// `tenant` holds for its tasks in three queues on three masters (no two
/// ran at once, by their recorded start and end times), a queue's rate
/// limit is listed, and the limits live in flow control's own slot.
async fn flow_control_spans_masters(
    cluster: &TestCluster,
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    queues: &[(String, u16)],
) {
    c.set_rate_limit(pb::SetRateLimitRequest {
        rate_limit: Some(pb::RateLimit {
            name: format!("queues/{}", queues[0].0),
            limit: 1000,
            period: Some(common::tasks::millis(1000)),
            burst: 10,
            ..Default::default()
        }),
    })
    .await
    .expect("a rate limit on a Cluster");
    c.set_concurrency_limit(pb::SetConcurrencyLimitRequest {
        concurrency_limit: Some(pb::ConcurrencyLimit {
            name: "keys/tenant".into(),
            max_running: 1,
            ..Default::default()
        }),
    })
    .await
    .expect("a cap on a Cluster");
    let mut ids = Vec::new();
    for i in 0..6 {
        let mut req = on_queue(&queues[i % 3].0, short_sleep());
        req.concurrency_key = "tenant".into();
        req.rate_limit_key = "tenant".into();
        ids.push(submit_ok(c, req).await.id);
    }
    let mut spans = Vec::new();
    for id in &ids {
        let done = wait_task(c, id, is_final).await;
        assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
        let ms = |t: &Option<prost_types::Timestamp>| {
            let t = t.as_ref().expect("a time");
            t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
        };
        spans.push((ms(&done.start_time), ms(&done.end_time)));
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "two of key tenant ran at once: {spans:?}"
        );
    }
    let listed = c
        .list_rate_limits(pb::ListRateLimitsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rate_limits.len(), 1, "{listed:?}");
    let limits = "koo:v1:{fc}:limits";
    let mut raw = cluster.conn_to_master_of(limits).await;
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(limits)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(fields.len(), 2, "{fields:?}");
    // every attempt's entry left the key's running set
    let running: u64 = redis::cmd("ZCARD")
        .arg("koo:v1:{fc}:cc:tenant")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(running, 0);
}

async fn submit_ok(
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    req: pb::SubmitTaskRequest,
) -> pb::Task {
    c.submit_task(req).await.unwrap().into_inner().task.unwrap()
}

/// What the submitters saw: acknowledged task ids by queue index, and
/// refusals by gRPC code.
#[derive(Default)]
struct Ledger {
    acked: Vec<(usize, String)>,
    /// Acknowledged submits that carried an idempotency key: the request
    /// and the id it got.
    keyed: Vec<(pb::SubmitTaskRequest, String)>,
    refused: Vec<(usize, Code)>,
    /// How many acknowledged submits carried flow-control keys.
    flow: usize,
}

/// A cap of two and a rate of 2,000 a second (burst 50) on every key.
async fn limit_every_key(
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
) {
    c.set_concurrency_limit(pb::SetConcurrencyLimitRequest {
        concurrency_limit: Some(pb::ConcurrencyLimit {
            name: "keys/*".into(),
            max_running: 2,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    c.set_rate_limit(pb::SetRateLimitRequest {
        rate_limit: Some(pb::RateLimit {
            name: "keys/*".into(),
            limit: 2000,
            period: Some(common::tasks::millis(1000)),
            burst: 50,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

impl Ledger {
    fn acked_on(&self, queue: usize) -> usize {
        self.acked.iter().filter(|(q, _)| *q == queue).count()
    }
}

/// Submit and lease load on three queues (three masters, eight built-in
/// worker slots, every submit waiting for one replica with
/// `KOO_TASK_SUBMIT_WAIT_REPLICAS=1`); the master of the first queue is
/// `kill -9`ed; its replica takes over (the cluster's own election,
/// `cluster-node-timeout` 1 s), the killed node comes back as a replica,
/// and submits to that queue are acknowledged again. Then the ledger check:
/// every acknowledged submit reaches an end state, none is lost (NOT_FOUND)
/// and none is stuck. Without the wait a failover may lose acknowledged
/// submits (asynchronous replication), which this test could not tell from
/// a bug; with it, zero loss is the assertion.
///
/// The killed master also holds flow control's slot (`{fc}`), and a third
/// of the tasks carry a concurrency and a rate-limit key (`keys/*`: two at
/// a time, 2,000 a second): their reservations fail while the slot has no
/// master and are made again on the promoted replica; a reservation the
/// failover lost or left unused costs a token or waits for the cap's
/// repair, never a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_master_fails_over_and_no_acknowledged_task_is_lost() {
    let mut cluster = TestCluster::start().await;
    cluster.wait_replicated().await;
    let mut queues = queues_on_each_master(&cluster).await;
    // the first queue (the victim's) shares its master with flow control
    let fc = cluster.master_of("koo:v1:{fc}:limits").await;
    queues.sort_by_key(|(_, port)| *port != fc);
    assert_eq!(queues[0].1, fc);
    let server = koo_on(&cluster, &queues, 8, 1).await;
    let mut c = client(&server);
    limit_every_key(&mut c).await;
    // a batch over the three masters waits for each one's replica
    let batch: Vec<_> = (0..3)
        .map(|i| on_queue(&queues[i].0, short_sleep()))
        .collect();
    let tasks = c
        .submit_tasks(pb::SubmitTasksRequest { tasks: batch })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 3);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (progress, mut seen) = tokio::sync::watch::channel(0usize);
    let progress = Arc::new(progress);
    let stop = tokio_util::sync::CancellationToken::new();
    let submitters: Vec<_> = (0..6)
        .map(|s| spawn_submitter(s, &server, &queues, &ledger, &progress, &stop))
        .collect();

    wait_count(&mut seen, 60).await;
    let victim = queues[0].1;
    let before = ledger.lock().unwrap().acked_on(0);
    let killed_at = std::time::Instant::now();
    cluster.node(victim).kill();
    // the replica's election: bounded by the node timeout plus a vote
    let promoted = wait_promotion(&cluster, &queues[0].0, victim).await;
    let promotion = killed_at.elapsed();
    cluster.node(victim).restart().await;
    cluster.wait_ok().await;
    cluster.wait_replicated().await;
    // submits to the failed-over queue are acknowledged again (the
    // restarted node is the new master's replica, so WAIT is satisfied)
    wait_count(&mut seen, before + 60).await;
    let back = killed_at.elapsed();
    stop.cancel();
    for s in submitters {
        s.await.unwrap();
    }

    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let (ended, lost) = check_ledger(&mut c, &ledger).await;
    let refused: Vec<usize> = (0..3)
        .map(|q| ledger.refused.iter().filter(|(r, _)| *r == q).count())
        .collect();
    eprintln!(
        "failover {victim} -> {promoted} in {promotion:?}, 60 more acknowledged by {back:?}: {} acknowledged ({before} on the killed master's queue before the kill), refused per queue {refused:?}, {ended} ended ({} keyed), {} lost",
        ledger.acked.len(),
        ledger.flow,
        lost.len(),
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert_eq!(ended, ledger.acked.len());
    assert!(ledger.flow > 20, "keyed tasks went through the failover");
    // no key is left blocked: entries the failover left behind (a
    // reservation whose lease failed) are repaired, and each key runs
    for key in ["t0", "t1", "t2"] {
        let mut req = on_queue(&queues[0].0, short_sleep());
        req.concurrency_key = key.into();
        req.rate_limit_key = key.into();
        let id = submit_ok(&mut c, req).await.id;
        let done = wait_task(&mut c, &id, is_final).await;
        assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
    }
    // every acknowledged claim survived too: a resubmit finds its task
    assert!(!ledger.keyed.is_empty());
    for (req, id) in ledger.keyed {
        let again = c.submit_task(req).await.unwrap().into_inner();
        assert_eq!(again.task.unwrap().id, id);
        assert!(again.deduplicated);
    }
}

/// One submitter of the failover test: `SLEEP` tasks round robin over the
/// three queues (every fourth with an idempotency key of its own) until
/// `stop`, each outcome in `ledger`; `progress` carries the count
/// acknowledged on the first queue.
fn spawn_submitter(
    s: usize,
    server: &TestServer,
    queues: &[(String, u16)],
    ledger: &Arc<Mutex<Ledger>>,
    progress: &Arc<tokio::sync::watch::Sender<usize>>,
    stop: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (mut c, ledger, stop) = (client(server), ledger.clone(), stop.clone());
    let (progress, names) = (progress.clone(), queues.to_vec());
    tokio::spawn(async move {
        let mut n = s;
        while !stop.is_cancelled() {
            let q = n % 3;
            n += 1;
            let mut body = on_queue(&names[q].0, short_sleep());
            if n.is_multiple_of(4) {
                // its claim lives in another slot than its task
                body.idempotency_key = format!("k{s}-{n}");
            }
            // a third of each queue's tasks (n - 1 = 3k + q: one queue per k)
            let keyed = ((n - 1) / 3 + q).is_multiple_of(3);
            if keyed {
                // reserved in flow control's slot, on the victim's master
                body.concurrency_key = format!("t{}", s % 3);
                body.rate_limit_key = body.concurrency_key.clone();
            }
            let mut req = tonic::Request::new(body.clone());
            req.set_timeout(Duration::from_secs(3));
            let reply = c.submit_task(req).await;
            let refused = {
                let mut l = ledger.lock().unwrap();
                let refused = match reply {
                    Ok(r) => {
                        let id = r.into_inner().task.unwrap().id;
                        if !body.idempotency_key.is_empty() {
                            l.keyed.push((body, id.clone()));
                        }
                        l.acked.push((q, id));
                        l.flow += usize::from(keyed);
                        false
                    }
                    Err(e) => {
                        assert!(
                            matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                            "{e:?}"
                        );
                        l.refused.push((q, e.code()));
                        true
                    }
                };
                progress.send_replace(l.acked_on(0));
                refused
            };
            if refused {
                // koo answered at once (its breaker, or a shard without a
                // master): let the cluster move on
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

/// The ledger check: each acknowledged task read once; one not yet ended
/// is followed (WatchTask) until it ends, failing the test if it never
/// does within the event timeout (stuck). Returns how many ended and the
/// ids not found (lost).
async fn check_ledger(
    c: &mut pb::task_service_client::TaskServiceClient<tonic::transport::Channel>,
    ledger: &Ledger,
) -> (usize, Vec<(usize, String)>) {
    let (mut ended, mut lost) = (0, Vec::new());
    for (q, id) in &ledger.acked {
        let read = c
            .get_task(pb::GetTaskRequest {
                task_id: id.clone(),
            })
            .await;
        match read {
            Ok(t) if is_final(t.get_ref().task.as_ref().unwrap()) => ended += 1,
            Ok(_) => {
                wait_task(c, id, is_final).await;
                ended += 1;
            }
            Err(e) if e.code() == Code::NotFound => lost.push((*q, id.clone())),
            Err(e) => panic!("GetTask {id}: {e:?}"),
        }
    }
    (ended, lost)
}

/// Waits until the submitters have had `n` submits to the first queue
/// acknowledged.
async fn wait_count(seen: &mut tokio::sync::watch::Receiver<usize>, n: usize) {
    tokio::time::timeout(EVENT_TIMEOUT, seen.wait_for(|c| *c >= n))
        .await
        .unwrap_or_else(|_| panic!("fewer than {n} submits acknowledged"))
        .unwrap();
}

/// Waits until a master other than `old` serves `queue`'s slot: the port of
/// the promoted replica. The cluster's state has no event to await from
/// outside: a bounded poll.
async fn wait_promotion(cluster: &TestCluster, queue: &str, old: u16) -> u16 {
    let until = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let now = cluster.try_master_of(&format!("{{t:{queue}}}")).await;
        if let Some(port) = now.filter(|p| *p != old) {
            return port;
        }
        assert!(tokio::time::Instant::now() < until, "no replica took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// On a Redis with no replica, a submit that must wait for one answers
/// UNAVAILABLE naming `KOO_TASK_SUBMIT_WAIT_REPLICAS` (the task is stored,
/// on the master only: the caller is told it may not survive a failover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_waiting_for_a_missing_replica_is_unavailable() {
    let koo = common::tasks::start_on_with(common::tasks::Backend::Redis, 0, |s| {
        s.tasks.config.limits.submit_wait_replicas = 1;
    })
    .await;
    let mut c = client(&koo.server);
    let err = c.submit_task(short_sleep()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("KOO_TASK_SUBMIT_WAIT_REPLICAS"),
        "{err:?}"
    );
    let err = c
        .submit_tasks(pb::SubmitTasksRequest {
            tasks: vec![short_sleep(), short_sleep()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // an idempotency claim waits too, before any task is stored
    let mut keyed = short_sleep();
    keyed.idempotency_key = "once".into();
    let err = c.submit_task(keyed).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("KOO_TASK_SUBMIT_WAIT_REPLICAS"),
        "{err:?}"
    );
}

/// Scenario: `koo serve` with no built-in workers and a separate `koo
/// worker` process (the binary, configured by its environment), both on
/// `redis+cluster://`: tasks on queues of three masters are leased by the
/// worker process and succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_koo_worker_process_runs_tasks_on_the_cluster() {
    let cluster = TestCluster::start().await;
    let queues = queues_on_each_master(&cluster).await;
    let server = koo_on(&cluster, &queues, 0, 0).await;
    let names: Vec<&str> = queues.iter().map(|(q, _)| q.as_str()).collect();
    let mut worker = common::ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_koo"))
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REDIS_URL", cluster.url())
            .env("KOO_TASK_QUEUES", names.join(","))
            .env("KOO_WORKER_CONCURRENCY", "2")
            .env("KOO_WORKER_POLL_INTERVAL", "20ms")
            .env("KOO_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn koo worker"),
    );
    let mut c = client(&server);
    let mut ids = Vec::new();
    for (q, _) in &queues {
        ids.push(submit_ok(&mut c, on_queue(q, short_sleep())).await.id);
    }
    for id in &ids {
        let done = wait_task(&mut c, id, is_final).await;
        // koo serve has no built-in slots: only the worker process can have run it
        assert_eq!(done.state, pb::TaskState::Succeeded as i32, "{done:?}");
        assert_eq!(done.attempts, 1, "{done:?}");
    }
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker process is still running"
    );
}
