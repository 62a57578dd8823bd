//! Flow control's benchmark (issue 18): no-op tasks through real `koo serve`
//! processes and their built-in workers, on Redis.
//!
//! - **flow_rate**: two `koo serve` processes on one Redis (4 built-in
//!   slots each), a rate limit of `BENCH_FLOW_RATE` per second (default
//!   1,000) on `keys/bench`, once per burst of `BENCH_FLOW_BURSTS` (default
//!   `1,10`: with a burst of 1 every lease that comes late by d stretches
//!   the spacing to `T + d`, as GCRA's `TAT = max(TAT, now) + T` says;
//!   a burst absorbs that lateness), and `BENCH_FLOW_RATE_TASKS` (default
//!   1.3 × 10 s of tokens) no-ops with rate-limit key `bench`, submitted
//!   through both. The starts (every task's RUNNING event, by WatchTasks,
//!   stamped with the store's clock) are counted over the
//!   `BENCH_FLOW_WINDOW` seconds (default 10) after the first one: the
//!   achieved rate and its error against the limit (the goal:
//!   within 5 %), and the most starts in any one second.
//! - **flow_keys**: one `koo serve`, `BENCH_FLOW_TASKS` (default 10,000)
//!   no-ops spread over `BENCH_FLOW_KEYS` (default 1,000) concurrency keys
//!   with a cap of `BENCH_FLOW_CAP` (default 2) each (`keys/*`), against the
//!   same run without keys, alternating `BENCH_REPS` times (default 3):
//!   each run's throughput (every task's SUCCEEDED event seen) and the
//!   median keyed/plain ratio.
//!
//! Redis: its own `redis-server` on a free port; with
//! `BENCH_TOPOLOGY=cluster`, its own Redis Cluster of three masters and
//! three replicas (flow control's reservations: `flow_cluster.rs`); or
//! `KOO_BENCH_REDIS_URL`, where koo's keys get a prefix of their own and are
//! deleted afterwards (not on a Cluster URL: give a fresh one).
//! `BENCH_FLOW_MODES` (default `rate,keys`) picks the modes. One JSON line
//! per measurement goes to stdout (and `target/bench-results/flow.jsonl`);
//! progress to stderr. `scripts/bench-flow` runs it.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt as _;
use koo::pb::tasks::v1::task_service_client::TaskServiceClient;
use koo::pb::tasks::v1::{
    ConcurrencyLimit, ConcurrencyPolicy, RateLimit, SetConcurrencyLimitRequest,
    SetRateLimitRequest, SubmitTaskRequest, SubmitTasksRequest, TaskCategory, TaskState,
    WatchTasksRequest,
};
use tonic::transport::{Channel, Endpoint};

mod support;
use support::{env_usize, start_koo, start_redis};

const NOOP: &str = "koo.diagnostics.noop";
const BATCH: usize = 100;
const IN_FLIGHT: usize = 4;
/// The rate-limit key of the flow_rate mode.
const RATE_KEY: &str = "bench";

fn emit(line: serde_json::Value, out: &mut std::fs::File) {
    println!("{line}");
    let _ = writeln!(out, "{line}");
}

/// A no-op with flow keys (empty: none).
fn noop(rate_key: &str, cc_key: String) -> SubmitTaskRequest {
    SubmitTaskRequest {
        name: NOOP.into(),
        category: TaskCategory::Research as i32,
        rate_limit_key: rate_key.into(),
        concurrency_key: cc_key,
        ..Default::default()
    }
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let modes = std::env::var("BENCH_FLOW_MODES").unwrap_or_else(|_| "rate,keys".into());
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let results = tmp.parent().unwrap_or(tmp).join("bench-results");
    std::fs::create_dir_all(&results)?;
    let mut out = std::fs::File::create(results.join("flow.jsonl"))?;
    let own;
    let own_cluster;
    let topology = std::env::var("BENCH_TOPOLOGY").unwrap_or_else(|_| "single".into());
    let label = std::env::var("BENCH_LABEL").unwrap_or_else(|_| topology.clone());
    let url = match std::env::var("KOO_BENCH_REDIS_URL") {
        Ok(url) => url,
        Err(_) if topology == "cluster" => {
            own_cluster = support::cluster::Cluster::start(&tmp.join("tmp")).await?;
            own_cluster.url()
        }
        Err(_) => {
            let server =
                std::env::var("KOO_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            own = start_redis(
                &server,
                &tmp.join("tmp"),
                &["--maxmemory-policy", "noeviction"],
            )
            .await?;
            own.url.clone()
        }
    };
    let mut prefixes = Vec::new();
    if modes.split(',').any(|m| m.trim() == "rate") {
        let bursts = std::env::var("BENCH_FLOW_BURSTS").unwrap_or_else(|_| "1,10".into());
        for burst in bursts.split(',') {
            let burst: u32 = burst
                .trim()
                .parse()
                .with_context(|| format!("BENCH_FLOW_BURSTS: {burst:?} is not a number"))?;
            // fresh processes and keys for each: no task of a run is left
            // to compete with the next
            let prefix = format!("kflowr{}b{burst}", std::process::id());
            prefixes.push(prefix.clone());
            rate_mode(&url, &prefix, burst, &label, &mut out).await?;
        }
    }
    if modes.split(',').any(|m| m.trim() == "keys") {
        let prefix = format!("kflowk{}", std::process::id());
        prefixes.push(prefix.clone());
        keys_mode(&url, &prefix, &label, &mut out).await?;
    }
    if url.contains("+cluster://") {
        return Ok(()); // (a walk of every master: a fresh Cluster is simpler)
    }
    cleanup(&url, &prefixes).await
}

