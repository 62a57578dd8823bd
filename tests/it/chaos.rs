//! The chaos suite (issue 11): tasks flow through two `koo serve` processes
//! (both running the scheduler), a `koo worker` process, a `koo scheduler`
//! process (three schedulers, any of which may be killed, one at a time, so
//! that a scheduler is alive at every moment) and the Python
//! example worker on one Redis (AOF `always`), while faults are injected at
//! random from a seeded RNG: `kill -9` of any of them (then a restart),
//! SIGSTOP past the lease then SIGCONT (a zombie, whose late reports koo
//! must refuse), Redis killed and restarted from its AOF, `CLIENT PAUSE`
//! and `DEBUG SLEEP` loops, while clients submit with idempotency keys,
//! some impatient (1-3 ms deadlines), some slow.
//!
//! A ledger outside koo records every submit that returned OK and every
//! execution a handler saw (the handlers append to files named at
//! start-up). Once the faults stop and the run quiesces, every acknowledged
//! task is classified: done once, done again after a fault that explains it
//! (allowed), lost or stuck (never allowed); every second of an
//! every-second schedule must have fired exactly once. One summary line
//! says it all.
//!
//! `KOO_CHAOS_SECONDS` (default 60) sets how long faults are injected,
//! `KOO_CHAOS_SEED` replays a run; `scripts/chaos --minutes N [--seed S]`
//! runs a soak in release.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestRedis;
use common::chaos::*;
use common::python::PyWorker;
use common::tasks::koo_json;
use futures::StreamExt;
use koo::pb::schedule::v1::{self as spb, schedule_service_client::ScheduleServiceClient};
use koo::pb::tasks::v1::{self as pb, task_service_client::TaskServiceClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

/// The lease: short, so that every fault resolves in seconds.
const LEASE: Duration = Duration::from_secs(2);
/// How long a stopped (zombie) process stays stopped: past its lease and a
/// sweep, so that its tasks are taken back and run elsewhere.
const ZOMBIE: Duration = Duration::from_millis(3500);
/// How long the run may take to quiesce once the faults stop.
const QUIESCE_LIMIT: Duration = Duration::from_secs(120);
/// Concurrent submitting clients.
const SUBMITTERS: usize = 4;
const BUILTIN_TASK: &str = "koo.diagnostics.ledger";
const PYTHON_TASK: &str = "koo.examples.ledger";
const TICK_TASK: &str = "chaos.tick";
const TICK_QUEUE: &str = "chaos_ticks";
/// The processes a kill or stop hits (one at a time).
const TARGETS: [&str; 5] = ["serve-a", "serve-b", "worker", "scheduler", "python"];
const TICK_SCHEDULE: &str = "chaos-every-second";

/// Every process of the run, and where they write.
struct Cluster {
    redis: TestRedis,
    a: KooProc,
    b: KooProc,
    worker: KooProc,
    /// A `koo scheduler` process (serve-a and serve-b run schedulers too;
    /// faults never overlap, so two are alive whenever one is down).
    scheduler: KooProc,
    python: PyWorker,
    /// Events of Python workers already replaced.
    python_events: Vec<serde_json::Value>,
    dir: PathBuf,
}

impl Cluster {
    async fn start(dir: &std::path::Path) -> Self {
        let aof = dir.join("redis");
        std::fs::create_dir_all(&aof).unwrap();
        let redis = TestRedis::start_with(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            aof.to_str().unwrap(),
            "--enable-debug-command",
            "local",
        ])
        .await;
        let env = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
            let ledger = dir.join("ledger-koo.jsonl");
            let mut env: Vec<(String, String)> = [
                ("REDIS_URL", redis.url()),
                (
                    "KOO_DIAGNOSTICS_LEDGER",
                    ledger.to_str().unwrap().to_owned(),
                ),
                ("KOO_TASK_LEASE", format!("{}ms", LEASE.as_millis())),
                ("KOO_TASK_SWEEP_INTERVAL", "200ms".into()),
                ("KOO_TASK_RETRY_BACKOFF", "100ms".into()),
                ("KOO_WORKER_POLL_INTERVAL", "50ms".into()),
                ("KOO_TASK_QUEUES", TICK_QUEUE.into()),
                ("KOO_BREAKER_COOLDOWN", "200ms".into()),
                ("KOO_REDIS_CONNECT_TIMEOUT", "500ms".into()),
                ("REDIS_HEALTH_CHECK_INTERVAL", "1".into()),
                ("KOO_SCHEDULE_RELOAD_INTERVAL", "200ms".into()),
                ("KOO_SCHEDULE_CACHE_CLEANUP", "off".into()),
                ("KOO_SCHEDULE_CACHE_WARM", "off".into()),
                ("KOO_SCHEDULE_DATABASE_MAINTENANCE", "off".into()),
                ("KOO_SCHEDULE_HEALTH_CHECK", "off".into()),
                ("KOO_SHUTDOWN_DRAIN", "0ms".into()),
                ("KOO_LOG", "warn".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            env
        };
        let serve_env = env(&[("KOO_WORKER_CONCURRENCY", "2")]);
        let mut a = KooProc::new("serve-a", &["serve"], Some(free()), serve_env.clone(), dir);
        let mut b = KooProc::new("serve-b", &["serve"], Some(free()), serve_env, dir);
        let mut worker = KooProc::new(
            "worker",
            &["worker"],
            None,
            env(&[("KOO_WORKER_CONCURRENCY", "2")]),
            dir,
        );
        let mut scheduler = KooProc::new("scheduler", &["scheduler"], None, env(&[]), dir);
        a.start().await;
        b.start().await;
        worker.start().await;
        scheduler.start().await;
        let python = start_python(dir, a.port.unwrap());
        Cluster {
            redis,
            a,
            b,
            worker,
            scheduler,
            python,
            python_events: Vec::new(),
            dir: dir.to_owned(),
        }
    }

    fn ledgers(&self) -> Vec<PathBuf> {
        vec![
            self.dir.join("ledger-koo.jsonl"),
            self.dir.join("ledger-python.jsonl"),
        ]
    }

    fn python_pid(&self) -> u32 {
        self.python.child.id()
    }

    /// The koo process named `target`.
    fn koo(&mut self, target: &str) -> &mut KooProc {
        match target {
            "serve-a" => &mut self.a,
            "serve-b" => &mut self.b,
            "scheduler" => &mut self.scheduler,
            _ => &mut self.worker,
        }
    }

    /// The process ids whose executions a fault on `target` can interrupt:
    /// the Python worker's stream is held by serve-a.
    fn pids(&self, target: &str) -> Vec<u32> {
        match target {
            "python" => vec![self.python_pid()],
            "serve-a" => vec![self.a.pid(), self.python_pid()],
            "serve-b" => vec![self.b.pid()],
            "scheduler" => vec![self.scheduler.pid()],
            _ => vec![self.worker.pid()],
        }
    }

    /// Injects one fault of `kind` and waits until it is over (processes
    /// restarted and serving, Redis back, pause ended), so that faults never
    /// overlap and a scheduler is alive at every moment.
    async fn inject(&mut self, kind: FaultKind, rng: &mut StdRng) -> Fault {
        let start_ms = now_ms();
        let (target, pids) = match kind {
            FaultKind::Kill9 => {
                let target = TARGETS[rng.random_range(0..TARGETS.len())];
                let pids = self.pids(target);
                self.kill_and_restart(target).await;
                (target.to_owned(), pids)
            }
            FaultKind::Stop => {
                let target = TARGETS[rng.random_range(0..TARGETS.len())];
                let pids = self.pids(target);
                self.signal(target, "STOP");
                tokio::time::sleep(ZOMBIE).await;
                self.signal(target, "CONT");
                (target.to_owned(), pids)
            }
            FaultKind::RedisRestart => {
                self.redis.restart().await;
                ("redis".to_owned(), Vec::new())
            }
            FaultKind::Pause => {
                let ms: u64 = rng.random_range(300..2500);
                let mut conn = self.redis.conn().await;
                let _: () = redis::cmd("CLIENT")
                    .arg("PAUSE")
                    .arg(ms)
                    .arg("ALL")
                    .query_async(&mut conn)
                    .await
                    .expect("CLIENT PAUSE");
                tokio::time::sleep(Duration::from_millis(ms)).await;
                (format!("redis {ms}ms"), Vec::new())
            }
            FaultKind::Slow => {
                let until = tokio::time::Instant::now()
                    + Duration::from_millis(rng.random_range(500..2000));
                let mut conn = self.redis.conn().await;
                while tokio::time::Instant::now() < until {
                    let secs = rng.random_range(0.05..0.3);
                    let _: () = redis::cmd("DEBUG")
                        .arg("SLEEP")
                        .arg(secs)
                        .query_async(&mut conn)
                        .await
                        .expect("DEBUG SLEEP");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ("redis".to_owned(), Vec::new())
            }
        };
        Fault {
            kind,
            target,
            pids,
            start_ms,
            end_ms: now_ms(),
        }
    }

    async fn kill_and_restart(&mut self, target: &str) {
        if target == "python" {
            self.python.kill9();
            self.python_events
                .extend(self.python.drain().iter().cloned());
            self.python = start_python(&self.dir, self.a.port.unwrap());
        } else {
            let p = self.koo(target);
            p.kill9();
            p.start().await;
        }
    }

    fn signal(&mut self, target: &str, sig: &str) {
        if target == "python" {
            common::tasks::signal(&self.python.child, sig);
        } else {
            self.koo(target).signal(sig);
        }
    }

    /// Reports refused after a lease lapsed: the Python worker's `aborted`
    /// and `revoked` events, and the built-in workers' refused completions
    /// and abandoned handlers (from their logs).
    fn zombie_refusals(&mut self) -> usize {
        self.python_events
            .extend(self.python.drain().iter().cloned());
        let python = self
            .python_events
            .iter()
            .filter(|e| e["event"] == "aborted" || e["event"] == "revoked")
            .count();
        let logs: usize = ["serve-a", "serve-b", "worker"]
            .iter()
            .map(|n| std::fs::read_to_string(self.dir.join(format!("{n}.log"))).unwrap_or_default())
            .map(|log| {
                log.lines()
                    .filter(|l| {
                        l.contains("completion refused")
                            || l.contains("lease lost; handler abandoned")
                    })
                    .count()
            })
            .sum();
        python + logs
    }
}

fn free() -> u16 {
    common::free_port()
}

fn start_python(dir: &std::path::Path, port: u16) -> PyWorker {
    let ledger = dir.join("ledger-python.jsonl");
    PyWorker::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &[
            "--serve",
            "ledger",
            "--queues",
            "pdf_processing",
            "--concurrency",
            "2",
            "--log-level",
            "ERROR",
        ],
        &[("KOO_LEDGER_FILE", ledger.to_str().unwrap())],
    )
}

/// What the submitting clients saw.
#[derive(Default)]
struct Submits {
    acked: Vec<Acked>,
    deduplicated: usize,
    impatient: usize,
    /// Submit calls that failed and were retried.
    retries: usize,
    /// Submits never acknowledged within a minute of retries (not in the
    /// ledger, so neither lost nor stuck), with the last status.
    unacked: Vec<String>,
}

/// One client: submits ledger tasks with idempotency keys to either koo
/// serve until told to stop, retrying each ambiguous submit with its key.
async fn submitter(
    n: usize,
    seed: u64,
    channels: Vec<Channel>,
    stop: CancellationToken,
    out: Arc<Mutex<Submits>>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut i = 0;
    while !stop.is_cancelled() {
        let key = format!("chaos:{seed}:{n}:{i}");
        i += 1;
        let python = rng.random_bool(0.3);
        let req = pb::SubmitTaskRequest {
            name: if python { PYTHON_TASK } else { BUILTIN_TASK }.into(),
            category: if python {
                pb::TaskCategory::PdfProcessing
            } else {
                pb::TaskCategory::Research
            } as i32,
            kwargs: struct_of(serde_json::json!({ "ms": rng.random_range(0..400) })),
            // enough that faults never exhaust a task's attempts
            max_retries: Some(100),
            idempotency_key: key.clone(),
            ..Default::default()
        };
        let impatient = rng.random_bool(0.1);
        let slow = rng.random_bool(0.1);
        let mut retries = 0;
        let result = submit_until_ok(&channels, &mut rng, req, impatient, slow, &mut retries).await;
        {
            let mut out = out.lock().unwrap();
            out.retries += retries;
            out.impatient += usize::from(impatient);
            match result {
                Ok(resp) => {
                    out.deduplicated += usize::from(resp.deduplicated);
                    out.acked.push(Acked {
                        key,
                        task_id: resp.task.unwrap().id,
                    });
                }
                Err(status) => out.unacked.push(format!("{key}: {status:?}")),
            }
        }
        // pacing, not synchronisation: a steady flow of a few tasks a second
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..120))).await;
    }
}

