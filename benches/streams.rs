//! Streams benchmark (issue 12): what open `WatchTask`, `WatchTasks`,
//! `WatchMetrics` and `WatchTaskMetrics` streams cost the real `koo serve`
//! and its built-in workers (the default 4 slots) on our own Redis.
//!
//! Every drain is the one of `benches/tasks.rs`: `BENCH_TASKS` (default
//! 20,000) `koo.diagnostics.noop` tasks submitted with `SubmitTasks`
//! (batches of 100, 4 in flight), timed until the client has seen every
//! task's SUCCEEDED event on one `WatchTasks` stream (category RESEARCH, the
//! no-op's name) opened before the first submit. That one observer is part
//! of every drain, the baseline included. Each repetition (`BENCH_REPS`,
//! default 3; medians and min..max at the end, the machine is noisy) runs:
//!
//! 1. **baseline**: a drain with no other stream; koo's RSS at rest (VmRSS,
//!    after the drain) and its CPU (utime+stime, /proc/PID/stat) per task.
//! 2. **streams**: `BENCH_WATCH_TASK` (8,000) `WatchTask` on no-ops parked
//!    for a day by a countdown in the drained queue (submitted once, before
//!    the first baseline, so every drain sees the same store),
//!    `BENCH_WATCH_TASKS` (1,900) `WatchTasks`, half filtered by a name no
//!    task has and half by category DATABASE, which the drain does not use,
//!    `BENCH_WATCH_METRICS` (50) `WatchMetrics` and
//!    `BENCH_WATCH_TASK_METRICS` (50) `WatchTaskMetrics` (1 s), over
//!    `BENCH_STREAM_CONNECTIONS` (4) HTTP/2 connections; every one open
//!    (first message read, or the reply's headers for `WatchTasks`) before
//!    the drain. The delivery latency, `now - event_time` (Redis's clock,
//!    same machine), is the drain's own observer's, in the baseline too: no
//!    watcher that receives events is added to the 10,000.
//! 3. **memory return**: every stream and connection closed, koo's RSS
//!    sampled each second for `BENCH_SETTLE_SECONDS` (60).
//! 4. **followers**: a drain followed by `BENCH_FOLLOWERS` (10) unfiltered
//!    `WatchTasks`; koo's CPU beyond the baseline's per task, per event the
//!    followers received.
//! 5. **stalled**: one unfiltered `WatchTasks` on a connection with 1 KiB
//!    HTTP/2 windows that is never read, beside `BENCH_OBSERVERS` normal
//!    ones, during a drain; then, `BENCH_STALL_WAIT_SECONDS` (5) later, the
//!    stalled one read to its end or to 10 s of silence (koo should end it
//!    RESOURCE_EXHAUSTED with a resume token in a `google.rpc.ErrorInfo`),
//!    and `GetTaskMetrics`' stream figures.
//!
//! The client shares the machine's 2 cores with koo, so it stays lean: one
//! tokio runtime, every idle stream in one task polled through one
//! `SelectAll` (woken streams only), no thread or task per stream, one
//! counter per stream and no per-message allocation beyond decoding.
//!
//! koo gets `KOO_MAX_CONCURRENT_STREAMS=4096` (harmless to a koo that does
//! not know it; one without it allows hyper's ~200 streams per connection:
//! then set `BENCH_STREAM_CONNECTIONS=64`). One JSON line per measurement
//! and per summary figure (with its goal and whether it was met) goes to
//! stdout and `target/bench-results/streams.jsonl`; progress and the summary
//! table to stderr.

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use futures::stream::StreamExt;
use koo::pb::tasks::v1::task_service_client::TaskServiceClient;
use koo::pb::tasks::v1::{
    GetTaskMetricsRequest, SubmitTaskRequest, SubmitTasksRequest, TaskCategory, TaskState,
    WatchTasksRequest,
};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

#[path = "streams/idle.rs"]
mod idle;
mod support;
use idle::{Counts, IdleStreams};
use support::{
    Figures, Goal, cpu_seconds, env_usize, percentile, read_memory, reset_peak, start_koo,
    start_redis,
};

