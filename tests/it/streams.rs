//! Live streams at scale: one reader per queue per koo process fanned out
//! to every watcher, exact resumes, slow watchers ended with their resume
//! token, the watcher limit, shared metrics snapshots, and memory given back
//! when streams close. Real koo servers (in process, and the real binary for
//! memory), real Redis and the embedded store, real gRPC channels.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::tasks::*;
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1 as wpb;
use koo::pb::worker::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

on_both!(
    every_watcher_gets_every_final_state_with_1000_streams_open,
    resuming_gets_every_event_once_from_the_ring_or_the_store,
    a_stalled_watcher_is_ended_with_its_token_while_others_continue,
    the_watcher_limit_refuses_one_more_and_frees_a_closed_place,
    metrics_watchers_of_one_interval_share_each_snapshot,
);

/// The name of the tasks these tests run by hand (no built-in handler).
const NAME: &str = "test.streams.step";

/// This process's stream figures.
async fn streams(c: &mut pb::task_service_client::TaskServiceClient<Channel>) -> pb::StreamMetrics {
    c.get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .streams
        .expect("GetTaskMetrics reports streams")
}

/// Polls the stream figures until `check` accepts them (the figures move
/// as the server notices streams open and close).
async fn wait_streams(
    c: &mut pb::task_service_client::TaskServiceClient<Channel>,
    what: &str,
    check: impl Fn(&pb::StreamMetrics) -> bool,
) -> pb::StreamMetrics {
    let until = tokio::time::Instant::now() + common::EVENT_TIMEOUT;
    loop {
        let s = streams(c).await;
        if check(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "stream figures never showed {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits `n` tasks named [`NAME`] (no built-in worker serves them).
async fn submit_steps(
    c: &mut pb::task_service_client::TaskServiceClient<Channel>,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let batch = (n - ids.len()).min(100);
        let tasks = (0..batch)
            .map(|_| submit(NAME, serde_json::json!({})))
            .collect();
        let reply = c
            .submit_tasks(pb::SubmitTasksRequest { tasks })
            .await
            .unwrap()
            .into_inner();
        ids.extend(reply.tasks.into_iter().map(|t| t.id));
    }
    ids
}

/// Acts as a worker over the unary WorkerService calls: leases and completes
/// `n` tasks named [`NAME`], reporting progress once on each.
async fn run_steps(channel: Channel, n: usize) {
    let mut w = WorkerServiceClient::new(channel);
    for _ in 0..n {
        let lease = w
            .lease_task(wpb::LeaseTaskRequest {
                worker_name: "streams-test".into(),
                task_names: vec![NAME.into()],
                queues: vec!["research".into()],
                wait: Some(millis(5_000)),
            })
            .await
            .unwrap()
            .into_inner();
        let task = lease.task.expect("a task to lease");
        w.report_progress(wpb::ReportProgressRequest {
            task_id: task.id.clone(),
            lease_token: lease.lease_token,
            percent: 50.0,
            ..Default::default()
        })
        .await
        .unwrap();
        w.complete_task(wpb::CompleteTaskRequest {
            task_id: task.id,
            lease_token: lease.lease_token,
            lease_secret: lease.lease_secret,
            result: Some(koo_json(serde_json::json!("ok"))),
        })
        .await
        .unwrap();
    }
}

fn watch_research(name: &str, token: String) -> pb::WatchTasksRequest {
    pb::WatchTasksRequest {
        categories: vec![pb::TaskCategory::Research as i32],
        name: name.into(),
        resume_token: token,
    }
}

/// Reads `stream` until `n` SUCCEEDED events have come: every event read.
async fn read_until_succeeded(
    stream: &mut tonic::Streaming<pb::WatchTasksResponse>,
    n: usize,
) -> Vec<pb::WatchTasksResponse> {
    let mut events = Vec::new();
    let mut done = 0;
    while done < n {
        let e = tokio::time::timeout(common::EVENT_TIMEOUT, stream.message())
            .await
            .expect("events keep coming")
            .expect("the stream stays healthy")
            .expect("the stream stays open");
        if e.state == pb::TaskState::Succeeded as i32 {
            done += 1;
        }
        events.push(e);
    }
    events
}

/// What identifies an event: its task, state and progress.
fn key(e: &pb::WatchTasksResponse) -> (String, i32, Option<String>) {
    (
        e.task_id.clone(),
        e.state,
        e.progress.as_ref().map(|p| format!("{}", p.percent)),
    )
}

/// With 1,000 streams open (980 WatchTask spread over 100 tasks, 10
/// WatchTasks that match and 10 that match nothing), every watcher gets every
/// final state; one reader serves the queue; and the events handed out are
/// exactly those the matching watchers received: the 10 watchers that match
/// nothing cost nothing per event.
async fn every_watcher_gets_every_final_state_with_1000_streams_open(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let channel = koo.server.channel.clone();
    let mut c = client(&koo.server);
    let ids = submit_steps(&mut c, 100).await;
    let mut matching = Vec::new();
    let mut idle = Vec::new();
    for _ in 0..10 {
        matching.push(
            c.watch_tasks(watch_research(NAME, String::new()))
                .await
                .unwrap()
                .into_inner(),
        );
        idle.push(
            c.watch_tasks(watch_research("test.never", String::new()))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let mut singles = Vec::new();
    for i in 0..980 {
        let mut s = c
            .watch_task(pb::WatchTaskRequest {
                task_id: ids[i % ids.len()].clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = s.message().await.unwrap().unwrap().task.unwrap();
        assert_eq!(first.state, pb::TaskState::Queued as i32);
        singles.push((ids[i % ids.len()].clone(), s));
    }
    let before = streams(&mut c).await;
    assert_eq!(
        (before.watch_task, before.watch_tasks, before.queue_readers),
        (980, 20, 1),
        "one reader for the queue, whatever the number of watchers"
    );

    tokio::spawn(run_steps(channel, ids.len()));

    // every WatchTask ends with SUCCEEDED, having seen RUNNING first
    let mut per_task: HashMap<String, i64> = HashMap::new();
    for (id, mut s) in singles {
        let mut states = Vec::new();
        while let Some(m) = tokio::time::timeout(common::EVENT_TIMEOUT, s.message())
            .await
            .expect("WatchTask keeps going")
            .unwrap()
        {
            states.push(m.task.unwrap().state);
        }
        assert_eq!(
            states.last(),
            Some(&(pb::TaskState::Succeeded as i32)),
            "{id}: {states:?}"
        );
        *per_task.entry(id).or_default() += 1;
    }
    let mut seen = None;
    for mut s in matching {
        let events = read_until_succeeded(&mut s, ids.len()).await;
        let succeeded: std::collections::HashSet<_> = events
            .iter()
            .filter(|e| e.state == pb::TaskState::Succeeded as i32)
            .map(|e| e.task_id.clone())
            .collect();
        assert_eq!(succeeded.len(), ids.len(), "every final state, once");
        let keys: Vec<_> = events.iter().map(key).collect();
        assert!(
            seen.as_ref().is_none_or(|s| *s == keys),
            "matching watchers see the same events"
        );
        seen = Some(keys);
    }
    let events = seen.unwrap();
    // Each task's events went to its WatchTask watchers and the ten
    // matching WatchTasks; nothing went to the idle ones.
    let mut expected = 10 * events.len() as i64;
    for (id, watchers) in &per_task {
        let of_task = events.iter().filter(|e| e.0 == *id).count() as i64;
        expected += watchers * of_task;
    }
    let after = streams(&mut c).await;
    assert_eq!(after.events_fanned_out - before.events_fanned_out, expected);
    assert_eq!(after.watchers_fallen_behind, 0);
    for mut s in idle {
        use futures::FutureExt;
        assert!(
            s.message().now_or_never().is_none(),
            "an idle watcher got an event"
        );
    }
}

/// A resume token older than the feed's ring (KOO_WATCH_BUFFER events, 256
/// here) is
/// served from the store, one inside it from memory; either way the events
/// after the token come exactly once, then live events follow without a
/// gap or a duplicate.
async fn resuming_gets_every_event_once_from_the_ring_or_the_store(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| s.limits.watch_buffer = 256).await;
    let mut c = client(&koo.server);
    let mut first = c
        .watch_tasks(watch_research(NAME, String::new()))
        .await
        .unwrap()
        .into_inner();
    let ids = submit_steps(&mut c, 100).await;
    let worker = tokio::spawn(run_steps(koo.server.channel.clone(), ids.len()));
    let mut all = read_until_succeeded(&mut first, ids.len()).await;
    worker.await.unwrap();
    assert_eq!(
        all.len(),
        400,
        "queued, running, progress and succeeded per task"
    );
    // every event names its task (a live feed shows names without GetTask)
    let unnamed: Vec<_> = all.iter().filter(|e| e.name != NAME).map(key).collect();
    assert!(
        unnamed.is_empty(),
        "events without the task's name: {unnamed:?}"
    );
    for round in 0..2 {
        // first older than the ring (256 events), then inside it
        let from = if round == 0 { 4 } else { all.len() - 5 };
        let mut resumed = c
            .watch_tasks(watch_research(NAME, all[from].resume_token.clone()))
            .await
            .unwrap()
            .into_inner();
        let mut again = Vec::new();
        for _ in from + 1..all.len() {
            let e = tokio::time::timeout(common::EVENT_TIMEOUT, resumed.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            again.push(key(&e));
        }
        let expected: Vec<_> = all[from + 1..].iter().map(key).collect();
        assert_eq!(again, expected, "resumed after event {from}");
        // live events follow, and nothing came twice
        let more = submit_steps(&mut c, 1).await;
        run_steps(koo.server.channel.clone(), 1).await;
        let next = read_until_succeeded(&mut resumed, 1).await;
        assert!(next.iter().all(|e| e.task_id == more[0]), "{next:?}");
        let live = read_until_succeeded(&mut first, 1).await;
        assert_eq!(
            next.iter().map(key).collect::<Vec<_>>(),
            live.iter().map(key).collect::<Vec<_>>()
        );
        all.extend(live);
    }
}

/// A watcher that never reads is ended with RESOURCE_EXHAUSTED once
/// KOO_WATCH_BUFFER events wait for it, its status carrying the resume token
/// of the last event it received; resuming with that token gets the rest,
/// exactly. Another watcher meanwhile gets every event.
async fn a_stalled_watcher_is_ended_with_its_token_while_others_continue(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| s.limits.watch_buffer = 256).await;
    let mut c = client(&koo.server);
    // a connection whose flow-control window holds a few events at most
    let tiny = Endpoint::from_shared(format!("http://{}", koo.server.addr))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let mut stalled = pb::task_service_client::TaskServiceClient::new(tiny)
        .watch_tasks(watch_research(NAME, String::new()))
        .await
        .unwrap()
        .into_inner();
    let mut healthy = c
        .watch_tasks(watch_research(NAME, String::new()))
        .await
        .unwrap()
        .into_inner();
    let ids = submit_steps(&mut c, 250).await;
    let worker = tokio::spawn(run_steps(koo.server.channel.clone(), ids.len()));
    let all = read_until_succeeded(&mut healthy, ids.len()).await;
    worker.await.unwrap();
    let s = wait_streams(&mut c, "the stalled watcher ended", |s| {
        s.watchers_fallen_behind == 1
    })
    .await;
    assert_eq!(s.watch_tasks, 2, "it counts until its stream ends");

    // now read the stalled stream: some events, then the end
    let mut got = Vec::new();
    let status = loop {
        match tokio::time::timeout(common::EVENT_TIMEOUT, stalled.message())
            .await
            .unwrap()
        {
            Ok(Some(e)) => got.push(e),
            Ok(None) => panic!("the stalled stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("fell behind"),
        "{}",
        status.message()
    );
    let info = status.get_details_error_info().expect("ErrorInfo details");
    assert_eq!(info.reason, "WATCHER_FELL_BEHIND");
    let token = info.metadata["resume_token"].clone();
    assert!(got.len() < all.len(), "it was ended before the end");
    if let Some(last) = got.last() {
        assert_eq!(
            token, last.resume_token,
            "the token of the last event it received"
        );
    }
    let mut rest = c
        .watch_tasks(watch_research(NAME, token))
        .await
        .unwrap()
        .into_inner();
    for _ in got.len()..all.len() {
        let e = tokio::time::timeout(common::EVENT_TIMEOUT, rest.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(e);
    }
    let got: Vec<_> = got.iter().map(key).collect();
    let all: Vec<_> = all.iter().map(key).collect();
    assert_eq!(
        got, all,
        "before the end and after the resume: every event once"
    );
}

/// KOO_MAX_WATCHERS open streams of any kind: one more is
/// RESOURCE_EXHAUSTED naming the setting; closing one frees its place.
async fn the_watcher_limit_refuses_one_more_and_frees_a_closed_place(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| s.limits.max_watchers = 3).await;
    let mut c = client(&koo.server);
    let id = submit_steps(&mut c, 1).await.remove(0);
    let a = c
        .watch_task(pb::WatchTaskRequest {
            task_id: id.clone(),
        })
        .await
        .unwrap();
    let _b = c
        .watch_tasks(watch_research("", String::new()))
        .await
        .unwrap();
    let _m = c
        .watch_task_metrics(pb::WatchTaskMetricsRequest {
            interval: Some(millis(1000)),
        })
        .await
        .unwrap();
    let err = koo
        .server
        .cache()
        .watch_metrics(koo::pb::cache::v1::WatchMetricsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("KOO_MAX_WATCHERS"),
        "{}",
        err.message()
    );
    let err = c
        .watch_task(pb::WatchTaskRequest {
            task_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let s = streams(&mut c).await;
    assert_eq!(
        (
            s.watch_task,
            s.watch_tasks,
            s.watch_task_metrics,
            s.max_watchers
        ),
        (1, 1, 1, 3)
    );
    drop(a);
    wait_streams(&mut c, "the closed stream's place given back", |s| {
        s.watch_task == 0
    })
    .await;
    c.watch_task(pb::WatchTaskRequest { task_id: id })
        .await
        .expect("a place is free again");
}

/// Metrics watchers with the same interval get the same snapshots (one
/// computation per interval per process): equal times, tick after tick.
async fn metrics_watchers_of_one_interval_share_each_snapshot(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut watchers = Vec::new();
    for _ in 0..5 {
        watchers.push(
            c.watch_task_metrics(pb::WatchTaskMetricsRequest {
                interval: Some(millis(200)),
            })
            .await
            .unwrap()
            .into_inner(),
        );
    }
    let s = streams(&mut c).await;
    assert_eq!(s.watch_task_metrics, 5);
    // the first snapshot may be a watcher's own; later ones are shared
    let mut times = Vec::new();
    for w in &mut watchers {
        w.message().await.unwrap().unwrap();
        let mut t = Vec::new();
        for _ in 0..2 {
            let m = w.message().await.unwrap().unwrap();
            assert_eq!(m.streams.as_ref().map(|s| s.watch_task_metrics), Some(5));
            t.push(m.time.unwrap());
        }
        times.push(t);
    }
    // Each watcher read its snapshots in turn, so two consecutive ones of
    // any watcher are consecutive shared ticks; the first watcher's second
    // snapshot is the one every later watcher read first or is one tick
    // behind it.
    let shared: std::collections::HashSet<_> = times
        .iter()
        .flatten()
        .map(|t| (t.seconds, t.nanos))
        .collect();
    assert!(
        shared.len() <= 3,
        "5 watchers x 2 snapshots from at most 3 ticks, got {} distinct times",
        shared.len()
    );
}

/// On Redis, a watcher on one koo instance sees the events of tasks that
/// another instance ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_two_instances_see_each_others_events() {
    let koo = start_on(Backend::Redis, 0).await;
    let other = spawn_on(koo.redis(), 0).await;
    let mut here = client(&koo.server);
    let mut watch = here
        .watch_tasks(watch_research(NAME, String::new()))
        .await
        .unwrap()
        .into_inner();
    let mut there = client(&other);
    let ids = submit_steps(&mut there, 3).await;
    run_steps(other.channel.clone(), ids.len()).await;
    let events = read_until_succeeded(&mut watch, ids.len()).await;
    for id in &ids {
        assert!(
            events
                .iter()
                .any(|e| e.task_id == *id && e.state == pb::TaskState::Succeeded as i32)
        );
    }
}

/// koo's resident memory (VmRSS, bytes) from /proc.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// The real koo binary (embedded store): 2,000 open streams raise its
/// resident memory; once they close, koo gives the memory back (to within
/// 10 % of what it used before), as read from /proc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_after_streams_close() {
    use std::io::BufRead;
    let mut child = common::koo_command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KOO_WORKER_CONCURRENCY", "0")
        .env("KOO_SHUTDOWN_DRAIN", "0")
        .env("KOO_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop_guard();
    let stderr = child.0.stderr.take().unwrap();
    let addr = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.contains("koo serving gRPC")
                .then(|| {
                    l.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()
                        .map(str::to_owned)
                })
                .flatten()
        })
        .expect("koo serves");
    let pid = child.0.id();
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::task_service_client::TaskServiceClient::new(channel);
    let id = submit_steps(&mut c, 1).await.remove(0);
    // one round first, so that what is allocated once (runtime, pools) is in
    // the baseline
    let open = |c: pb::task_service_client::TaskServiceClient<Channel>, n: usize| {
        let id = id.clone();
        async move {
            let mut c = c;
            let mut held = (Vec::new(), Vec::new());
            for _ in 0..n {
                let mut s = c
                    .watch_task(pb::WatchTaskRequest {
                        task_id: id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                s.message().await.unwrap().unwrap();
                held.0.push(s);
                held.1.push(
                    c.watch_tasks(watch_research("test.never", String::new()))
                        .await
                        .unwrap()
                        .into_inner(),
                );
            }
            held
        }
    };
    let warm = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    drop(open(pb::task_service_client::TaskServiceClient::new(warm), 100).await);
    wait_streams(&mut c, "no streams", |s| s.watch_task + s.watch_tasks == 0).await;
    let baseline = rss(pid);
    // the streams' own connection, closed with them
    let conn = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let held = open(pb::task_service_client::TaskServiceClient::new(conn), 1000).await;
    let s = streams(&mut c).await;
    assert_eq!((s.watch_task, s.watch_tasks), (1000, 1000));
    let open_rss = rss(pid);
    drop(held);
    wait_streams(&mut c, "every stream closed and the reader stopped", |s| {
        s.watch_task + s.watch_tasks == 0 && s.queue_readers == 0
    })
    .await;
    let limit = baseline + baseline / 10;
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut now = rss(pid);
    while now > limit {
        assert!(
            tokio::time::Instant::now() < until,
            "RSS {now} B a minute after the streams closed; {baseline} B before, {open_rss} B with 2,000 open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = rss(pid);
    }
    eprintln!("koo RSS: {baseline} B before, {open_rss} B with 2,000 streams, {now} B after");
}

/// Kills the child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

trait KillOnDropExt {
    fn kill_on_drop_guard(&mut self) -> KillOnDrop;
}

impl KillOnDropExt for std::process::Command {
    fn kill_on_drop_guard(&mut self) -> KillOnDrop {
        KillOnDrop(self.spawn().expect("spawn koo"))
    }
}
