//! End-to-end cache benchmark: koo's unary `Set`/`Get` over gRPC, measured
//! against the same operations sent straight to Redis with redis-rs.
//!
//! The benchmark starts its own `redis-server` on a free loopback port (never
//! any other Redis) and the real `koo` binary pointed at it, then, for each
//! operation (Set, then Get), value size (100 B and 4 KiB of random bytes,
//! plus a compressible 4 KiB text for koo only) and concurrency (1, 16, 64),
//! runs N tokio tasks that loop over one operation for a fixed time and
//! records every latency. koo and raw Redis take turns cell by cell so that
//! noise from a shared machine hits both.
//!
//! Run it with `cargo bench --bench cache`. Environment:
//!
//! - `BENCH_SECONDS` (default 3): measured seconds per run, after 0.5 s of
//!   warm-up that is not counted.
//! - `BENCH_REPS` (default 1): repetitions of every cell; the table shows the
//!   median throughput and the median koo/Redis ratio over them.
//! - `BENCH_QUICK=1`: only concurrency 16 with 100 B values (a smoke run).
//! - `KOO_BENCH_REDIS_SERVER` (default `redis-server`): the Redis binary.
//! - `KOO_BENCH_BIN` (default: this build): the koo binary to measure.
//!
//! It prints a markdown table of throughput and latency, a table of the CPU
//! each process (this load generator, koo, redis-server) spent per operation,
//! koo's peak resident memory and the goal checks to stdout (progress goes to
//! stderr), and writes one JSON line per cell to
//! `target/bench-results/cache.jsonl` (rewritten on every run). It exits
//! non-zero only when it cannot set up or keep running Redis or koo; a missed
//! goal is reported, not failed.
//!
//! The load generator, koo and Redis all run on this machine and compete for
//! its cores, so the absolute numbers understate both servers, and the koo
//! runs also pay for a gRPC client that costs several times what redis-rs
//! does. The CPU table tells those costs apart.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use koo::pb::cache::v1::cache_service_client::CacheServiceClient;
use koo::pb::cache::v1::cache_value::Kind;
use koo::pb::cache::v1::{
    CacheEntry, CacheLevel, CacheValue, GetRequest, SetManyRequest, SetRequest,
};
use rand::Rng;
use redis::IntoConnectionInfo;
use redis::aio::MultiplexedConnection;
use tonic::transport::{Channel, Endpoint};

mod support;
use support::{STARTUP_TIMEOUT, read_memory, reset_peak, start_koo, start_redis};

/// Each task cycles over this many keys, `bench:{task}:{i % KEYS_PER_TASK}`,
/// so that Sets overwrite rather than grow Redis without bound.
const KEYS_PER_TASK: usize = 1000;

/// Tasks per connection, for both koo and Redis. HTTP/2 multiplexes many
/// calls on one connection, but one connection is still one socket that
/// serialises every frame (and, in tonic, one connection task); redis-rs's
/// `MultiplexedConnection` pipelines the same way. Real clients spread load
/// over a few connections, so both sides get one connection per 8 tasks and
/// neither is favoured by the choice.
const TASKS_PER_CONNECTION: usize = 8;

/// Run before each measurement and not counted: lets connections, Redis's
/// lazy pool inside koo and the CPU frequency settle.
const WARMUP: Duration = Duration::from_millis(500);

/// The TTL of every write, the same for koo and raw Redis (`PX 3600000`).
const TTL: Duration = Duration::from_secs(3600);

/// Client-side message limit, well above the largest reply (4 KiB values, or
/// the preload batches), so the client's default 4 MiB limit never matters.
const MAX_MESSAGE: usize = 64 << 20;

