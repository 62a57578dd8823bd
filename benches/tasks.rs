//! End-to-end task benchmark: no-op tasks through the real `koo serve` and
//! its built-in workers, on Redis.
//!
//! Measured the strictest way: the client observes every task's completion
//! (a `WatchTasks` stream opened before the first submit, counting each
//! submitted id's SUCCEEDED event), rather than polling a counter.
//!
//! - **e2e**: submit `BENCH_TASKS` (default 10,000) no-op tasks with
//!   `SubmitTasks` (batches of 100, 4 in flight) and time from the first
//!   submit until the last completion is observed.
//! - **latency**: `BENCH_LATENCY` (default 500) sequential round trips:
//!   `SubmitTask`, then its SUCCEEDED event; p50/p90/p99.
//! - **memory**: `BENCH_QUEUED` (default 100,000) tasks parked in a queue no
//!   worker serves, and `BENCH_WATCHERS` (default 1,000) open `WatchTask`
//!   streams on them; koo's resident memory (VmRSS) then.
//! - **embedded** (`BENCH_EMBEDDED=1`; off by default): e2e and latency
//!   through a koo on its embedded store, no Redis: koo's own path.
//! - **across** (`BENCH_ACROSS=1`; off by default): the same through a koo
//!   with no workers, the no-op run by a second koo's built-in slots on
//!   the same Redis (a submit waking another process).
//!
//! - **external**: the same e2e and latency runs with the no-op served by
//!   the Python example worker (`examples/python-worker`, on the Python SDK,
//!   over WorkerService's Work stream, `BENCH_EXTERNAL_CONCURRENCY` tasks at
//!   once, default 16) against a second `koo serve` with no built-in
//!   workers: `"system": "koo+python"`. 0 skips it. 16 because the SDK
//!   sends batches of half its concurrency, so that two groups of tasks
//!   alternate (one in Python while koo and Redis end the other); with 4 the
//!   groups are too small to hide the round trip (about half the
//!   throughput). The no-op is a coroutine: a slot costs no thread. The
//!   Python comes from `KOO_BENCH_PYTHON`, else the example's `setup.sh`
//!   makes it.
//!
//! Redis: its own `redis-server` on a free port, or `KOO_BENCH_REDIS_URL`
//! (used by `scripts/bench-tasks` to put koo on the same Redis as the
//! peers, a server that script started); koo's keys there get a prefix of
//! their own and are deleted afterwards. `BENCH_REPS` (default 1) repeats
//! e2e and latency. One JSON line per measurement goes to stdout (and
//! `target/bench-results/tasks.jsonl`); progress to stderr.

use std::io::Write as _;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use koo::pb::tasks::v1::task_service_client::TaskServiceClient;
use koo::pb::tasks::v1::{
    SubmitTaskRequest, SubmitTasksRequest, TaskCategory, TaskState, WatchTaskRequest,
    WatchTasksRequest,
};
use tonic::transport::{Channel, Endpoint};

mod support;
use support::{env_usize, read_memory, start_koo, start_redis};

const NOOP: &str = "koo.diagnostics.noop";
const BATCH: usize = 100;
const IN_FLIGHT: usize = 4;

fn emit(line: serde_json::Value, out: &mut std::fs::File) {
    println!("{line}");
    let _ = writeln!(out, "{line}");
}