const NOOP: &str = "koo.diagnostics.noop";
/// The drained queue (the no-op's category, RESEARCH).
const QUEUE: &str = "research";
const BATCH: usize = 100;
const IN_FLIGHT: usize = 4;
/// An observer that sees nothing for this long gives up.
const IDLE: Duration = Duration::from_secs(30);
const MIB: f64 = 1048576.0;

/// The knobs (`BENCH_*`).
struct Knobs {
    tasks: usize,
    reps: usize,
    connections: usize,
    watch_task: usize,
    watch_tasks: usize,
    metrics: usize,
    task_metrics: usize,
    observers: usize,
    followers: usize,
    settle: usize,
    label: String,
}

impl Knobs {
    fn read() -> Result<Self> {
        Ok(Self {
            tasks: env_usize("BENCH_TASKS", 20_000)?.max(1),
            reps: env_usize("BENCH_REPS", 3)?.max(1),
            connections: env_usize("BENCH_STREAM_CONNECTIONS", 4)?.max(1),
            watch_task: env_usize("BENCH_WATCH_TASK", 8_000)?,
            watch_tasks: env_usize("BENCH_WATCH_TASKS", 1_900)?,
            metrics: env_usize("BENCH_WATCH_METRICS", 50)?,
            task_metrics: env_usize("BENCH_WATCH_TASK_METRICS", 50)?,
            observers: env_usize("BENCH_OBSERVERS", 5)?.max(1),
            followers: env_usize("BENCH_FOLLOWERS", 10)?.max(1),
            settle: env_usize("BENCH_SETTLE_SECONDS", 60)?,
            label: std::env::var("BENCH_LABEL").unwrap_or_default(),
        })
    }

    fn counts(&self) -> Counts {
        Counts {
            watch_task: self.watch_task,
            watch_tasks: self.watch_tasks,
            metrics: self.metrics,
            task_metrics: self.task_metrics,
        }
    }

    fn streams(&self) -> usize {
        self.counts().total()
    }
}

/// The koo under test and what the bench needs to reach and read it.
struct Bench {
    knobs: Knobs,
    koo: support::KooServer,
    pid: u32,
    /// The drain's connection (and the observers').
    channel: Channel,
    client: TaskServiceClient<Channel>,
    parked: Vec<String>,
    out: std::fs::File,
    figures: Figures,
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let knobs = Knobs::read()?;
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let results = tmp.parent().unwrap_or(tmp).join("bench-results");
    std::fs::create_dir_all(&results)?;
    let out = std::fs::File::create(results.join("streams.jsonl"))?;
    let server = std::env::var("KOO_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    // A queue must never lose keys to eviction; many watchers may each hold
    // a connection on a koo without shared readers.
    let redis = start_redis(
        &server,
        &tmp.join("tmp"),
        &["--maxmemory-policy", "noeviction", "--maxclients", "20000"],
    )
    .await?;
    let koo = start_koo(
        &support::koo_bin(),
        &[],
        &[
            ("REDIS_URL", redis.url.as_str()),
            ("KOO_MAX_CONCURRENT_STREAMS", "4096"),
        ],
    )?;
    let pid = koo.guard.pid();
    let channel = connect(&koo.addr.to_string()).await?;
    let client = TaskServiceClient::new(channel.clone());
    eprintln!(
        "koo {} (pid {pid}) on {} (Redis {}), built-in workers: the default 4 slots; \
         {} tasks per drain, {} streams over {} connections, {} reps",
        koo.addr,
        redis.url,
        redis.version,
        knobs.tasks,
        knobs.streams(),
        knobs.connections,
        knobs.reps
    );
    drain(&client, 500, pid).await.context("warm-up")?;
    let parked = park(&client, knobs.watch_task).await?;
    let mut bench = Bench {
        knobs,
        koo,
        pid,
        channel,
        client,
        parked,
        out,
        figures: Figures::default(),
    };
    let mut pristine_rss = None;
    for rep in 1..=bench.knobs.reps {
        let base = bench.baseline(rep).await?;
        let pristine = *pristine_rss.get_or_insert(base.rss);
        bench.with_streams(rep, &base).await?;
        bench.memory_return(rep, pristine).await?;
        bench.followers(rep, &base).await?;
        bench.stalled(rep, &base).await?;
    }
    bench.figures.report(&mut bench.out, &bench.knobs.label);
    Ok(())
}

/// One HTTP/2 connection to koo.
async fn connect(addr: &str) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to koo at {addr}"))
}