/// Entries per `SetMany` when preloading koo before the Get cells: small
/// enough that preloading does not inflate koo's peak memory much.
const PRELOAD_BATCH: usize = 100;

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench cache: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench cache: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The process guards live inside this future, so they are dropped (and
    // the children killed) when it returns, fails or panics.
    match runtime.block_on(run(&config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench cache: aborted (setup or a server failed): {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What to run, from the environment.
struct Config {
    seconds: Duration,
    reps: usize,
    quick: bool,
    redis_server: String,
    /// Cargo's target directory: results go to `bench-results/`, Redis's
    /// log and working directory to `tmp/`.
    target_dir: PathBuf,
}

impl Config {
    fn from_env() -> Result<Self> {
        let seconds = match std::env::var("BENCH_SECONDS") {
            Ok(s) => {
                let secs: f64 = s
                    .trim()
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite() && *v > 0.0 && *v <= 3600.0)
                    .ok_or_else(|| {
                        anyhow!("BENCH_SECONDS: {s:?} is not a number of seconds in (0, 3600]")
                    })?;
                Duration::from_secs_f64(secs)
            }
            Err(_) => Duration::from_secs(3),
        };
        let reps = match std::env::var("BENCH_REPS") {
            Ok(s) => s
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| anyhow!("BENCH_REPS: {s:?} is not a whole number from 1 to 100"))?,
            Err(_) => 1,
        };
        let quick =
            std::env::var("BENCH_QUICK").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
        let redis_server =
            std::env::var("KOO_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        // CARGO_TARGET_TMPDIR is `<target dir>/tmp`, which follows
        // CARGO_TARGET_DIR when that is set.
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let target_dir = tmp.parent().unwrap_or(tmp).to_path_buf();
        Ok(Self {
            seconds,
            reps,
            quick,
            redis_server,
            target_dir,
        })
    }

    fn tmp_dir(&self) -> PathBuf {
        self.target_dir.join("tmp")
    }
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// koo's memory over the run. Resetting VmHWM per cell would lose the
/// whole-run peak, so the peak is folded in before every reset.
struct MemoryTracker {
    pid: u32,
    whole_run_peak: u64,
    per_cell_reset: bool,
}

impl MemoryTracker {
    fn new(pid: u32) -> Self {
        Self {
            pid,
            whole_run_peak: 0,
            per_cell_reset: true,
        }
    }

    fn before_run(&mut self) {
        if let Some((_, hwm)) = read_memory(self.pid) {
            self.whole_run_peak = self.whole_run_peak.max(hwm);
        }
        if self.per_cell_reset && !reset_peak(self.pid) {
            eprintln!("note: cannot reset koo's VmHWM; per-cell peaks are peaks since start");
            self.per_cell_reset = false;
        }
    }

    /// (VmRSS now, peak during the run).
    fn after_run(&mut self) -> Option<(u64, u64)> {
        let (rss, hwm) = read_memory(self.pid)?;
        self.whole_run_peak = self.whole_run_peak.max(hwm);
        Some((rss, hwm))
    }

    fn finish(&mut self) -> u64 {
        if let Some((_, hwm)) = read_memory(self.pid) {
            self.whole_run_peak = self.whole_run_peak.max(hwm);
        }
        self.whole_run_peak
    }
}

/// Samples the CPU time of the three processes on the machine's hot path:
/// this load generator, koo and redis-server. Per-operation CPU shows where
/// the time goes when koo is far from raw Redis, and how much the client
/// itself takes from the shared cores.
#[derive(Clone, Copy)]
struct CpuProbe {
    /// The bench itself, koo, redis-server.
    pids: [u32; 3],
    /// Clock ticks per second of `/proc/<pid>/stat`'s utime and stime.
    ticks: f64,
}

/// The process names in [`CpuProbe::pids`] order.
const PROCESSES: [&str; 3] = ["client", "koo", "redis"];

impl CpuProbe {
    fn new(koo: u32, redis: u32) -> Self {
        // CLK_TCK is 100 on every common Linux; ask getconf in case.
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0);
        Self {
            pids: [std::process::id(), koo, redis],
            ticks,
        }
    }

    /// User plus system CPU seconds of one process, all threads.
    fn cpu_seconds(&self, pid: u32) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is parenthesised and may hold spaces;
        // after it come plain fields from field 3 (state) on.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        // utime and stime are fields 14 and 15.
        let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
        let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
        Some((utime + stime) as f64 / self.ticks)
    }

    fn sample(&self) -> Option<(Instant, [f64; 3])> {
        let [a, b, c] = self.pids.map(|pid| self.cpu_seconds(pid));
        Some((Instant::now(), [a?, b?, c?]))
    }
}

/// CPU used over one measured window.
#[derive(Clone, Copy)]
struct CpuWindow {
    /// Wall-clock seconds between the samples.
    wall: f64,
    /// CPU seconds per process, in [`PROCESSES`] order.
    cpu: [f64; 3],
}

/// Samples at `from` and at `to`, while the load runs.
async fn sample_cpu(probe: CpuProbe, from: Instant, to: Instant) -> Option<CpuWindow> {
    tokio::time::sleep_until(from.into()).await;
    let (t0, a) = probe.sample()?;
    tokio::time::sleep_until(to.into()).await;
    let (t1, b) = probe.sample()?;
    Some(CpuWindow {
        wall: (t1 - t0).as_secs_f64(),
        cpu: [b[0] - a[0], b[1] - a[1], b[2] - a[2]],
    })
}

// ---------------------------------------------------------------------------
// Load generation
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Set,
    Get,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Set => "Set",
            Op::Get => "Get",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Koo,
    Redis,
}

/// One value shape of the benchmark.
struct Payload {
    label: &'static str,
    value: Bytes,
    compressible: bool,
    /// Whether raw Redis is measured too (the compressible text is a koo-only
    /// extra: Redis does not compress).
    with_redis: bool,
}

fn random_bytes(n: usize) -> Bytes {
    let mut buf = vec![0u8; n];
    rand::rng().fill(&mut buf[..]);
    Bytes::from(buf)
}

/// Log-like text that zlib shrinks several times over: koo's compressed path
/// (a random value takes the compress-then-store-identity fallback instead).
fn compressible_text(n: usize) -> Bytes {
    const WORDS: &[&str] = &[
        "user",
        "order",
        "status",
        "pending",
        "shipped",
        "id",
        "price",
        "currency",
        "EUR",
        "created_at",
        "items",
        "quantity",
        "true",
        "false",
        "null",
        "customer",
        "address",
        "city",
        "country",
        "total",
    ];
    let mut rng = rand::rng();
    let mut text = String::with_capacity(n + 32);
    while text.len() < n {
        let word = WORDS[rng.random_range(0..WORDS.len())];
        let _ = write!(text, "\"{word}\":{} ", rng.random_range(0..100));
    }
    text.truncate(n);
    Bytes::from(text)
}

/// A connection of either kind; both are cheap to clone and multiplex.
#[derive(Clone)]
enum Conn {
    Koo(CacheServiceClient<Channel>),
    Redis(MultiplexedConnection),
}

/// How an operation went.
enum Outcome {
    /// The Set was stored, or the Get found the value at its full size.
    Ok,
    /// The Get found nothing, or a value of the wrong size.
    Miss,
}

fn ttl_proto() -> prost_types::Duration {
    prost_types::Duration {
        seconds: TTL.as_secs() as i64,
        nanos: 0,
    }
}

fn raw_value(value: &Bytes) -> CacheValue {
    CacheValue {
        kind: Some(Kind::Raw(value.clone())),
    }
}

async fn one_op(conn: &mut Conn, op: Op, key: String, value: &Bytes) -> Result<Outcome, String> {
    let hit = |len: Option<usize>| {
        if len == Some(value.len()) {
            Outcome::Ok
        } else {
            Outcome::Miss
        }
    };
    match (conn, op) {
        (Conn::Koo(client), Op::Set) => {
            let request = SetRequest {
                level: CacheLevel::App as i32,
                key,
                value: Some(raw_value(value)),
                ttl: Some(ttl_proto()),
                ..Default::default()
            };
            client.set(request).await.map_err(|s| s.to_string())?;
            Ok(Outcome::Ok)
        }
        (Conn::Koo(client), Op::Get) => {
            let request = GetRequest {
                level: CacheLevel::App as i32,
                key,
            };
            let reply = client
                .get(request)
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            let len = match reply.value.and_then(|v| v.kind) {
                Some(Kind::Raw(b)) if reply.found => Some(b.len()),
                _ => None,
            };
            Ok(hit(len))
        }
        (Conn::Redis(conn), Op::Set) => {
            let () = redis::cmd("SET")
                .arg(&key)
                .arg(value.as_ref())
                .arg("PX")
                .arg(TTL.as_millis() as u64)
                .query_async(conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Outcome::Ok)
        }
        (Conn::Redis(conn), Op::Get) => {
            let reply: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok(hit(reply.map(|v| v.len())))
        }
    }
}

/// What one task (or, merged, one run) measured.
#[derive(Default)]
struct Stats {
    /// Operations completed without error inside the measured window.
    ops: u64,
    misses: u64,
    errors: u64,
    first_error: Option<String>,
    /// Latency of every measured operation, in microseconds.
    latencies: Vec<u32>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.ops += other.ops;
        self.misses += other.misses;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.extend(other.latencies);
    }
}