/// A client of a koo serve.
async fn connect(koo: &support::KooServer) -> Result<TaskServiceClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{}", koo.addr))?
        .connect()
        .await
        .context("cannot connect to koo")?;
    Ok(TaskServiceClient::new(channel))
}

fn serve(url: &str, prefix: &str) -> Result<support::KooServer> {
    start_koo(
        &support::koo_bin(),
        &["--redis-url", url, "--prefix", prefix],
        &[("KOO_LOG", "warn")],
    )
}

/// Submits `reqs` in batches of 100, `IN_FLIGHT` at once, round `clients`:
/// the ids.
async fn submit_all(
    clients: &[TaskServiceClient<Channel>],
    reqs: Vec<SubmitTaskRequest>,
) -> Result<Vec<String>> {
    let batches: Vec<Vec<SubmitTaskRequest>> = reqs.chunks(BATCH).map(<[_]>::to_vec).collect();
    let mut pending = futures::stream::iter(batches.into_iter().enumerate().map(|(i, tasks)| {
        let mut c = clients[i % clients.len()].clone();
        async move { c.submit_tasks(SubmitTasksRequest { tasks }).await }
    }))
    .buffer_unordered(IN_FLIGHT);
    let mut ids = Vec::new();
    while let Some(reply) = pending.next().await {
        ids.extend(reply?.into_inner().tasks.into_iter().map(|t| t.id));
    }
    Ok(ids)
}

/// A WatchTasks stream of the no-ops (every process's events: they are the
/// store's).
async fn watch(
    client: &TaskServiceClient<Channel>,
) -> Result<tonic::Streaming<koo::pb::tasks::v1::WatchTasksResponse>> {
    Ok(client
        .clone()
        .watch_tasks(WatchTasksRequest {
            categories: vec![TaskCategory::Research as i32],
            name: NOOP.into(),
            resume_token: String::new(),
        })
        .await?
        .into_inner())
}