fn noop(queue: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        name: NOOP.into(),
        category: TaskCategory::Research as i32,
        queue: queue.into(),
        ..Default::default()
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let k = (sorted.len() - 1) as f64 * p / 100.0;
    let (f, c) = (k.floor() as usize, k.ceil() as usize);
    sorted[f] + (sorted[c] - sorted[f]) * (k - f as f64)
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let tasks = env_usize("BENCH_TASKS", 10_000)?;
    let latency_n = env_usize("BENCH_LATENCY", 500)?.max(2);
    let queued = env_usize("BENCH_QUEUED", 100_000)?;
    let watchers = env_usize("BENCH_WATCHERS", 1_000)?;
    let reps = env_usize("BENCH_REPS", 1)?.max(1);
    let label = std::env::var("BENCH_LABEL").unwrap_or_default();
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let results = tmp.parent().unwrap_or(tmp).join("bench-results");
    std::fs::create_dir_all(&results)?;
    let mut out = std::fs::File::create(results.join("tasks.jsonl"))?;

    // A Redis of our own unless told which to use; a queue must never lose
    // keys to eviction, hence noeviction.
    let own;
    let mut redis_pid = None;
    let url = match std::env::var("KOO_BENCH_REDIS_URL") {
        Ok(url) => url,
        Err(_) => {
            let server =
                std::env::var("KOO_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            own = start_redis(
                &server,
                &tmp.join("tmp"),
                &["--maxmemory-policy", "noeviction"],
            )
            .await?;
            redis_pid = Some(own.guard.pid());
            own.url.clone()
        }
    };
    let prefix = format!("kbench{}", std::process::id());
    let mut koo = start_koo(
        &support::koo_bin(),
        &[
            "--redis-url",
            &url,
            "--prefix",
            &prefix,
            "--task-queues",
            "parked",
        ],
        &[("KOO_LOG", "warn")],
    )?;
    let pid = koo.guard.pid();
    let channel = Endpoint::from_shared(format!("http://{}", koo.addr))?
        .connect()
        .await
        .context("cannot connect to koo")?;
    let client = TaskServiceClient::new(channel.clone());
    eprintln!(
        "koo {} on {url} (prefix {prefix}), built-in workers: the default 4 slots",
        koo.addr
    );

    // warm-up: scripts loaded, connections open
    e2e(&client, 500).await?;
    let run = Run {
        system: "koo",
        worker: "the built-in workers (4 slots)".to_owned(),
        tasks,
        latency_n,
        reps,
        label: &label,
        redis_pid,
        redis_url: url.clone(),
    };
    run.measure(&client, &mut koo, &mut out).await?;
    if queued > 0 {
        let (rss_before, _) = read_memory(pid).unwrap_or_default();
        let ids = park(&client, queued).await?;
        let streams = watch_many(&koo.addr.to_string(), &ids, watchers).await?;
        koo.check_alive()?;
        let (rss, hwm) = read_memory(pid).unwrap_or_default();
        emit(
            serde_json::json!({
                "system": "koo", "mode": "memory", "queued": queued, "watchers": streams.len(),
                "label": label, "rss_mib": rss as f64 / 1048576.0, "peak_mib": hwm as f64 / 1048576.0,
                "rss_before_mib": rss_before as f64 / 1048576.0,
            }),
            &mut out,
        );
        drop(streams);
    }
    drop(client);
    drop(koo);
    if env_usize("BENCH_EMBEDDED", 0)? > 0 {
        embedded(&run, &mut out).await?;
    }
    let across_prefix = format!("{prefix}a");
    if env_usize("BENCH_ACROSS", 0)? > 0 {
        let run = Run {
            system: "koo-across",
            worker: "another koo's built-in workers (4 slots)".to_owned(),
            ..run
        };
        across(&run, &across_prefix, &mut out).await?;
    }
    let external = env_usize("BENCH_EXTERNAL_CONCURRENCY", 16)?;
    let external_prefix = format!("{prefix}x");
    if external > 0 {
        external_worker(
            &url,
            &external_prefix,
            external,
            tasks,
            latency_n,
            reps,
            &label,
            &mut out,
        )
        .await?;
    }
    // remove what koo wrote (only its own prefixes: the Redis may be shared)
    let redis = redis::Client::open(url.as_str())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    for prefix in [&prefix, &external_prefix, &across_prefix] {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let _: () = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// e2e and latency through a koo on its embedded store (no Redis): what
/// koo's own path costs, beside which the Redis run's extra is its round
/// trips and scripts.
async fn embedded(run: &Run<'_>, out: &mut std::fs::File) -> Result<()> {
    let mut koo = start_koo(
        &support::koo_bin(),
        &["--task-queues", "parked"],
        // the embedded koo ends tasks faster than this process, on the
        // same two cores, may read their events: a deeper buffer, so that
        // the watcher is not told it fell behind
        &[("KOO_LOG", "warn"), ("KOO_WATCH_BUFFER", "65536")],
    )?;
    let client = task_client(&koo).await?;
    e2e(&client, 500).await?;
    let run = Run {
        system: "koo-embedded",
        worker: run.worker.clone(),
        redis_pid: None,
        redis_url: String::new(),
        ..*run
    };
    run.measure(&client, &mut koo, out).await
}

/// A TaskService client of `koo`.
async fn task_client(koo: &support::KooServer) -> Result<TaskServiceClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{}", koo.addr))?
        .connect()
        .await
        .context("cannot connect to koo")?;
    Ok(TaskServiceClient::new(channel))
}

/// e2e and latency through a koo with no workers (an API node) whose
/// tasks run on another koo's built-in slots, on the same Redis: the path
/// of a submit that wakes another process (`BENCH_ACROSS=1`).
async fn across(run: &Run<'_>, prefix: &str, out: &mut std::fs::File) -> Result<()> {
    let url = run.redis_url.as_str();
    let args = |workers: &'static str| {
        [
            "--redis-url",
            url,
            "--prefix",
            prefix,
            "--worker-concurrency",
            workers,
        ]
    };
    let mut api = start_koo(&support::koo_bin(), &args("0"), &[("KOO_LOG", "warn")])?;
    let _workers = start_koo(&support::koo_bin(), &args("4"), &[("KOO_LOG", "warn")])?;
    let client = task_client(&api).await?;
    eprintln!(
        "koo {} with no workers; another koo's 4 built-in slots run the no-op",
        api.addr
    );
    e2e(&client, 500).await?;
    run.measure(&client, &mut api, out).await
}