/// Loops over `op` until `stop_at`; only operations started at or after
/// `measure_from` count, so the warm-up is excluded.
async fn run_task(
    mut conn: Conn,
    op: Op,
    task: usize,
    value: Bytes,
    measure_from: Instant,
    stop_at: Instant,
) -> Stats {
    let mut stats = Stats {
        latencies: Vec::with_capacity(16 * 1024),
        ..Stats::default()
    };
    for i in 0.. {
        let key = format!("bench:{task}:{}", i % KEYS_PER_TASK);
        let started = Instant::now();
        if started >= stop_at {
            break;
        }
        let outcome = one_op(&mut conn, op, key, &value).await;
        let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        if started < measure_from {
            continue;
        }
        match outcome {
            Ok(outcome) => {
                stats.ops += 1;
                stats.latencies.push(micros);
                if matches!(outcome, Outcome::Miss) {
                    stats.misses += 1;
                }
            }
            Err(e) => {
                stats.errors += 1;
                stats.first_error.get_or_insert(e);
            }
        }
    }
    stats
}

/// Where the servers are, and how to reach them.
struct Endpoints {
    koo: Endpoint,
    redis: redis::Client,
}

impl Endpoints {
    fn new(koo_addr: SocketAddr, redis_url: &str) -> Result<Self> {
        let koo = Endpoint::from_shared(format!("http://{koo_addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        // koo sets TCP_NODELAY on its own Redis connections; redis-rs does not
        // by default. The raw client gets the same, or small replies would
        // wait for Nagle and flatter koo.
        let info = redis_url
            .into_connection_info()?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let redis = redis::Client::open(info)?;
        Ok(Self { koo, redis })
    }

    async fn koo_client(&self) -> Result<CacheServiceClient<Channel>> {
        // Each `connect` opens its own HTTP/2 connection.
        let channel = self.koo.connect().await.context("cannot connect to koo")?;
        Ok(CacheServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    async fn redis_conn(&self) -> Result<MultiplexedConnection> {
        // redis-rs's default 500 ms response timeout would turn a slow moment
        // on a busy machine into errors; koo's own pool has none either.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        self.redis
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .context("cannot connect to Redis")
    }

    async fn conns(&self, target: Target, n: usize) -> Result<Vec<Conn>> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            conns.push(match target {
                Target::Koo => Conn::Koo(self.koo_client().await?),
                Target::Redis => Conn::Redis(self.redis_conn().await?),
            });
        }
        Ok(conns)
    }
}

/// One timed run of one target: fresh connections (one per
/// [`TASKS_PER_CONNECTION`] tasks), `conc` tasks, warm-up, measurement.
async fn run_once(
    endpoints: &Endpoints,
    probe: CpuProbe,
    target: Target,
    op: Op,
    value: &Bytes,
    conc: usize,
    seconds: Duration,
) -> Result<(Stats, Option<CpuWindow>)> {
    let conns = endpoints
        .conns(target, conc.div_ceil(TASKS_PER_CONNECTION))
        .await?;
    let measure_from = Instant::now() + WARMUP;
    let stop_at = measure_from + seconds;
    let tasks: Vec<_> = (0..conc)
        .map(|task| {
            let conn = conns[task / TASKS_PER_CONNECTION].clone();
            tokio::spawn(run_task(
                conn,
                op,
                task,
                value.clone(),
                measure_from,
                stop_at,
            ))
        })
        .collect();
    let cpu = tokio::spawn(sample_cpu(probe, measure_from, stop_at));
    let mut stats = Stats::default();
    for task in tasks {
        stats.merge(task.await.context("a load task panicked")?);
    }
    let cpu = cpu.await.context("the CPU sampler panicked")?;
    Ok((stats, cpu))
}

/// Writes `bench:{task}:{0..KEYS_PER_TASK}` for every task a Get cell can
/// use, untimed, so that every Get hits a value of the cell's size (the Set
/// cells leave keys of whichever size ran last, and not every key when a
/// task's loop was short).
async fn preload(endpoints: &Endpoints, target: Target, value: &Bytes, tasks: usize) -> Result<()> {
    match target {
        Target::Koo => {
            let client = endpoints.koo_client().await?;
            let batches = (0..tasks).flat_map(|task| {
                (0..KEYS_PER_TASK)
                    .step_by(PRELOAD_BATCH)
                    .map(move |start| (task, start))
            });
            futures::stream::iter(batches)
                .map(|(task, start)| {
                    let mut client = client.clone();
                    let entries = (start..(start + PRELOAD_BATCH).min(KEYS_PER_TASK))
                        .map(|i| CacheEntry {
                            level: CacheLevel::App as i32,
                            key: format!("bench:{task}:{i}"),
                            value: Some(raw_value(value)),
                            ttl: Some(ttl_proto()),
                            ..Default::default()
                        })
                        .collect();
                    async move { client.set_many(SetManyRequest { entries }).await }
                })
                .buffer_unordered(4)
                .try_for_each(|_| async { Ok(()) })
                .await
                .context("preloading koo with SetMany failed")?;
        }
        Target::Redis => {
            let mut conn = endpoints.redis_conn().await?;
            for task in 0..tasks {
                let mut pipe = redis::pipe();
                for i in 0..KEYS_PER_TASK {
                    pipe.cmd("SET")
                        .arg(format!("bench:{task}:{i}"))
                        .arg(value.as_ref())
                        .arg("PX")
                        .arg(TTL.as_millis() as u64)
                        .ignore();
                }
                let () = pipe
                    .query_async(&mut conn)
                    .await
                    .context("preloading Redis failed")?;
            }
        }
    }
    Ok(())
}

/// A Set and a Get through koo, retried until koo answers (its Redis
/// connections are made lazily) and the value comes back intact.
async fn check_koo(endpoints: &Endpoints) -> Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let value = random_bytes(64);
    loop {
        let attempt = async {
            let mut client = endpoints.koo_client().await?;
            let key = "bench:ready".to_owned();
            client
                .set(SetRequest {
                    level: CacheLevel::App as i32,
                    key: key.clone(),
                    value: Some(raw_value(&value)),
                    ttl: Some(ttl_proto()),
                    ..Default::default()
                })
                .await?;
            let reply = client
                .get(GetRequest {
                    level: CacheLevel::App as i32,
                    key,
                })
                .await?
                .into_inner();
            match reply.value.and_then(|v| v.kind) {
                Some(Kind::Raw(b)) if reply.found && b == value => Ok(()),
                other => bail!("koo returned {other:?} for a value it was just given"),
            }
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!(
                    "koo did not serve a Set and a Get within {STARTUP_TIMEOUT:?}"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// One run's summary.
struct RunResult {
    throughput: f64,
    stats: Stats,
    /// koo only: (VmRSS after the run, peak RSS during it), in bytes.
    memory: Option<(u64, u64)>,
    cpu: Option<CpuWindow>,
}

/// All repetitions of one cell.
struct Cell {
    op: Op,
    label: &'static str,
    size: usize,
    compressible: bool,
    conc: usize,
    koo: Vec<RunResult>,
    redis: Vec<RunResult>,
}

/// Summary of one target's runs in a cell.
struct Summary {
    /// Median over repetitions.
    throughput: f64,
    per_rep: Vec<f64>,
    /// Over the latencies of every repetition.
    p50: u32,
    p99: u32,
    ops: u64,
    misses: u64,
    errors: u64,
    first_error: Option<String>,
    /// CPU µs per operation of each of [`PROCESSES`], over every rep.
    cpu_us_per_op: Option<[f64; 3]>,
    /// Cores each of [`PROCESSES`] kept busy, on average over every rep.
    cores_busy: Option<[f64; 3]>,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summarise(runs: &[RunResult]) -> Option<Summary> {
    if runs.is_empty() {
        return None;
    }
    let mut latencies: Vec<u32> = runs
        .iter()
        .flat_map(|r| r.stats.latencies.iter().copied())
        .collect();
    latencies.sort_unstable();
    let per_rep: Vec<f64> = runs.iter().map(|r| r.throughput).collect();
    let ops: u64 = runs.iter().map(|r| r.stats.ops).sum();
    // Summed over reps; only when every rep was sampled.
    let cpu = runs.iter().try_fold((0.0, [0.0; 3]), |(wall, cpu), r| {
        let w = r.cpu?;
        Some((
            wall + w.wall,
            [cpu[0] + w.cpu[0], cpu[1] + w.cpu[1], cpu[2] + w.cpu[2]],
        ))
    });
    let cpu_us_per_op = cpu
        .filter(|_| ops > 0)
        .map(|(_, cpu)| cpu.map(|c| c * 1e6 / ops as f64));
    let cores_busy = cpu
        .filter(|(wall, _)| *wall > 0.0)
        .map(|(wall, cpu)| cpu.map(|c| c / wall));
    Some(Summary {
        cpu_us_per_op,
        cores_busy,
        throughput: median(&per_rep),
        per_rep,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        ops: runs.iter().map(|r| r.stats.ops).sum(),
        misses: runs.iter().map(|r| r.stats.misses).sum(),
        errors: runs.iter().map(|r| r.stats.errors).sum(),
        first_error: runs.iter().find_map(|r| r.stats.first_error.clone()),
    })
}

impl Cell {
    /// Median over repetitions of koo's throughput divided by Redis's in the
    /// same repetition (so a noisy repetition affects both sides of its ratio).
    fn ratio(&self) -> Option<f64> {
        if self.redis.is_empty() {
            return None;
        }
        let ratios: Vec<f64> = self
            .koo
            .iter()
            .zip(&self.redis)
            .map(|(k, r)| k.throughput / r.throughput)
            .collect();
        Some(median(&ratios))
    }

    /// Peak koo RSS during this cell's runs.
    fn koo_peak(&self) -> Option<u64> {
        self.koo
            .iter()
            .filter_map(|r| r.memory.map(|(_, peak)| peak))
            .max()
    }

    fn koo_rss_after(&self) -> Option<u64> {
        self.koo.last().and_then(|r| r.memory.map(|(rss, _)| rss))
    }

    fn json(&self, config: &Config) -> serde_json::Value {
        let side = |s: Option<Summary>| {
            s.map(|s| {
                serde_json::json!({
                    "ops_per_sec": s.throughput,
                    "ops_per_sec_per_rep": s.per_rep,
                    "p50_us": s.p50,
                    "p99_us": s.p99,
                    "ops": s.ops,
                    "misses": s.misses,
                    "errors": s.errors,
                    "first_error": s.first_error,
                    "cpu_us_per_op": s.cpu_us_per_op.map(|v| per_process(&v)),
                    "cores_busy": s.cores_busy.map(|v| per_process(&v)),
                })
            })
        };
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        serde_json::json!({
            "bench": "cache",
            "unix_time": unix,
            "op": self.op.name(),
            "size": self.label,
            "size_bytes": self.size,
            "compressible": self.compressible,
            "conc": self.conc,
            "connections": self.conc.div_ceil(TASKS_PER_CONNECTION),
            "seconds": config.seconds.as_secs_f64(),
            "reps": config.reps,
            "quick": config.quick,
            "koo": side(summarise(&self.koo)),
            "redis": side(summarise(&self.redis)),
            "koo_over_redis": self.ratio(),
            "koo_rss_after_bytes": self.koo_rss_after(),
            "koo_peak_rss_bytes": self.koo_peak(),
        })
    }
}

/// `{"client": .., "koo": .., "redis": ..}`.
fn per_process(values: &[f64; 3]) -> serde_json::Value {
    PROCESSES
        .iter()
        .zip(values)
        .map(|(name, v)| ((*name).to_owned(), serde_json::json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn fmt_us(us: u32) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", f64::from(us) / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn table(cells: &[Cell]) -> String {
    let mut out = String::new();
    out.push_str("| op | size | conc | koo ops/s | koo p50 | koo p99 | redis ops/s | redis p50 | redis p99 | koo/redis |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for cell in cells {
        let koo = summarise(&cell.koo);
        let redis = summarise(&cell.redis);
        let cols = |s: &Option<Summary>| match s {
            Some(s) => (format!("{:.0}", s.throughput), fmt_us(s.p50), fmt_us(s.p99)),
            None => ("—".to_owned(), "—".to_owned(), "—".to_owned()),
        };
        let (ko, k50, k99) = cols(&koo);
        let (ro, r50, r99) = cols(&redis);
        let ratio = cell.ratio().map_or("—".to_owned(), |r| format!("{r:.2}x"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {ko} | {k50} | {k99} | {ro} | {r50} | {r99} | {ratio} |",
            cell.op.name(),
            cell.label,
            cell.conc
        );
    }
    out
}

/// Where the CPU went: µs of CPU per operation and cores kept busy, per
/// process, for the koo run and the raw Redis run of each cell.
fn cpu_table(cells: &[Cell]) -> String {
    let mut out = String::new();
    out.push_str(
        "| op | size | conc | koo run: client | koo | redis | raw run: client | redis |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|\n");
    let fmt = |s: &Option<Summary>, i: usize| match s {
        Some(Summary {
            cpu_us_per_op: Some(per_op),
            cores_busy: Some(cores),
            ..
        }) => format!("{:.1} µs ({:.2})", per_op[i], cores[i]),
        _ => "—".to_owned(),
    };
    for cell in cells {
        let koo = summarise(&cell.koo);
        let redis = summarise(&cell.redis);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            cell.op.name(),
            cell.label,
            cell.conc,
            fmt(&koo, 0),
            fmt(&koo, 1),
            fmt(&koo, 2),
            fmt(&redis, 0),
            fmt(&redis, 2),
        );
    }
    out
}

/// Misses and errors, which would make a row's numbers mean something else.
fn anomalies(cells: &[Cell]) -> Vec<String> {
    let mut notes = Vec::new();
    for cell in cells {
        for (name, runs) in [("koo", &cell.koo), ("redis", &cell.redis)] {
            let Some(s) = summarise(runs) else { continue };
            if s.errors > 0 || s.misses > 0 || s.ops == 0 {
                notes.push(format!(
                    "warning: {} {} conc {} on {name}: {} ops, {} misses, {} errors{}",
                    cell.op.name(),
                    cell.label,
                    cell.conc,
                    s.ops,
                    s.misses,
                    s.errors,
                    s.first_error
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    notes
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

async fn run(config: &Config) -> Result<()> {
    let results_dir = config.target_dir.join("bench-results");
    std::fs::create_dir_all(&results_dir)
        .with_context(|| format!("cannot create {}", results_dir.display()))?;
    let results_path = results_dir.join("cache.jsonl");
    let mut results = File::create(&results_path)
        .with_context(|| format!("cannot create {}", results_path.display()))?;

    eprintln!("starting {} ...", config.redis_server);
    // Declared before koo so that koo is dropped (killed) first and does not
    // spend its last moments logging that Redis went away.
    let mut redis = start_redis(
        &config.redis_server,
        &config.tmp_dir(),
        // What koo recommends for a cache Redis (it warns otherwise).
        // Without a maxmemory nothing is evicted, so it costs nothing.
        &["--maxmemory-policy", "allkeys-lru"],
    )
    .await?;
    eprintln!(
        "redis-server {} (pid {}) at {}",
        redis.version,
        redis.guard.pid(),
        redis.url
    );
    // KOO_BENCH_BIN: another build of koo (to compare old and new in one run)
    let bin =
        std::env::var("KOO_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_koo").to_owned());
    let mut koo = start_koo(&bin, &["--redis-url", &redis.url], &[])?;
    eprintln!("koo (pid {}) serving at {}", koo.guard.pid(), koo.addr);
    let endpoints = Endpoints::new(koo.addr, &redis.url)?;
    check_koo(&endpoints)
        .await
        .map_err(|e| anyhow!("{e:#}; koo's log ends with:\n{}", koo.recent_log()))?;

    let payloads = if config.quick {
        vec![Payload {
            label: "100B",
            value: random_bytes(100),
            compressible: false,
            with_redis: true,
        }]
    } else {
        vec![
            Payload {
                label: "100B",
                value: random_bytes(100),
                compressible: false,
                with_redis: true,
            },
            Payload {
                label: "4KiB",
                value: random_bytes(4096),
                compressible: false,
                with_redis: true,
            },
            Payload {
                label: "4KiB-text",
                value: compressible_text(4096),
                compressible: true,
                with_redis: false,
            },
        ]
    };
    let concurrencies: &[usize] = if config.quick { &[16] } else { &[1, 16, 64] };
    let max_conc = concurrencies.iter().copied().max().unwrap_or(1);

    let mut memory = MemoryTracker::new(koo.guard.pid());
    let probe = CpuProbe::new(koo.guard.pid(), redis.guard.pid());
    let mut cells = Vec::new();
    for op in [Op::Set, Op::Get] {
        for payload in &payloads {
            if op == Op::Get {
                eprintln!("preloading {} values for Get ...", payload.label);
                preload(&endpoints, Target::Koo, &payload.value, max_conc).await?;
                if payload.with_redis {
                    preload(&endpoints, Target::Redis, &payload.value, max_conc).await?;
                }
            }
            for &conc in concurrencies {
                let mut cell = Cell {
                    op,
                    label: payload.label,
                    size: payload.value.len(),
                    compressible: payload.compressible,
                    conc,
                    koo: Vec::new(),
                    redis: Vec::new(),
                };
                for rep in 0..config.reps {
                    // koo first in even repetitions, Redis first in odd ones,
                    // so neither always runs on the warmer (or noisier) turn.
                    let order: &[Target] = match (payload.with_redis, rep % 2) {
                        (false, _) => &[Target::Koo],
                        (true, 0) => &[Target::Koo, Target::Redis],
                        (true, _) => &[Target::Redis, Target::Koo],
                    };
                    for &target in order {
                        if target == Target::Koo {
                            memory.before_run();
                        }
                        let (stats, cpu) = run_once(
                            &endpoints,
                            probe,
                            target,
                            op,
                            &payload.value,
                            conc,
                            config.seconds,
                        )
                        .await?;
                        koo.check_alive()?;
                        let result = RunResult {
                            throughput: stats.ops as f64 / config.seconds.as_secs_f64(),
                            stats,
                            cpu,
                            memory: if target == Target::Koo {
                                memory.after_run()
                            } else {
                                None
                            },
                        };
                        match target {
                            Target::Koo => cell.koo.push(result),
                            Target::Redis => cell.redis.push(result),
                        }
                    }
                }
                redis.guard.check_alive()?;
                let progress = |runs: &[RunResult]| {
                    summarise(runs)
                        .map_or("—".to_owned(), |s| format!("{:.0} ops/s", s.throughput))
                };
                eprintln!(
                    "{} {} conc {}: koo {}, redis {}",
                    op.name(),
                    payload.label,
                    conc,
                    progress(&cell.koo),
                    progress(&cell.redis)
                );
                writeln!(results, "{}", cell.json(config))
                    .and_then(|()| results.flush())
                    .with_context(|| format!("cannot write {}", results_path.display()))?;
                cells.push(cell);
            }
        }
    }
    let whole_run_peak = memory.finish();
    report(
        config,
        &cells,
        whole_run_peak,
        memory.per_cell_reset,
        &redis.version,
        &results_path,
    );
    Ok(())
}

fn report(
    config: &Config,
    cells: &[Cell],
    whole_run_peak: u64,
    per_cell_peaks: bool,
    redis_version: &str,
    path: &Path,
) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("## koo cache benchmark");
    println!();
    println!(
        "{:.1} s measured per run after {} ms warm-up, {} rep(s){}; one connection per {TASKS_PER_CONNECTION} tasks; \
         Redis {redis_version}; {cores} CPU(s) shared by the load generator, koo and Redis.",
        config.seconds.as_secs_f64(),
        WARMUP.as_millis(),
        config.reps,
        if config.quick { ", BENCH_QUICK" } else { "" },
    );
    println!(
        "ops/s is the median over reps; p50/p99 are over every rep's latencies; koo/redis is the median of per-rep ratios."
    );
    println!(
        "koo Set = SET key value PX on Redis after encoding (values > 1 KiB are zlib-compressed, kept only if smaller); \
         koo Get = a pipelined GET+PTTL (one round trip) plus decoding; raw Redis Get = plain GET, Set = SET key value PX 3600000."
    );
    println!("4KiB-text is compressible text, koo only.");
    println!();
    print!("{}", table(cells));
    println!();
    println!(
        "CPU per operation over the measured windows, from /proc/<pid>/stat (user + system, all threads), \
         with the cores kept busy in brackets; `client` is this load generator:"
    );
    println!();
    print!("{}", cpu_table(cells));
    println!();
    for note in anomalies(cells) {
        println!("{note}");
    }

    let big = |c: &&Cell| c.conc == 64 && c.size == 4096;
    let mut after: Vec<String> = Vec::new();
    let mut goal_peak: Option<u64> = None;
    for cell in cells.iter().filter(big) {
        if let Some(rss) = cell.koo_rss_after() {
            after.push(format!(
                "{} {} {:.1} MiB",
                cell.op.name(),
                cell.label,
                mib(rss)
            ));
        }
        if let Some(peak) = cell.koo_peak() {
            goal_peak = Some(goal_peak.map_or(peak, |p| p.max(peak)));
        }
    }
    let includes = if cells.iter().any(|c| c.conc == 64 && c.size == 4096) {
        "which includes conc 64 with 4 KiB values and the untimed preloads"
    } else {
        "which includes the untimed preloads"
    };
    println!(
        "koo peak RSS (VmHWM over the whole run, {includes}): {:.1} MiB",
        mib(whole_run_peak)
    );
    if !after.is_empty() {
        println!(
            "koo VmRSS right after the conc-64 4 KiB cells: {}",
            after.join(", ")
        );
    }

    let ratios: Vec<(String, f64)> = cells
        .iter()
        .filter(|c| c.conc == 16 && (c.label == "100B" || c.label == "4KiB"))
        .filter_map(|c| Some((format!("{} {}", c.op.name(), c.label), c.ratio()?)))
        .collect();
    let listed = ratios
        .iter()
        .map(|(name, r)| format!("{name} {r:.2}x"))
        .collect::<Vec<_>>()
        .join(", ");
    let verdict = if ratios.is_empty() {
        "SKIP (no conc-16 cells)"
    } else if ratios.iter().all(|(_, r)| *r >= 0.5) {
        "PASS"
    } else {
        "FAIL"
    };
    println!("goal: koo >= 0.5x raw Redis throughput at concurrency 16: {listed} {verdict}");

    // The per-cell peak (VmHWM reset before each koo run) is the precise
    // figure; without the reset, fall back to the whole-run peak, which can
    // only be higher.
    let (measured, what) = match goal_peak {
        Some(p) if per_cell_peaks => (Some(p), "peak during those cells"),
        Some(_) => (Some(whole_run_peak), "whole-run peak"),
        None => (None, ""),
    };
    match measured {
        Some(bytes) => println!(
            "goal: koo < 64 MiB resident at concurrency 64 with 4 KiB values: {:.1} MiB ({what}) {}",
            mib(bytes),
            if bytes < 64 << 20 { "PASS" } else { "FAIL" }
        ),
        None => println!(
            "goal: koo < 64 MiB resident at concurrency 64 with 4 KiB values: not measured{} SKIP",
            if config.quick { " (BENCH_QUICK)" } else { "" }
        ),
    }
    println!();
    println!("results: {}", path.display());
}