fn struct_of(v: serde_json::Value) -> Option<prost_types::Struct> {
    match koo_json(v).kind {
        Some(prost_types::value::Kind::StructValue(s)) => Some(s),
        _ => None,
    }
}

/// Submits `req` until a koo answers OK: the first try of an impatient
/// client has a 1-3 ms deadline, a slow client allows 10 s, others 2 s;
/// retries go to either process with backoff, for up to a minute.
async fn submit_until_ok(
    channels: &[Channel],
    rng: &mut StdRng,
    req: pb::SubmitTaskRequest,
    impatient: bool,
    slow: bool,
    retries: &mut usize,
) -> Result<pb::SubmitTaskResponse, tonic::Status> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        let timeout = match (first && impatient, slow) {
            (true, _) => Duration::from_millis(rng.random_range(1..=3)),
            (false, true) => Duration::from_secs(10),
            (false, false) => Duration::from_secs(2),
        };
        first = false;
        let channel = channels[rng.random_range(0..channels.len())].clone();
        let mut request = tonic::Request::new(req.clone());
        request.set_timeout(timeout);
        // a stopped process never answers: the client gives up on its own
        let mut client = TaskServiceClient::new(channel);
        let call = client.submit_task(request);
        let status = match tokio::time::timeout(timeout + Duration::from_secs(1), call).await {
            Ok(Ok(resp)) => return Ok(resp.into_inner()),
            Ok(Err(s)) => s,
            Err(_) => tonic::Status::deadline_exceeded("the client gave up"),
        };
        let retryable = matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        );
        if !retryable || tokio::time::Instant::now() >= give_up {
            return Err(status);
        }
        *retries += 1;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Reads every acknowledged task until each is in a final state (or gone),