/// e2e and latency with the no-op run by the Python example worker over
/// WorkerService, against a koo with no built-in workers.
#[allow(clippy::too_many_arguments)]
async fn external_worker(
    url: &str,
    prefix: &str,
    concurrency: usize,
    tasks: usize,
    latency_n: usize,
    reps: usize,
    label: &str,
    out: &mut std::fs::File,
) -> Result<()> {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python-worker");
    let python = match std::env::var("KOO_BENCH_PYTHON") {
        Ok(p) => p,
        Err(_) => {
            let o = std::process::Command::new(example.join("setup.sh"))
                .stderr(std::process::Stdio::inherit())
                .output()
                .context("cannot run examples/python-worker/setup.sh")?;
            if !o.status.success() {
                bail!("examples/python-worker/setup.sh failed");
            }
            String::from_utf8(o.stdout)?
                .lines()
                .last()
                .context("setup.sh printed no python")?
                .trim()
                .to_owned()
        }
    };
    let mut koo = start_koo(
        &support::koo_bin(),
        &[
            "--redis-url",
            url,
            "--prefix",
            prefix,
            "--worker-concurrency",
            "0",
        ],
        &[("KOO_LOG", "warn")],
    )?;
    let worker = std::process::Command::new(&python)
        .arg(example.join("worker.py"))
        .args([
            "--target",
            &koo.addr.to_string(),
            "--serve",
            "noop",
            "--noop-name",
            NOOP,
        ])
        .args([
            "--quiet",
            "--concurrency",
            &concurrency.to_string(),
            "--log-level",
            "warning",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("cannot start the Python example worker")?;
    let _worker = KillOnDrop(worker);
    let client = task_client(&koo).await?;
    eprintln!(
        "koo {} with no built-in workers; the Python example worker serves the no-op, {concurrency} at a time",
        koo.addr
    );
    // warm-up: the worker connected, scripts loaded
    e2e(&client, 500).await?;
    let run = Run {
        system: "koo+python",
        worker: format!("examples/python-worker, concurrency {concurrency}"),
        tasks,
        latency_n,
        reps,
        label,
        redis_pid: None,
        redis_url: url.to_owned(),
    };
    run.measure(&client, &mut koo, out).await?;
    Ok(())
}

/// One system's e2e and latency runs.
struct Run<'a> {
    system: &'static str,
    worker: String,
    tasks: usize,
    latency_n: usize,
    reps: usize,
    label: &'a str,
    /// The bench's own redis-server, whose CPU per task is reported (none
    /// when the bench runs against a Redis it did not start).
    redis_pid: Option<u32>,
    /// The Redis under koo, whose commands per task are reported (empty:
    /// none, the embedded store).
    redis_url: String,
}

impl Run<'_> {
    /// `reps` times: e2e, then latency; one JSON line each.
    async fn measure(
        &self,
        client: &TaskServiceClient<Channel>,
        koo: &mut support::KooServer,
        out: &mut std::fs::File,
    ) -> Result<()> {
        let (system, tasks, latency_n, label) =
            (self.system, self.tasks, self.latency_n, self.label);
        for rep in 1..=self.reps {
            koo.check_alive()?;
            // CPU per task (koo, Redis): steadier than throughput on a
            // shared machine, and what "no slowdown" costs in hardware
            let cpu = |pid: Option<u32>| pid.and_then(support::cpu_seconds);
            let me = Some(std::process::id());
            let before = (cpu(Some(koo.guard.pid())), cpu(self.redis_pid), cpu(me));
            let calls_before = support::redis_calls(&self.redis_url).await;
            let (seconds, submit_seconds) = e2e(client, tasks).await?;
            let after = (cpu(Some(koo.guard.pid())), cpu(self.redis_pid), cpu(me));
            let calls_after = support::redis_calls(&self.redis_url).await;
            // Redis's commands per task (a script's own calls included),
            // and its script calls: noise-free, unlike the CPU figures
            let calls = calls_before.zip(calls_after).map(|(b, a)| {
                serde_json::json!({
                    "commands": (a.0 - b.0) as f64 / tasks as f64,
                    "scripts": (a.1 - b.1) as f64 / tasks as f64,
                })
            });
            let per_task = |b: Option<f64>, a: Option<f64>| {
                a.zip(b).map(|(a, b)| (a - b) * 1e6 / tasks as f64)
            };
            emit(
                serde_json::json!({
                    "system": system, "mode": "e2e", "n": tasks, "rep": rep, "label": label,
                    "seconds": seconds, "tasks_per_s": tasks as f64 / seconds,
                    "submit_tasks_per_s": tasks as f64 / submit_seconds,
                    "worker": self.worker,
                    "observed": "every task's SUCCEEDED event, by WatchTasks",
                    "cpu_us_per_task": {
                        "koo": per_task(before.0, after.0),
                        "redis": per_task(before.1, after.1),
                        // this process: the client's submits and watch
                        "client": per_task(before.2, after.2),
                    },
                    "redis_calls_per_task": calls,
                }),
                out,
            );
            let scripts_before = support::redis_script_usec(&self.redis_url).await;
            let mut lat = latency(client, latency_n).await?;
            let scripts_after = support::redis_script_usec(&self.redis_url).await;
            lat.sort_by(f64::total_cmp);
            // what a lone task cannot go below here whatever koo does: its
            // two script calls in sequence (each a bare round trip plus the
            // scripts' own time in Redis), before the client's gRPC call
            let ping = support::redis_ping_p50(&self.redis_url, 500).await;
            let scripts_ms = scripts_before
                .zip(scripts_after)
                .map(|(b, a)| (a - b) as f64 / 1000.0 / latency_n as f64);
            emit(
                serde_json::json!({
                    "system": system, "mode": "latency", "n": latency_n, "rep": rep, "label": label,
                    "p50_ms": pct(&lat, 50.0), "p90_ms": pct(&lat, 90.0), "p99_ms": pct(&lat, 99.0),
                    "max_ms": lat[lat.len() - 1],
                    "redis_ping_p50_ms": ping,
                    "redis_script_ms_per_task": scripts_ms,
                    "redis_floor_ms": ping.zip(scripts_ms).map(|(p, s)| 2.0 * p + s),
                }),
                out,
            );
        }
        Ok(())
    }
}

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Submits `n` no-ops and waits for every one's SUCCEEDED event: (seconds
/// to the last completion, seconds to the last submit).
async fn e2e(client: &TaskServiceClient<Channel>, n: usize) -> Result<(f64, f64)> {
    let mut watch = client
        .clone()
        .watch_tasks(WatchTasksRequest {
            categories: vec![TaskCategory::Research as i32],
            name: NOOP.into(),
            resume_token: String::new(),
        })
        .await?
        .into_inner();
    let started = Instant::now();
    let submit = {
        let client = client.clone();
        tokio::spawn(async move {
            let batches = n.div_ceil(BATCH);
            let mut ids = Vec::with_capacity(n);
            let mut pending = futures::stream::iter((0..batches).map(|b| {
                let mut client = client.clone();
                let size = BATCH.min(n - b * BATCH);
                async move {
                    client
                        .submit_tasks(SubmitTasksRequest {
                            tasks: (0..size).map(|_| noop("")).collect(),
                        })
                        .await
                }
            }))
            .buffer_unordered(IN_FLIGHT);
            use futures::StreamExt;
            while let Some(reply) = pending.next().await {
                ids.extend(reply?.into_inner().tasks.into_iter().map(|t| t.id));
            }
            Ok::<_, tonic::Status>((ids, started.elapsed()))
        })
    };
    let done = support::await_successes(&mut watch, n).await?;
    let seconds = started.elapsed().as_secs_f64();
    let (ids, submit_time) = submit.await??;
    let missing = ids.iter().filter(|id| !done.contains(*id)).count();
    if missing > 0 || ids.len() != n {
        bail!("{missing} submitted tasks were not seen succeeding");
    }
    Ok((seconds, submit_time.as_secs_f64()))
}

