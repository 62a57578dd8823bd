//! The embedded store across restarts (`KOO_DATA_DIR`), with real `koo
//! serve` processes stopped by SIGTERM: what is saved comes back, what is
//! not kept is named in the log, and a data directory that cannot be used
//! stops start-up with a message naming it.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use common::tasks::{get_ok, is_final, millis, submit, submit_ok, wait_task};
use koo::pb::cache::v1::{self as cache_pb, cache_service_client::CacheServiceClient};
use koo::pb::schedule::v1::{self as sched_pb, schedule_service_client::ScheduleServiceClient};
use koo::pb::tasks::v1::{self as pb, task_service_client::TaskServiceClient};
use tonic::transport::Channel;

/// A `koo serve` process on the embedded store, its address, and its log
/// lines as they come.
struct Koo {
    child: Child,
    addr: String,
    lines: mpsc::Receiver<String>,
}

/// A `koo serve` command with none of the caller's configuration, fast
/// shutdown, and the default schedules off (so that only the test's tasks
/// exist).
fn command(data_dir: Option<&Path>, workers: u32, extra: &[(&str, &str)]) -> Command {
    let listen = extra
        .iter()
        .find(|(k, _)| *k == "KOO_LISTEN")
        .map_or("127.0.0.1:0", |(_, v)| *v);
    let mut cmd = common::koo_command();
    cmd.args(["serve", "--listen", listen])
        .env("KOO_WORKER_CONCURRENCY", workers.to_string())
        .env("KOO_SHUTDOWN_DRAIN", "0")
        .env("KOO_WORKER_SHUTDOWN_GRACE", "50ms")
        .env("KOO_WORKER_POLL_INTERVAL", "20ms")
        .env("KOO_TASK_SWEEP_INTERVAL", "100ms")
        .env("KOO_TASK_RETRY_BACKOFF", "50ms")
        .env("KOO_LOG_FORMAT", "text")
        .env("KOO_LOG", "info")
        .env("NO_COLOR", "1");
    for var in [
        "KOO_SCHEDULE_CACHE_CLEANUP",
        "KOO_SCHEDULE_CACHE_WARM",
        "KOO_SCHEDULE_DATABASE_MAINTENANCE",
        "KOO_SCHEDULE_HEALTH_CHECK",
    ] {
        cmd.env(var, "off");
    }
    if let Some(dir) = data_dir {
        cmd.env("KOO_DATA_DIR", dir);
    }
    cmd.envs(extra.iter().copied());
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

impl Koo {
    /// Starts koo and waits until it serves.
    fn start(data_dir: Option<&Path>, workers: u32) -> Koo {
        Self::start_with(data_dir, workers, &[])
    }

    /// [`Koo::start`] with extra environment.
    fn start_with(data_dir: Option<&Path>, workers: u32, extra: &[(&str, &str)]) -> Koo {
        let mut child = command(data_dir, workers, extra)
            .spawn()
            .expect("spawn koo");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut koo = Koo {
            child,
            addr: String::new(),
            lines,
        };
        let serving = koo.wait_line("koo serving gRPC");
        koo.addr = serving
            .split("addr=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        koo
    }

    /// The first log line (from now) containing `needle`.
    fn wait_line(&self, needle: &str) -> String {
        let until = std::time::Instant::now() + common::EVENT_TIMEOUT;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?}: {e}"),
            }
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// SIGTERM, then waits for the exit; the log lines it wrote meanwhile.
    async fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let mut lines = Vec::new();
        let until = std::time::Instant::now() + common::EVENT_TIMEOUT;
        // the reader thread ends when koo closes stderr at exit
        while let Ok(line) = self
            .lines
            .recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
        {
            lines.push(line);
        }
        let status = tokio::task::spawn_blocking(move || self.child.wait())
            .await
            .unwrap()
            .unwrap();
        (status, lines)
    }
}

impl Drop for Koo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `koo serve` that must refuse to start: its exit status and log. Fails
/// the test if it serves instead.
fn refused(data_dir: &Path) -> (std::process::ExitStatus, String) {
    let mut child = command(Some(data_dir), 0, &[]).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("koo serving gRPC") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("koo started instead of refusing: {log}{line}");
        }
        log.push_str(&line);
        log.push('\n');
    }
    (child.wait().unwrap(), log)
}