fn noop(countdown: Option<Duration>) -> SubmitTaskRequest {
    SubmitTaskRequest {
        name: NOOP.into(),
        category: TaskCategory::Research as i32,
        countdown: countdown.map(|d| prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// Submits `n` no-ops (batches of 100, 4 in flight); their ids.
async fn submit(
    client: &TaskServiceClient<Channel>,
    n: usize,
    countdown: Option<Duration>,
) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    let mut pending = futures::stream::iter((0..n.div_ceil(BATCH)).map(|b| {
        let mut client = client.clone();
        let size = BATCH.min(n - b * BATCH);
        async move {
            client
                .submit_tasks(SubmitTasksRequest {
                    tasks: (0..size).map(|_| noop(countdown)).collect(),
                })
                .await
        }
    }))
    .buffer_unordered(IN_FLIGHT);
    while let Some(reply) = pending.next().await {
        ids.extend(reply?.into_inner().tasks.into_iter().map(|t| t.id));
    }
    Ok(ids)
}

/// No-ops that wait a day in the drained queue, for `WatchTask`.
async fn park(client: &TaskServiceClient<Channel>, n: usize) -> Result<Vec<String>> {
    let ids = submit(client, n, Some(Duration::from_secs(86_400))).await?;
    eprintln!("parked {n} no-ops (SCHEDULED a day ahead) in queue {QUEUE}");
    Ok(ids)
}

/// What one drain measured.
struct Drained {
    seconds: f64,
    tasks_per_s: f64,
    /// koo's CPU time over the drain.
    cpu: f64,
    /// `now - event_time` of every event the drain's observer got, ms,
    /// sorted.
    latencies: Vec<f64>,
}

/// Submits `n` no-ops and waits for every one's SUCCEEDED event.
async fn drain(client: &TaskServiceClient<Channel>, n: usize, pid: u32) -> Result<Drained> {
    let mut watch = client
        .clone()
        .watch_tasks(WatchTasksRequest {
            categories: vec![TaskCategory::Research as i32],
            name: NOOP.into(),
            resume_token: String::new(),
        })
        .await?
        .into_inner();
    let cpu0 = cpu_seconds(pid).context("cannot read koo's CPU time")?;
    let started = Instant::now();
    let submitting = {
        let client = client.clone();
        tokio::spawn(async move { submit(&client, n, None).await })
    };
    // completions may be seen before the submit that made them returns
    let mut done = std::collections::HashSet::with_capacity(n);
    let mut latencies = Vec::with_capacity(n * 3);
    while done.len() < n {
        let event = tokio::time::timeout(IDLE, watch.message())
            .await
            .map_err(|_| {
                anyhow!(
                    "only {} of {n} completions seen, then none for {IDLE:?}",
                    done.len()
                )
            })??
            .ok_or_else(|| anyhow!("WatchTasks ended"))?;
        if let Some(t) = event.event_time {
            latencies.push(since_ms(&t));
        }
        if event.state == TaskState::Succeeded as i32 {
            done.insert(event.task_id);
        }
    }
    latencies.sort_by(f64::total_cmp);
    if latencies.is_empty() {
        latencies.push(f64::NAN);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).context("cannot read koo's CPU time")? - cpu0;
    let ids = submitting.await??;
    let missing = ids.iter().filter(|id| !done.contains(*id)).count();
    if missing > 0 || ids.len() != n {
        bail!("{missing} submitted tasks were not seen succeeding");
    }
    Ok(Drained {
        seconds,
        tasks_per_s: n as f64 / seconds,
        cpu,
        latencies,
    })
}

/// Milliseconds from `t` (Redis's clock, this machine) to now.
fn since_ms(t: &prost_types::Timestamp) -> f64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs_f64() * 1000.0 - (t.seconds as f64 * 1000.0 + t.nanos as f64 / 1e6)
}

/// What an unfiltered watcher saw during a drain.
#[derive(Default)]
struct Observed {
    events: u64,
    /// SUCCEEDED events in the drained queue.
    succeeded: u64,
    /// `now - event_time` per event, ms.
    latencies: Vec<f64>,
    /// How the stream ended early, if it did.
    ended: Option<String>,
}

/// Opens `k` unfiltered `WatchTasks` on `channel`, each followed in its own
/// task until it has seen `target` SUCCEEDED events in the drained queue
/// (or nothing for 30 s).
async fn observe(
    channel: &Channel,
    k: usize,
    target: u64,
    capacity: usize,
) -> Result<Vec<JoinHandle<Observed>>> {
    let mut handles = Vec::with_capacity(k);
    for _ in 0..k {
        let mut stream = TaskServiceClient::new(channel.clone())
            .watch_tasks(WatchTasksRequest::default())
            .await?
            .into_inner();
        handles.push(tokio::spawn(async move {
            let mut seen = Observed {
                latencies: Vec::with_capacity(capacity),
                ..Default::default()
            };
            while seen.succeeded < target {
                let event = match tokio::time::timeout(IDLE, stream.message()).await {
                    Err(_) => {
                        seen.ended = Some(format!("nothing for {IDLE:?}"));
                        break;
                    }
                    Ok(Ok(Some(event))) => event,
                    Ok(Ok(None)) => {
                        seen.ended = Some("ended".into());
                        break;
                    }
                    Ok(Err(status)) => {
                        seen.ended = Some(format!("{:?}: {}", status.code(), status.message()));
                        break;
                    }
                };
                if let Some(t) = event.event_time {
                    seen.latencies.push(since_ms(&t));
                }
                seen.events += 1;
                if event.state == TaskState::Succeeded as i32 && event.queue == QUEUE {
                    seen.succeeded += 1;
                }
            }
            seen
        }));
    }
    Ok(handles)
}

/// The observers' results together: (events, latencies sorted, problems).
async fn collect(handles: Vec<JoinHandle<Observed>>) -> Result<(u64, Vec<f64>, Vec<String>)> {
    let (mut events, mut lat, mut problems) = (0, Vec::new(), Vec::new());
    for h in handles {
        let seen = h.await?;
        events += seen.events;
        lat.extend(seen.latencies);
        problems.extend(seen.ended);
    }
    lat.sort_by(f64::total_cmp);
    if lat.is_empty() {
        lat.push(f64::NAN);
    }
    Ok((events, lat, problems))
}

fn latency_json(lat: &[f64]) -> serde_json::Value {
    serde_json::json!({
        "p50_ms": percentile(lat, 50.0), "p90_ms": percentile(lat, 90.0),
        "p99_ms": percentile(lat, 99.0), "max_ms": lat.last().copied().unwrap_or(f64::NAN),
    })
}

/// What the baseline gave the later steps of its repetition.
struct Baseline {
    tasks_per_s: f64,
    cpu_per_task: f64,
    rss: u64,
}

impl Bench {
    fn emit(&mut self, mode: &str, rep: usize, mut line: serde_json::Value) {
        line["system"] = "koo".into();
        line["mode"] = mode.into();
        line["rep"] = rep.into();
        line["n"] = self.knobs.tasks.into();
        line["label"] = self.knobs.label.as_str().into();
        println!("{line}");
        let _ = writeln!(self.out, "{line}");
    }

    fn rss(&self) -> u64 {
        read_memory(self.pid).map_or(0, |(rss, _)| rss)
    }

    /// Step 1: a drain with no other stream.
    async fn baseline(&mut self, rep: usize) -> Result<Baseline> {
        self.koo.check_alive()?;
        eprintln!("rep {rep}: baseline drain");
        let d = drain(&self.client, self.knobs.tasks, self.pid).await?;
        let rss = self.rss();
        let cpu_per_task = d.cpu / self.knobs.tasks as f64;
        self.emit(
            "baseline",
            rep,
            serde_json::json!({
                "seconds": d.seconds, "tasks_per_s": d.tasks_per_s,
                "rss_mib": rss as f64 / MIB, "cpu_s": d.cpu, "cpu_us_per_task": cpu_per_task * 1e6,
                "streams": "only the drain's own observer (RESEARCH, the no-op's name)",
                "latency": latency_json(&d.latencies),
            }),
        );
        self.figures.add(
            "baseline_latency_p99_ms",
            percentile(&d.latencies, 99.0),
            Goal::None,
        );
        self.figures
            .add("baseline_tasks_per_s", d.tasks_per_s, Goal::None);
        self.figures
            .add("baseline_rss_mib", rss as f64 / MIB, Goal::None);
        self.figures
            .add("baseline_cpu_us_per_task", cpu_per_task * 1e6, Goal::None);
        Ok(Baseline {
            tasks_per_s: d.tasks_per_s,
            cpu_per_task,
            rss,
        })
    }

    /// Step 2: the drain with every idle stream open.
    async fn with_streams(&mut self, rep: usize, base: &Baseline) -> Result<()> {
        let k = &self.knobs;
        eprintln!(
            "rep {rep}: opening {} streams over {} connections",
            k.streams(),
            k.connections
        );
        reset_peak(self.pid);
        let t0 = Instant::now();
        // the client's own CPU over this step: it shares the cores with koo
        let client_cpu0 = cpu_seconds(std::process::id()).unwrap_or(0.0);
        let channels = idle::connections(&self.koo.addr.to_string(), k.connections).await?;
        let idle = IdleStreams::open(channels, k.counts(), &self.parked).await?;
        let open_seconds = t0.elapsed().as_secs_f64();
        let rss_open = self.rss();
        eprintln!(
            "rep {rep}: {} streams open in {open_seconds:.1} s, koo RSS {:.1} MiB; drain",
            k.streams(),
            rss_open as f64 / MIB
        );
        // The latency is the drain's own observer's, as in the baseline: no
        // watcher that receives events is added to the 10,000.
        let d = drain(&self.client, k.tasks, self.pid).await?;
        let problems: Vec<String> = Vec::new();
        let lat = d.latencies.clone();
        let rss_drained = self.rss();
        let peak = read_memory(self.pid).map_or(0, |(_, hwm)| hwm);
        let tally = idle.close().await?;
        let client_cpu = cpu_seconds(std::process::id()).unwrap_or(0.0) - client_cpu0;
        let rss = rss_open.max(rss_drained) as f64 / MIB;
        let ratio = d.tasks_per_s / base.tasks_per_s;
        let ticks = tally.seconds.floor().max(1.0);
        let metrics_min = match (tally.metrics_min, tally.task_metrics_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut line = serde_json::json!({
            "streams": k.streams(), "watch_task": k.watch_task, "watch_tasks": k.watch_tasks,
            "watch_metrics": k.metrics, "watch_task_metrics": k.task_metrics,
            "connections": k.connections, "open_seconds": open_seconds,
            "seconds": d.seconds, "tasks_per_s": d.tasks_per_s, "ratio_vs_baseline": ratio,
            "rss_open_mib": rss_open as f64 / MIB, "rss_after_drain_mib": rss_drained as f64 / MIB,
            "peak_mib": peak as f64 / MIB, "cpu_us_per_task": d.cpu / k.tasks as f64 * 1e6,
            "bench_client_cpu_s": client_cpu,
            "observer_problems": problems,
            "watch_metrics_min_messages": tally.metrics_min,
            "watch_task_metrics_min_messages": tally.task_metrics_min,
            "seconds_open": tally.seconds,
            "unexpected_messages": tally.unexpected, "ended_early": tally.ended,
            "ended_by_kind_and_code": tally.endings,
        });
        line["latency"] = latency_json(&lat);
        self.emit("streams", rep, line);
        let f = &mut self.figures;
        f.add("streams_open_seconds", open_seconds, Goal::None);
        f.add("streams_tasks_per_s", d.tasks_per_s, Goal::None);
        let cpu_per_task = d.cpu / self.knobs.tasks as f64 * 1e6;
        f.add("streams_cpu_us_per_task", cpu_per_task, Goal::None);
        f.add("streams_throughput_ratio", ratio, Goal::AtLeast(0.90));
        f.add("streams_rss_mib", rss, Goal::Below(128.0));
        f.add("streams_peak_mib", peak as f64 / MIB, Goal::None);
        f.add("streams_latency_p50_ms", percentile(&lat, 50.0), Goal::None);
        f.add("streams_latency_p90_ms", percentile(&lat, 90.0), Goal::None);
        f.add(
            "streams_latency_p99_ms",
            percentile(&lat, 99.0),
            Goal::AtMost(50.0),
        );
        if let Some(min) = metrics_min {
            let fraction = f64::from(min) / ticks;
            f.add(
                "streams_metrics_min_fraction_of_ticks",
                fraction,
                Goal::AtLeast(0.8),
            );
        }
        f.add("streams_ended_early", tally.ended as f64, Goal::AtMost(0.0));
        Ok(())
    }
}

impl Bench {
    /// Step 3: every stream closed; koo's RSS each second for the settle time.
    async fn memory_return(&mut self, rep: usize, pristine: u64) -> Result<()> {
        let settle = self.knobs.settle;
        eprintln!("rep {rep}: streams closed; koo's RSS each second for {settle} s");
        let t0 = tokio::time::Instant::now();
        let mut samples = Vec::with_capacity(settle);
        for s in 1..=settle {
            // pacing the samples, not waiting for anything
            tokio::time::sleep_until(t0 + Duration::from_secs(s as u64)).await;
            samples.push(self.rss() as f64 / MIB);
        }
        let end = samples.last().copied().unwrap_or(self.rss() as f64 / MIB);
        let base = pristine as f64 / MIB;
        self.emit(
            "memory_return",
            rep,
            serde_json::json!({
                "seconds": settle, "rss_end_mib": end, "baseline_rss_mib": base,
                "ratio_vs_baseline": end / base, "samples_mib": samples,
                "baseline": "RSS at rest after the first baseline drain, before any stream",
            }),
        );
        self.figures
            .add("memory_rss_after_settle_mib", end, Goal::None);
        self.figures
            .add("memory_return_ratio", end / base, Goal::AtMost(1.10));
        Ok(())
    }

    /// Step 4: a drain followed by unfiltered `WatchTasks`.
    async fn followers(&mut self, rep: usize, base: &Baseline) -> Result<()> {
        self.koo.check_alive()?;
        let (n, k) = (self.knobs.tasks, self.knobs.followers);
        eprintln!("rep {rep}: drain with {k} unfiltered WatchTasks following");
        let channel = connect(&self.koo.addr.to_string()).await?;
        let followers = observe(&channel, k, n as u64, n * 3).await?;
        let d = drain(&self.client, n, self.pid).await?;
        let (events, lat, problems) = collect(followers).await?;
        let extra_cpu = d.cpu - base.cpu_per_task * n as f64;
        let us_per_event = extra_cpu / events.max(1) as f64 * 1e6;
        let ratio = d.tasks_per_s / base.tasks_per_s;
        let mut line = serde_json::json!({
            "followers": k, "seconds": d.seconds, "tasks_per_s": d.tasks_per_s,
            "ratio_vs_baseline": ratio, "events_delivered": events, "cpu_s": d.cpu,
            "cpu_beyond_baseline_s": extra_cpu, "cpu_us_per_event": us_per_event,
            "follower_problems": problems,
        });
        line["latency"] = latency_json(&lat);
        self.emit("followers", rep, line);
        let f = &mut self.figures;
        f.add("followers_throughput_ratio", ratio, Goal::AtLeast(0.75));
        f.add("followers_events_delivered", events as f64, Goal::None);
        f.add("followers_cpu_us_per_event", us_per_event, Goal::None);
        f.add(
            "followers_latency_p99_ms",
            percentile(&lat, 99.0),
            Goal::None,
        );
        Ok(())
    }

    /// Step 5: a watcher that never reads beside normal ones, during a drain.
    async fn stalled(&mut self, rep: usize, base: &Baseline) -> Result<()> {
        self.koo.check_alive()?;
        let (n, k) = (self.knobs.tasks, self.knobs.observers);
        eprintln!("rep {rep}: drain with one WatchTasks never read and {k} normal ones");
        // 1 KiB windows: koo can only send that much before it must wait.
        let stalled_channel = Endpoint::from_shared(format!("http://{}", self.koo.addr))?
            .initial_stream_window_size(1024)
            .initial_connection_window_size(1024)
            .connect()
            .await?;
        let mut stalled = TaskServiceClient::new(stalled_channel)
            .watch_tasks(WatchTasksRequest::default())
            .await?
            .into_inner();
        let observers = observe(&self.channel, k, n as u64, n * 3).await?;
        let d = drain(&self.client, n, self.pid).await?;
        let (_, lat, problems) = collect(observers).await?;
        let wait = env_usize("BENCH_STALL_WAIT_SECONDS", 5)?;
        // koo's limit on falling behind may be a time: give it that long
        // before the stalled stream is read at last.
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        let end = read_to_end(&mut stalled).await;
        let stream_metrics = match self
            .client
            .clone()
            .get_task_metrics(GetTaskMetricsRequest {})
            .await
        {
            Ok(r) => r.into_inner().streams.map_or(serde_json::Value::Null, |s| {
                serde_json::json!({
                    "watch_task": s.watch_task, "watch_tasks": s.watch_tasks,
                    "watch_task_metrics": s.watch_task_metrics, "watch_metrics": s.watch_metrics,
                    "max_watchers": s.max_watchers, "queue_readers": s.queue_readers,
                    "events_fanned_out": s.events_fanned_out,
                    "watchers_fallen_behind": s.watchers_fallen_behind,
                })
            }),
            Err(e) => format!("GetTaskMetrics failed: {e}").into(),
        };
        let ratio = d.tasks_per_s / base.tasks_per_s;
        let mut line = serde_json::json!({
            "seconds": d.seconds, "tasks_per_s": d.tasks_per_s, "ratio_vs_baseline": ratio,
            "observers": k, "observer_problems": problems,
            "stalled_messages_read": end.messages, "stalled_end": end.outcome,
            "stalled_code": end.code, "stalled_reason": end.reason,
            "stalled_resume_token": end.token, "stream_metrics": stream_metrics,
        });
        line["latency"] = latency_json(&lat);
        eprintln!(
            "rep {rep}: stalled stream: {} after {} messages; GetTaskMetrics.streams: {}",
            end.outcome, end.messages, line["stream_metrics"]
        );
        self.emit("stalled", rep, line);
        let specified = end.code.as_deref() == Some("ResourceExhausted") && end.token;
        let f = &mut self.figures;
        f.add("stalled_throughput_ratio", ratio, Goal::None);
        f.add(
            "stalled_others_latency_p99_ms",
            percentile(&lat, 99.0),
            Goal::AtMost(50.0),
        );
        f.add(
            "stalled_ended_as_specified",
            f64::from(u8::from(specified)),
            Goal::AtLeast(1.0),
        );
        Ok(())
    }
}

/// How the stalled stream ended when read at last.
struct StallEnd {
    messages: u64,
    outcome: String,
    code: Option<String>,
    reason: Option<String>,
    token: bool,
}

/// Reads the stalled stream until it ends, or stays silent for 10 s (a koo
/// that never ends it).
async fn read_to_end(
    stream: &mut tonic::Streaming<koo::pb::tasks::v1::WatchTasksResponse>,
) -> StallEnd {
    use tonic_types::StatusExt as _;
    let mut end = StallEnd {
        messages: 0,
        outcome: String::new(),
        code: None,
        reason: None,
        token: false,
    };
    let silence = Duration::from_secs(10);
    loop {
        match tokio::time::timeout(silence, stream.message()).await {
            Ok(Ok(Some(_))) => end.messages += 1,
            Err(_) => {
                end.outcome = format!("still open: nothing more for {silence:?}");
                return end;
            }
            Ok(Ok(None)) => {
                end.outcome = "ended OK".into();
                return end;
            }
            Ok(Err(status)) => {
                let info = status.get_details_error_info();
                end.code = Some(format!("{:?}", status.code()));
                end.reason = info.as_ref().map(|i| i.reason.clone());
                end.token = info.is_some_and(|i| i.metadata.contains_key("resume_token"));
                end.outcome = format!("{:?}: {}", status.code(), status.message());
                return end;
            }
        }
    }
}