fn ms_of(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// The rate limit across two processes: starts over the window.
async fn rate_mode(
    url: &str,
    prefix: &str,
    burst: u32,
    label: &str,
    out: &mut std::fs::File,
) -> Result<()> {
    let rate = env_usize("BENCH_FLOW_RATE", 1000)? as u32;
    let window_s = env_usize("BENCH_FLOW_WINDOW", 10)? as i64;
    let n = env_usize(
        "BENCH_FLOW_RATE_TASKS",
        rate as usize * window_s as usize * 13 / 10,
    )?;
    let mut a = serve(url, prefix)?;
    let mut b = serve(url, prefix)?;
    let clients = [connect(&a).await?, connect(&b).await?];
    eprintln!(
        "flow_rate: koo {} and {} on {url} (prefix {prefix}), {rate}/s (burst {burst}) on keys/{RATE_KEY}, {n} tasks",
        a.addr, b.addr
    );
    clients[0]
        .clone()
        .set_rate_limit(SetRateLimitRequest {
            rate_limit: Some(RateLimit {
                name: format!("keys/{RATE_KEY}"),
                limit: rate,
                period: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                burst,
                ..Default::default()
            }),
        })
        .await
        .context("SetRateLimit")?;
    let mut events = watch(&clients[0]).await?;
    let reqs = (0..n).map(|_| noop(RATE_KEY, String::new())).collect();
    let submit = {
        let clients = clients.clone();
        tokio::spawn(async move { submit_all(&clients, reqs).await })
    };
    let window_ms = window_s * 1000;
    let mut starts: Vec<i64> = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(window_s as u64 + 120);
    loop {
        let e = tokio::time::timeout_at(deadline, events.message())
            .await
            .map_err(|_| anyhow!("the window never closed: {} starts seen", starts.len()))??
            .ok_or_else(|| anyhow!("WatchTasks ended"))?;
        let Some(at) = ms_of(&e.event_time) else {
            continue;
        };
        if e.state == TaskState::Running as i32 {
            starts.push(at);
        }
        // an event this far past the first start: the window is closed
        if let Some(first) = starts.iter().min()
            && at >= first + window_ms + 200
        {
            break;
        }
    }
    let ids = submit.await??;
    a.check_alive()?;
    b.check_alive()?;
    starts.sort_unstable();
    let first = starts[0];
    let started = starts.iter().filter(|&&s| s < first + window_ms).count();
    let mut most = 0;
    let mut lo = 0;
    for hi in 0..starts.len() {
        while starts[hi] - starts[lo] >= 1000 {
            lo += 1;
        }
        most = most.max(hi - lo + 1);
    }
    let achieved = started as f64 / window_s as f64;
    let error_pct = (achieved - f64::from(rate)) / f64::from(rate) * 100.0;
    emit(
        serde_json::json!({
            "system": "koo", "mode": "flow_rate", "label": label, "processes": 2,
            "limit_per_s": rate, "burst": burst, "window_s": window_s, "submitted": ids.len(),
            "started_in_window": started, "rate_per_s": achieved, "error_pct": error_pct,
            "max_in_one_s": most, "goal": "within 5 % of the limit",
            "met": error_pct.abs() <= 5.0,
            "observed": "every task's RUNNING event time (the store's clock), by WatchTasks",
        }),
        out,
    );
    Ok(())
}

/// Throughput with many concurrency keys against the same run without.
async fn keys_mode(url: &str, prefix: &str, label: &str, out: &mut std::fs::File) -> Result<()> {
    let n = env_usize("BENCH_FLOW_TASKS", 10_000)?;
    let keys = env_usize("BENCH_FLOW_KEYS", 1000)?.max(1);
    let cap = env_usize("BENCH_FLOW_CAP", 2)? as u32;
    let reps = env_usize("BENCH_REPS", 3)?.max(1);
    let mut koo = serve(url, prefix)?;
    let client = connect(&koo).await?;
    eprintln!(
        "flow_keys: koo {} on {url} (prefix {prefix}), {n} tasks over {keys} keys, cap {cap}",
        koo.addr
    );
    client
        .clone()
        .set_concurrency_limit(SetConcurrencyLimitRequest {
            concurrency_limit: Some(ConcurrencyLimit {
                name: "keys/*".into(),
                max_running: cap,
                policy: ConcurrencyPolicy::Wait as i32,
                ..Default::default()
            }),
        })
        .await
        .context("SetConcurrencyLimit")?;
    // warm-up: scripts loaded, connections open
    e2e(&client, 500, 0).await?;
    let (mut plain, mut keyed) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        for k in [0, keys] {
            koo.check_alive()?;
            let seconds = e2e(&client, n, k).await?;
            let tps = n as f64 / seconds;
            let runs = if k == 0 { &mut plain } else { &mut keyed };
            runs.push(tps);
            emit(
                serde_json::json!({
                    "system": "koo", "mode": "flow_keys", "label": label, "rep": rep, "n": n,
                    "keys": k, "cap": if k == 0 { 0 } else { cap }, "seconds": seconds,
                    "tasks_per_s": tps, "worker": "the built-in workers (4 slots)",
                    "observed": "every task's SUCCEEDED event, by WatchTasks",
                }),
                out,
            );
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, k) = (median(&mut plain), median(&mut keyed));
    emit(
        serde_json::json!({
            "system": "koo", "mode": "flow_keys_summary", "label": label, "reps": reps,
            "keys": keys, "cap": cap, "plain_tasks_per_s": p, "keyed_tasks_per_s": k,
            "keyed_over_plain": k / p,
        }),
        out,
    );
    Ok(())
}

/// Submits `n` no-ops (over `keys` concurrency keys, none when 0) and waits
/// for every one's SUCCEEDED event: seconds to the last completion.
async fn e2e(client: &TaskServiceClient<Channel>, n: usize, keys: usize) -> Result<f64> {
    let mut events = watch(client).await?;
    let started = Instant::now();
    let reqs = (0..n)
        .map(|i| {
            let key = if keys == 0 {
                String::new()
            } else {
                format!("k{}", i % keys)
            };
            noop("", key)
        })
        .collect();
    let submit = {
        let clients = [client.clone()];
        tokio::spawn(async move { submit_all(&clients, reqs).await })
    };
    let done = support::await_successes(&mut events, n).await?;
    let seconds = started.elapsed().as_secs_f64();
    let ids = submit.await??;
    let missing = ids.iter().filter(|id| !done.contains(*id)).count();
    if missing > 0 || ids.len() != n {
        bail!("{missing} submitted tasks were not seen succeeding");
    }
    Ok(seconds)
}

/// Removes what koo wrote (only its own prefixes: the Redis may be shared).
async fn cleanup(url: &str, prefixes: &[String]) -> Result<()> {
    let redis = redis::Client::open(url)?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    for prefix in prefixes {
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