fn tasks(c: &Channel) -> TaskServiceClient<Channel> {
    TaskServiceClient::new(c.clone())
}

async fn active_in(c: &mut TaskServiceClient<Channel>, queue: &str) -> Vec<pb::Task> {
    c.list_active_tasks(pb::ListActiveTasksRequest {
        queue: queue.into(),
        page_size: 500,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .tasks
}

fn count(tasks: &[pb::Task], state: pb::TaskState) -> usize {
    tasks.iter().filter(|t| t.state == state as i32).count()
}

async fn set(c: &mut CacheServiceClient<Channel>, key: &str, ttl_ms: u64) {
    c.set(cache_pb::SetRequest {
        key: key.into(),
        value: Some(cache_pb::CacheValue {
            kind: Some(cache_pb::cache_value::Kind::Text(format!("value of {key}"))),
        }),
        ttl: Some(millis(ttl_ms)),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn get(c: &mut CacheServiceClient<Channel>, key: &str) -> cache_pb::GetResponse {
    c.get(cache_pb::GetRequest {
        key: key.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// A user schedule, `new-year`, firing a no-op each first of January.
async fn create_new_year(channel: Channel) {
    ScheduleServiceClient::new(channel)
        .create_schedule(sched_pb::CreateScheduleRequest {
            schedule: Some(sched_pb::Schedule {
                name: "new-year".into(),
                cron: "0 0 1 1 *".into(),
                task: Some(sched_pb::TaskTemplate {
                    name: "koo.diagnostics.noop".into(),
                    category: pb::TaskCategory::Research as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            paused: false,
        })
        .await
        .unwrap();
}

/// A task that would run in a year: it stays SCHEDULED across restarts.
fn later(name: &str) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        countdown: Some(millis(365 * 24 * 3600 * 1000)),
        ..submit(name, serde_json::json!({}))
    }
}

/// What the first run leaves behind, to be found after the restarts.
struct Left {
    dead: String,
    handed_back: String,
    dependent: String,
    queued: Vec<String>,
    scheduled: String,
    idempotent: String,
}

/// First run: a dead letter, a task running at SIGTERM (handed back), a
/// task waiting on it, queued, scheduled and idempotent tasks, cache
/// entries and a user schedule.
async fn fill(koo: &Koo) -> Left {
    let channel = koo.channel().await;
    let mut c = tasks(&channel);
    let dead = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            max_retries: Some(0),
            ..submit(
                "koo.diagnostics.fail_times",
                serde_json::json!({ "failures": 5 }),
            )
        },
    )
    .await
    .id;
    wait_task(&mut c, &dead, is_final).await;
    // holds the only worker slot until SIGTERM hands it back
    let handed_back = submit_ok(
        &mut c,
        submit(
            "koo.diagnostics.sleep",
            serde_json::json!({ "seconds": 3.0, "steps": 1 }),
        ),
    )
    .await
    .id;
    wait_task(&mut c, &handed_back, |t| {
        t.state == pb::TaskState::Running as i32
    })
    .await;
    let dependent = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![handed_back.clone()],
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await
    .id;
    let mut queued = Vec::new();
    for i in 0..5 {
        let t = submit_ok(
            &mut c,
            submit("koo.diagnostics.noop", serde_json::json!({ "i": i })),
        )
        .await;
        queued.push(t.id);
    }
    let scheduled = submit_ok(&mut c, later("koo.diagnostics.noop")).await.id;
    let idempotent = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            idempotency_key: "order-42".into(),
            ..later("koo.diagnostics.noop")
        },
    )
    .await
    .id;
    let mut cache = CacheServiceClient::new(channel.clone());
    set(&mut cache, "kept", 600_000).await;
    set(&mut cache, "short", 1).await;
    create_new_year(channel).await;
    Left {
        dead,
        handed_back,
        dependent,
        queued,
        scheduled,
        idempotent,
    }
}

/// Everything the first run left is there after a restart without
/// workers (so nothing moves while it is read).
async fn check_kept(koo: &Koo, left: &Left) {
    let channel = koo.channel().await;
    let mut c = tasks(&channel);
    let dead = get_ok(&mut c, &left.dead).await;
    assert_eq!(dead.state, pb::TaskState::Failed as i32, "{dead:?}");
    assert_eq!(dead.attempt_log.len(), 1, "{dead:?}");
    let research = common::tasks::queue_metrics(&mut c, "research").await;
    assert_eq!(research.dead_letters, 1, "{research:?}");
    let back = get_ok(&mut c, &left.handed_back).await;
    assert_eq!(back.state, pb::TaskState::Queued as i32, "{back:?}");
    assert_eq!(back.attempts, 0, "a hand-back gives its attempt back");
    assert_eq!(
        back.attempt_log.last().map(|a| a.outcome.as_str()),
        Some("handed_back"),
        "{back:?}"
    );
    let active = active_in(&mut c, "research").await;
    assert_eq!(count(&active, pb::TaskState::Queued), 6, "{active:?}");
    assert_eq!(count(&active, pb::TaskState::Scheduled), 2, "{active:?}");
    assert_eq!(count(&active, pb::TaskState::Pending), 1, "{active:?}");
    assert_eq!(count(&active, pb::TaskState::Running), 0, "{active:?}");
    let dependent = get_ok(&mut c, &left.dependent).await;
    assert_eq!(
        dependent.depends_on,
        std::slice::from_ref(&left.handed_back)
    );
    // the idempotency key still answers with the first task
    let again = c
        .submit_task(pb::SubmitTaskRequest {
            idempotency_key: "order-42".into(),
            ..later("koo.diagnostics.noop")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.deduplicated);
    assert_eq!(again.task.unwrap().id, left.idempotent);
    let mut cache = CacheServiceClient::new(channel.clone());
    let kept = get(&mut cache, "kept").await;
    assert!(kept.found);
    let ttl = kept.ttl.unwrap();
    assert!(
        (500..=600).contains(&ttl.seconds),
        "remaining TTL roughly kept: {ttl:?}"
    );
    assert!(
        !get(&mut cache, "short").await.found,
        "expired entry loaded"
    );
    let schedule = ScheduleServiceClient::new(channel)
        .get_schedule(sched_pb::GetScheduleRequest {
            name: "new-year".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert_eq!(schedule.cron, "0 0 1 1 *");
}

/// SIGTERM with tasks queued, running, scheduled, pending and
/// dead-lettered, cache entries with TTLs and a user schedule; restart on
/// the same KOO_DATA_DIR: all there (the running one handed back as on any
/// shutdown); SIGTERM and restart again with workers: the queued ones,
/// the handed-back one and its dependent run to SUCCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_the_embedded_store_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = Koo::start(Some(dir.path()), 1);
    let left = fill(&first).await;
    let (status, log) = first.terminate().await;
    assert!(status.success(), "{status:?}: {log:#?}");
    assert!(
        log.iter().any(|l| l.contains("embedded store saved")),
        "{log:#?}"
    );

    let second = Koo::start(Some(dir.path()), 0);
    check_kept(&second, &left).await;
    let (status, log) = second.terminate().await;
    assert!(status.success(), "{status:?}: {log:#?}");

    let third = Koo::start(Some(dir.path()), 4);
    let mut c = tasks(&third.channel().await);
    for id in left
        .queued
        .iter()
        .chain([&left.handed_back, &left.dependent])
    {
        let t = wait_task(&mut c, id, is_final).await;
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    }
    let scheduled = get_ok(&mut c, &left.scheduled).await;
    assert_eq!(scheduled.state, pb::TaskState::Scheduled as i32);
}

/// Without KOO_DATA_DIR, shutdown says what the embedded store drops,
/// counted per state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_without_data_dir_names_what_is_dropped() {
    let koo = Koo::start(None, 0);
    let channel = koo.channel().await;
    let mut c = tasks(&channel);
    for i in 0..3 {
        submit_ok(
            &mut c,
            submit("koo.diagnostics.noop", serde_json::json!({ "i": i })),
        )
        .await;
    }
    submit_ok(&mut c, later("koo.diagnostics.noop")).await;
    let mut cache = CacheServiceClient::new(channel);
    set(&mut cache, "a", 60_000).await;
    set(&mut cache, "b", 60_000).await;
    let (status, log) = koo.terminate().await;
    assert!(status.success());
    let line = log
        .iter()
        .find(|l| l.contains("embedded store: dropping"))
        .unwrap_or_else(|| panic!("no drop line: {log:#?}"));
    assert!(
        line.contains("dropping 4 tasks (scheduled 1, queued 3), 2 cache entries, 0 schedules; set KOO_DATA_DIR to keep them"),
        "{line}"
    );
}

/// A data file that does not parse stops start-up naming the file, and is
/// left as it was.
#[test]
fn corrupt_data_file_refuses_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("embedded-store.json");
    std::fs::write(&file, b"{\"format\":\"koo-embedded-store\",\"vers").unwrap();
    let (status, stderr) = refused(dir.path());
    assert!(!status.success());
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"{\"format\":\"koo-embedded-store\",\"vers"
    );
}

/// A data file of another format version stops start-up naming the file
/// and both versions.
#[test]
fn unknown_format_version_refuses_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("embedded-store.json");
    std::fs::write(
        &file,
        b"{\"format\":\"koo-embedded-store\",\"version\":99}\n{}",
    )
    .unwrap();
    let (status, stderr) = refused(dir.path());
    assert!(!status.success());
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("version 99"), "{stderr}");
}

/// A second koo on a data directory in use refuses to start, naming it;
/// the first keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instance_on_the_same_data_dir_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let first = Koo::start(Some(dir.path()), 0);
    let (status, stderr) = refused(dir.path());
    assert!(!status.success());
    assert!(stderr.contains("another koo"), "{stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    let mut c = tasks(&first.channel().await);
    submit_ok(&mut c, later("koo.diagnostics.noop")).await;
    let (status, _) = first.terminate().await;
    assert!(status.success());
}

/// With KOO_DATA_SNAPSHOT_INTERVAL, what was saved while serving survives
/// a `kill -9` (no shutdown save), and the lock dies with the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_snapshot_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", common::free_port());
    let first = Koo::start_with(
        Some(dir.path()),
        0,
        &[
            ("KOO_DATA_SNAPSHOT_INTERVAL", "200ms"),
            ("KOO_LOG", "info,koo::persist=debug"),
            ("KOO_HTTP_LISTEN", &http),
        ],
    );
    let mut c = tasks(&first.channel().await);
    let queued = submit_ok(
        &mut c,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await
    .id;
    let scheduled = submit_ok(&mut c, later("koo.diagnostics.noop")).await.id;
    // a save that began before the submits may end after them: wait for two
    first.wait_line("embedded store saved");
    first.wait_line("embedded store saved");
    // an operator sees the saves, their time and the journal in /metrics
    let (status, text) = crate::metrics::http_get(&http, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(
        value("koo_data_saves_total{result=\"ok\"}") >= 2.0,
        "{text}"
    );
    assert_eq!(value("koo_data_saves_total{result=\"failed\"}"), 0.0);
    let saved_at = value("koo_data_last_save_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 60.0..=now + 1.0).contains(&saved_at),
        "{saved_at} vs {now}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("koo_data_journal_bytes ")),
        "{text}"
    );
    assert_eq!(value("koo_data_journal_write_failures_total"), 0.0);
    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let second = Koo::start(Some(dir.path()), 0);
    let mut c = tasks(&second.channel().await);
    assert_eq!(
        get_ok(&mut c, &queued).await.state,
        pb::TaskState::Queued as i32
    );
    assert_eq!(
        get_ok(&mut c, &scheduled).await.state,
        pb::TaskState::Scheduled as i32
    );
}

/// What the journal must bring back: tasks in each waiting state, a
/// cancel, a dependency, an idempotency key, a pause, a rate limit and a
/// user schedule, none of them in any save.
struct Acknowledged {
    queued: Vec<String>,
    cancelled: String,
    scheduled: String,
    dependent: String,
    idempotent: String,
}

/// Changes made after the last save (with `KOO_DATA_SNAPSHOT_INTERVAL=0`
/// there is none while serving).
async fn acknowledge(koo: &Koo) -> Acknowledged {
    let channel = koo.channel().await;
    let mut c = tasks(&channel);
    let batch = c
        .submit_tasks(pb::SubmitTasksRequest {
            tasks: (0..20)
                .map(|i| submit("koo.diagnostics.noop", serde_json::json!({ "i": i })))
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut queued: Vec<String> = batch.tasks.into_iter().map(|t| t.id).collect();
    queued.push(
        submit_ok(
            &mut c,
            submit("koo.diagnostics.noop", serde_json::json!({})),
        )
        .await
        .id,
    );
    let cancelled = submit_ok(
        &mut c,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await
    .id;
    c.cancel_task(pb::CancelTaskRequest {
        task_id: cancelled.clone(),
        reason: "not needed".into(),
    })
    .await
    .unwrap();
    let scheduled = submit_ok(&mut c, later("koo.diagnostics.noop")).await.id;
    let dependent = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![queued[0].clone()],
            ..submit("koo.diagnostics.noop", serde_json::json!({}))
        },
    )
    .await
    .id;
    let idempotent = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            idempotency_key: "order-7".into(),
            ..later("koo.diagnostics.noop")
        },
    )
    .await
    .id;
    c.pause_queue(pb::PauseQueueRequest {
        queue: "ai_service".into(),
        reason: "provider down".into(),
    })
    .await
    .unwrap();
    c.set_rate_limit(pb::SetRateLimitRequest {
        rate_limit: Some(pb::RateLimit {
            name: "keys/openai".into(),
            limit: 7,
            period: Some(millis(1000)),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    create_new_year(channel).await;
    Acknowledged {
        queued,
        cancelled,
        scheduled,
        dependent,
        idempotent,
    }
}

/// Everything acknowledged is there, as it was answered.
async fn check_acknowledged(koo: &Koo, a: &Acknowledged) {
    let channel = koo.channel().await;
    let mut c = tasks(&channel);
    for id in &a.queued {
        assert_eq!(get_ok(&mut c, id).await.state, pb::TaskState::Queued as i32);
    }
    assert_eq!(
        get_ok(&mut c, &a.cancelled).await.state,
        pb::TaskState::Cancelled as i32
    );
    assert_eq!(
        get_ok(&mut c, &a.scheduled).await.state,
        pb::TaskState::Scheduled as i32
    );
    assert_eq!(
        get_ok(&mut c, &a.dependent).await.state,
        pb::TaskState::Pending as i32
    );
    let again = c
        .submit_task(pb::SubmitTaskRequest {
            idempotency_key: "order-7".into(),
            ..later("koo.diagnostics.noop")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.deduplicated);
    assert_eq!(again.task.unwrap().id, a.idempotent);
    let queues = c
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues;
    let ai = queues.iter().find(|q| q.name == "ai_service").unwrap();
    assert_eq!(ai.state, pb::QueueState::Paused as i32, "{ai:?}");
    assert_eq!(ai.pause.as_ref().unwrap().reason, "provider down");
    let limit = c
        .get_rate_limit(pb::GetRateLimitRequest {
            name: "keys/openai".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rate_limit
        .unwrap();
    assert_eq!(limit.limit, 7);
    ScheduleServiceClient::new(channel)
        .get_schedule(sched_pb::GetScheduleRequest {
            name: "new-year".into(),
        })
        .await
        .unwrap();
}

/// `kill -9` with no save since the changes (`KOO_DATA_SNAPSHOT_INTERVAL=0`):
/// every change a caller was answered OK for comes back from the journal,
/// under the default `everysec` and under `always`; the restart saves
/// them, so a second `kill -9` finds them too, and with workers every
/// task runs to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_change() {
    for fsync in ["everysec", "always"] {
        let dir = tempfile::tempdir().unwrap();
        let env = [
            ("KOO_DATA_SNAPSHOT_INTERVAL", "0"),
            ("KOO_DATA_FSYNC", fsync),
        ];
        let mut first = Koo::start_with(Some(dir.path()), 0, &env);
        let acknowledged = acknowledge(&first).await;
        first.child.kill().unwrap();
        first.child.wait().unwrap();
        assert!(
            !dir.path().join("embedded-store.json").exists(),
            "{fsync}: no save was made: only the journal holds the changes"
        );

        let mut second = Koo::start_with(Some(dir.path()), 0, &env);
        check_acknowledged(&second, &acknowledged).await;
        second.child.kill().unwrap();
        second.child.wait().unwrap();

        let third = Koo::start_with(Some(dir.path()), 4, &env);
        let mut c = tasks(&third.channel().await);
        for id in acknowledged.queued.iter().chain([&acknowledged.dependent]) {
            let t = wait_task(&mut c, id, is_final).await;
            assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{fsync}: {t:?}");
        }
        let (status, _) = third.terminate().await;
        assert!(status.success());
    }
}

/// Submits `n` ledger tasks through `channel` (lazy: it reconnects to the
/// restarted koo), each call retried until it is answered OK; publishes
/// how many are acknowledged, and returns their ids.
async fn submit_through_kills(
    channel: Channel,
    n: usize,
    acked: tokio::sync::watch::Sender<usize>,
) -> Vec<String> {
    let mut c = tasks(&channel);
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let mut req = tonic::Request::new(submit(
            "koo.diagnostics.ledger",
            serde_json::json!({ "ms": 2 }),
        ));
        req.set_timeout(std::time::Duration::from_secs(2));
        match c.submit_task(req).await {
            Ok(r) => {
                ids.push(r.into_inner().task.unwrap().id);
                acked.send_replace(ids.len());
            }
            // koo is down or restarting (a connection cut mid-call is
            // CANCELLED): the same call again (a duplicate task is
            // allowed, a lost one is not)
            Err(s) => assert!(
                matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ),
                "{s:?}"
            ),
        }
    }
    ids
}

/// `kill -9` of koo again and again while a client submits and the
/// built-in workers run (saves every 300 ms, so kills land between, during
/// and after saves): every task a submit was answered OK for is there
/// after the last restart and runs to SUCCEEDED, as the handler's ledger
/// outside koo shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill_9_loses_no_acknowledged_task() {
    const TASKS: usize = 300;
    const KILLS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ledger = dir.path().join("ledger.jsonl");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let ledger_path = ledger.to_str().unwrap().to_owned();
    let env = [
        ("KOO_LISTEN", listen.as_str()),
        ("KOO_DIAGNOSTICS_LEDGER", ledger_path.as_str()),
        ("KOO_DATA_SNAPSHOT_INTERVAL", "300ms"),
        ("KOO_TASK_LEASE", "1s"),
    ];
    let mut koo = Koo::start_with(Some(&data), 2, &env);
    let channel = Channel::from_shared(format!("http://{listen}"))
        .unwrap()
        .connect_lazy();
    let (acked, mut progress) = tokio::sync::watch::channel(0);
    let submitter = tokio::spawn(submit_through_kills(channel.clone(), TASKS, acked));
    for k in 1..=KILLS {
        let target = k * TASKS / (KILLS + 1);
        tokio::time::timeout(common::EVENT_TIMEOUT, progress.wait_for(|n| *n >= target))
            .await
            .expect("submits go on")
            .unwrap();
        koo.child.kill().unwrap();
        koo.child.wait().unwrap();
        koo = Koo::start_with(Some(&data), 2, &env);
    }
    let ids = tokio::time::timeout(common::EVENT_TIMEOUT * 2, submitter)
        .await
        .expect("every submit answered")
        .unwrap();
    let mut c = tasks(&koo.channel().await);
    for id in &ids {
        let t = wait_task(&mut c, id, is_final).await;
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
    }
    let ran = common::chaos::read_ledger(&[ledger]);
    let missing: Vec<&String> = ids.iter().filter(|id| !ran.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but never run: {missing:?}"
    );
    let (status, _) = koo.terminate().await;
    assert!(status.success());
}