/// at most [`QUIESCE_LIMIT`]: a bounded poll, as quiescence is the absence
/// of events.
async fn quiesce(channel: Channel, acked: &[Acked]) -> HashMap<String, Seen> {
    let until = tokio::time::Instant::now() + QUIESCE_LIMIT;
    let mut seen = HashMap::new();
    let mut pending: Vec<String> = acked.iter().map(|a| a.task_id.clone()).collect();
    loop {
        let reads: Vec<(String, Option<Seen>)> = futures::stream::iter(pending)
            .map(|id| {
                let mut c = TaskServiceClient::new(channel.clone());
                async move {
                    let mut req = tonic::Request::new(pb::GetTaskRequest {
                        task_id: id.clone(),
                    });
                    req.set_timeout(Duration::from_secs(2));
                    let seen = match c.get_task(req).await {
                        Ok(r) => Some(Seen::Task(Box::new(r.into_inner().task.unwrap()))),
                        Err(s) if s.code() == Code::NotFound => Some(Seen::NotFound),
                        Err(_) => None,
                    };
                    (id, seen)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        pending = Vec::new();
        for (id, s) in reads {
            let done = match &s {
                Some(Seen::Task(t)) => t.state >= pb::TaskState::Succeeded as i32,
                Some(Seen::NotFound) => true,
                None => false,
            };
            if let Some(s) = s {
                seen.insert(id.clone(), s);
            }
            if !done {
                pending.push(id);
            }
        }
        if pending.is_empty() || tokio::time::Instant::now() >= until {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The schedule's stored tasks: tick (ms) → how many.
async fn ticks(channel: Channel) -> BTreeMap<i64, usize> {
    let mut c = TaskServiceClient::new(channel);
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_active_tasks(pb::ListActiveTasksRequest {
                name: TICK_TASK.into(),
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list the ticks' tasks")
            .into_inner();
        for t in page.tasks {
            let at = t.schedule_time.expect("a scheduled task has its tick");
            *out.entry(at.seconds * 1000 + i64::from(at.nanos) / 1_000_000)
                .or_insert(0) += 1;
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// Checks the ticks in `[from, to]`, waiting for late ones a little: a tick
/// claimed by a process killed before it stored the task is taken over by
/// another scheduler after the claim's 15 s.
async fn settle_ticks(channel: Channel, from: i64, to: i64) -> (usize, Vec<i64>, Vec<i64>) {
    let until = tokio::time::Instant::now() + Duration::from_secs(25);
    loop {
        let t = ticks(channel.clone()).await;
        let (missing, doubled) = check_ticks(&t, from, to);
        if missing.is_empty() || tokio::time::Instant::now() >= until {
            let in_window = t.range(from..=to).count();
            return (in_window, missing, doubled);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn create_tick_schedule(channel: Channel) {
    ScheduleServiceClient::new(channel)
        .create_schedule(spb::CreateScheduleRequest {
            schedule: Some(spb::Schedule {
                name: TICK_SCHEDULE.into(),
                cron: "* * * * * *".into(),
                task: Some(spb::TaskTemplate {
                    name: TICK_TASK.into(),
                    category: pb::TaskCategory::Research as i32,
                    queue: TICK_QUEUE.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            paused: false,
        })
        .await
        .expect("create the every-second schedule");
}

/// The run's settings from the environment.
struct Plan {
    seed: u64,
    seconds: u64,
}

impl Plan {
    fn from_env() -> Self {
        let seed = std::env::var("KOO_CHAOS_SEED")
            .ok()
            .map(|s| s.parse().expect("KOO_CHAOS_SEED is a number"))
            .unwrap_or_else(|| rand::rng().random());
        let seconds = std::env::var("KOO_CHAOS_SECONDS")
            .ok()
            .map(|s| s.parse().expect("KOO_CHAOS_SECONDS is a number of seconds"))
            .unwrap_or(60);
        Self { seed, seconds }
    }
}

/// Injects faults for `seconds`: every kind once first (in a seeded
/// order), then at random, one at a time with a random pause between.
async fn inject_faults(cluster: &mut Cluster, rng: &mut StdRng, seconds: u64, log: &mut FaultLog) {
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut first: Vec<FaultKind> = FaultKind::ALL.to_vec();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.random_range(0..=i));
    }
    let weights = [
        (FaultKind::Kill9, 35),
        (FaultKind::Stop, 20),
        (FaultKind::RedisRestart, 10),
        (FaultKind::Pause, 15),
        (FaultKind::Slow, 20),
    ];
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        let kind = first.pop().unwrap_or_else(|| {
            let mut roll = rng.random_range(0..100);
            weights
                .iter()
                .find_map(|(k, w)| {
                    if roll < *w {
                        Some(*k)
                    } else {
                        roll -= w;
                        None
                    }
                })
                .expect("the weights sum to 100")
        });
        let fault = cluster.inject(kind, rng).await;
        log.record(fault);
    }
}

/// Chaos: through random process kills, zombies, Redis restarts, pauses and
/// slowness, every acknowledged task succeeds (a second run only after a
/// fault that explains it, the latest lease's result standing), none is
/// lost or stuck, and every tick of an every-second schedule fires once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_acknowledged_task_succeeds_and_every_tick_fires_once() {
    let plan = Plan::from_env();
    eprintln!(
        "chaos: seed={} seconds={} (replay with KOO_CHAOS_SEED={})",
        plan.seed, plan.seconds, plan.seed
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("chaos")
        .join(format!("{}-{}", plan.seed, now_ms()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cluster = Cluster::start(&dir).await;
    let channels = vec![
        lazy_channel(cluster.a.port.unwrap()),
        lazy_channel(cluster.b.port.unwrap()),
    ];
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let t0 = now_ms();
    let mut log = FaultLog::new(t0);
    create_tick_schedule(channels[1].clone()).await;

    let stop = CancellationToken::new();
    let submits = Arc::new(Mutex::new(Submits::default()));
    let clients: Vec<_> = (0..SUBMITTERS)
        .map(|n| {
            tokio::spawn(submitter(
                n,
                plan.seed,
                channels.clone(),
                stop.clone(),
                submits.clone(),
            ))
        })
        .collect();
    inject_faults(&mut cluster, &mut rng, plan.seconds, &mut log).await;
    stop.cancel();
    for c in clients {
        c.await.expect("a submitter panicked");
    }
    let quiesce_from = tokio::time::Instant::now();
    let submits = std::mem::take(&mut *submits.lock().unwrap());
    let seen = quiesce(channels[0].clone(), &submits.acked).await;
    let quiesced = quiesce_from.elapsed();
    let ticks_to = now_ms() - 1000;
    let (ticks, tick_missing, tick_dupes) =
        settle_ticks(channels[1].clone(), t0 + 3000, ticks_to).await;

    let ledger = read_ledger(&cluster.ledgers());
    let verdict = classify(&submits.acked, &seen, &ledger, &log, LEASE + ZOMBIE);
    let duplicates = verdict.dup_explained + verdict.dup_unexplained.len();
    let summary = format!(
        "chaos: seed={} seconds={} tasks={} faults={} (kill9={} stop={} redis_restart={} pause={} slow={}) \
         lost={} stuck={} failed={} duplicates={} (explained {}) wrong_result={} zombie_refused={} \
         ticks={} tick_dupes={} tick_missing={} impatient={} retried={} deduplicated={} unacked={} quiesce={:.1}s",
        plan.seed,
        plan.seconds,
        verdict.tasks,
        log.faults.len(),
        log.count(FaultKind::Kill9),
        log.count(FaultKind::Stop),
        log.count(FaultKind::RedisRestart),
        log.count(FaultKind::Pause),
        log.count(FaultKind::Slow),
        verdict.lost.len(),
        verdict.stuck.len(),
        verdict.failed.len(),
        duplicates,
        verdict.dup_explained,
        verdict.wrong_result.len(),
        cluster.zombie_refusals(),
        ticks,
        tick_dupes.len(),
        tick_missing.len(),
        submits.impatient,
        submits.retries,
        submits.deduplicated,
        submits.unacked.len(),
        quiesced.as_secs_f64(),
    );
    println!("{summary}");
    std::fs::write(dir.join("summary.txt"), format!("{summary}\n")).unwrap();
    eprintln!("chaos: logs, ledgers and Redis's AOF in {}", dir.display());
    for u in submits.unacked.iter().take(10) {
        eprintln!("chaos: never acknowledged: {u}");
    }
    assert!(
        verdict.ok() && tick_dupes.is_empty() && tick_missing.is_empty(),
        "{summary}\nlost: {:?}\nstuck: {:?}\nfailed: {:?}\nunexplained duplicates: {:?}\nwrong results: {:?}\n\
         ticks twice: {tick_dupes:?}\nticks missing: {tick_missing:?}",
        verdict.lost,
        verdict.stuck,
        verdict.failed,
        verdict.dup_unexplained,
        verdict.wrong_result,
    );
    assert!(
        verdict.tasks > 0 && ticks > 0,
        "{summary}: nothing was exercised"
    );
}

/// The checker itself: a task koo forgot is lost, one still queued is
/// stuck, a second run with no fault on its process is an unexplained
/// duplicate, one after a kill of that process is allowed, and a result
/// from an earlier lease than the latest execution is a fencing failure.
#[test]
fn checker_flags_lost_stuck_duplicates_and_stale_results() {
    let exec = |id: &str, token: i64, pid: u32, ms: i64| Exec {
        task_id: id.into(),
        attempt: token,
        token,
        pid,
        ms,
    };
    let done = |id: &str, token: i64| {
        Seen::Task(Box::new(pb::Task {
            id: id.into(),
            state: pb::TaskState::Succeeded as i32,
            result: Some(koo_json(serde_json::json!({ "token": token }))),
            ..Default::default()
        }))
    };
    let ids = [
        "once",
        "lost",
        "stuck",
        "dup-killed",
        "dup-unexplained",
        "stale",
    ];
    let acked: Vec<Acked> = ids
        .iter()
        .map(|id| Acked {
            key: format!("k-{id}"),
            task_id: (*id).into(),
        })
        .collect();
    let mut seen = HashMap::from([
        ("once".to_owned(), done("once", 1)),
        ("lost".to_owned(), Seen::NotFound),
        ("dup-killed".to_owned(), done("dup-killed", 2)),
        ("dup-unexplained".to_owned(), done("dup-unexplained", 2)),
        ("stale".to_owned(), done("stale", 1)),
    ]);
    seen.insert(
        "stuck".into(),
        Seen::Task(Box::new(pb::Task {
            state: pb::TaskState::Queued as i32,
            ..Default::default()
        })),
    );
    let ledger = HashMap::from([
        ("once".to_owned(), vec![exec("once", 1, 10, 1_000)]),
        (
            "dup-killed".to_owned(),
            vec![
                exec("dup-killed", 1, 10, 1_000),
                exec("dup-killed", 2, 11, 4_000),
            ],
        ),
        (
            "dup-unexplained".to_owned(),
            vec![
                exec("dup-unexplained", 1, 12, 50_000),
                exec("dup-unexplained", 2, 11, 51_000),
            ],
        ),
        (
            "stale".to_owned(),
            vec![exec("stale", 1, 10, 1_000), exec("stale", 2, 11, 4_000)],
        ),
    ]);
    let mut faults = FaultLog::new(0);
    faults.record(Fault {
        kind: FaultKind::Kill9,
        target: "worker".into(),
        pids: vec![10],
        start_ms: 2_000,
        end_ms: 2_100,
    });
    let v = classify(&acked, &seen, &ledger, &faults, Duration::from_secs(1));
    assert_eq!(v.done_once, 1);
    assert_eq!(v.dup_explained, 1);
    assert_eq!(v.lost, vec!["lost".to_owned()]);
    assert_eq!(v.stuck.len(), 1, "{:?}", v.stuck);
    assert_eq!(v.dup_unexplained.len(), 1, "{:?}", v.dup_unexplained);
    assert!(v.dup_unexplained[0].starts_with("dup-unexplained"));
    assert_eq!(v.wrong_result.len(), 1, "{:?}", v.wrong_result);
    assert!(v.wrong_result[0].starts_with("stale"));
    assert!(!v.ok());
}