/// `n` sequential round trips: submit, then its SUCCEEDED event (ms each).
async fn latency(client: &TaskServiceClient<Channel>, n: usize) -> Result<Vec<f64>> {
    let mut c = client.clone();
    let mut watch = c
        .watch_tasks(WatchTasksRequest {
            categories: vec![TaskCategory::Research as i32],
            name: NOOP.into(),
            resume_token: String::new(),
        })
        .await?
        .into_inner();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let id = c
            .submit_task(noop(""))
            .await?
            .into_inner()
            .task
            .context("no task in the reply")?
            .id;
        loop {
            let e = watch.message().await?.context("WatchTasks ended")?;
            if e.task_id == id && e.state == TaskState::Succeeded as i32 {
                break;
            }
        }
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// Parks `n` no-ops in a queue no worker serves; their ids.
async fn park(client: &TaskServiceClient<Channel>, n: usize) -> Result<Vec<String>> {
    use futures::StreamExt;
    let batches = n.div_ceil(BATCH);
    let mut ids = Vec::with_capacity(n);
    let mut pending = futures::stream::iter((0..batches).map(|b| {
        let mut client = client.clone();
        let size = BATCH.min(n - b * BATCH);
        async move {
            client
                .submit_tasks(SubmitTasksRequest {
                    tasks: (0..size).map(|_| noop("parked")).collect(),
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

/// Opens `n` WatchTask streams on parked tasks, 100 per connection (as many
/// dashboards would; HTTP/2 servers cap streams per connection), and reads
/// each one's first message.
async fn watch_many(
    addr: &str,
    ids: &[String],
    n: usize,
) -> Result<Vec<tonic::Streaming<koo::pb::tasks::v1::WatchTaskResponse>>> {
    let mut streams = Vec::with_capacity(n);
    let mut channel = None;
    for (i, id) in ids.iter().take(n).enumerate() {
        if i % 100 == 0 {
            channel = Some(
                Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await?,
            );
        }
        let mut c = TaskServiceClient::new(channel.clone().expect("set at i = 0"));
        let mut s = c
            .watch_task(WatchTaskRequest {
                task_id: id.clone(),
            })
            .await?
            .into_inner();
        s.message().await?.context("WatchTask sent nothing")?;
        streams.push(s);
    }
    Ok(streams)
}
