//! Scaling benchmark (issue 20): koo nodes on a local Redis Cluster.
//!
//! Starts six `redis-server --cluster-enabled yes` processes on loopback
//! ports, joins them with `redis-cli --cluster create --cluster-replicas 1`
//! (three masters, three replicas), then for 1, 2 and 3 `koo serve` nodes
//! (each with its built-in workers, all on the Cluster) measures:
//!
//! - **tasks**: `BENCH_TASKS` (default 20,000) no-op tasks spread over six
//!   queues (`KOO_TASK_QUEUES`, whose hash tags put them on every master),
//!   submitted in batches of 100 to the nodes in turn; timed from the
//!   first submit to the last SUCCEEDED event seen (a `WatchTasks` stream on
//!   every node, each counting its own share of the queues' events);
//! - **cache**: `BENCH_CACHE_SECONDS` (default 5) of 100 B `Get`s and `Set`s
//!   (9:1) on 10,000 keys, `BENCH_CACHE_CONCURRENCY` (default 16) calls in
//!   flight per node;
//!
//! and for each: throughput, the scaling efficiency (throughput / (nodes x
//! one node's)), and the CPU per task or call of every koo node and of the
//! Redis processes together (replicas included: replication costs CPU). On
//! a machine with fewer cores than processes the curve is bounded by the
//! machine, not by koo or Redis; the CPU figures let it be read past that:
//! with C cores for koo, tasks/s <= C / (koo CPU per task).
//!
//! `BENCH_NODES` (default `1,2,3`), `BENCH_REPS` (default 1), `BENCH_TOPOLOGY=single`
//! (one plain redis-server instead of the Cluster, for comparison). One JSON line
//! per measurement on stdout (and `target/bench-results/scale.jsonl`),
//! a table at the end; progress on stderr.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use koo::pb::cache::v1::cache_service_client::CacheServiceClient;
use koo::pb::cache::v1::{CacheLevel, CacheValue, GetRequest, SetRequest, cache_value};
use koo::pb::tasks::v1::task_service_client::TaskServiceClient;
use koo::pb::tasks::v1::{SubmitTaskRequest, SubmitTasksRequest, TaskCategory, WatchTasksRequest};
use tonic::transport::{Channel, Endpoint};

mod support;
use support::cluster::Cluster;
use support::{KooServer, cpu_seconds, env_usize, start_koo};

const NOOP: &str = "koo.diagnostics.noop";
const BATCH: usize = 100;
const IN_FLIGHT_PER_NODE: usize = 4;
/// Six queues; their hash tags `{t:scale-N}` land on all three masters of a
/// fresh cluster (checked at start and printed).
const QUEUES: [&str; 6] = [
    "scale-a", "scale-b", "scale-c", "scale-d", "scale-e", "scale-f",
];

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

struct Node {
    koo: KooServer,
    tasks: TaskServiceClient<Channel>,
    cache: CacheServiceClient<Channel>,
}

async fn start_nodes(n: usize, url: &str, prefix: &str) -> Result<Vec<Node>> {
    let queues = QUEUES.join(",");
    let mut nodes = Vec::new();
    for _ in 0..n {
        let koo = start_koo(
            &support::koo_bin(),
            &[
                "--redis-url",
                url,
                "--prefix",
                prefix,
                "--task-queues",
                &queues,
            ],
            &[("KOO_LOG", "warn")],
        )?;
        let channel = Endpoint::from_shared(format!("http://{}", koo.addr))?
            .connect()
            .await
            .context("cannot connect to koo")?;
        nodes.push(Node {
            koo,
            tasks: TaskServiceClient::new(channel.clone()),
            cache: CacheServiceClient::new(channel).max_decoding_message_size(1 << 20),
        });
    }
    Ok(nodes)
}

fn noop(queue: &str) -> SubmitTaskRequest {
    SubmitTaskRequest {
        name: NOOP.into(),
        category: TaskCategory::Research as i32,
        queue: queue.into(),
        ..Default::default()
    }
}

/// Submits `n` no-ops over the queues and nodes; seconds until every
/// SUCCEEDED event was seen.
async fn tasks_e2e(nodes: &[Node], n: usize) -> Result<f64> {
    // one watcher (on node 0) over every queue: events are read from Redis,
    // so any node sees every node's completions
    let mut watch = nodes[0]
        .tasks
        .clone()
        .watch_tasks(WatchTasksRequest {
            categories: vec![],
            name: NOOP.into(),
            resume_token: String::new(),
        })
        .await?
        .into_inner();
    let started = Instant::now();
    let batches = n.div_ceil(BATCH);
    let clients: Vec<_> = nodes.iter().map(|n| n.tasks.clone()).collect();
    let in_flight = IN_FLIGHT_PER_NODE * clients.len();
    let submit = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(n);
        let mut pending = futures::stream::iter((0..batches).map(|b| {
            let mut client = clients[b % clients.len()].clone();
            let queue = QUEUES[b % QUEUES.len()];
            let size = BATCH.min(n - b * BATCH);
            async move {
                client
                    .submit_tasks(SubmitTasksRequest {
                        tasks: (0..size).map(|_| noop(queue)).collect(),
                    })
                    .await
            }
        }))
        .buffer_unordered(in_flight);
        while let Some(reply) = pending.next().await {
            ids.extend(reply?.into_inner().tasks.into_iter().map(|t| t.id));
        }
        Ok::<_, tonic::Status>(ids)
    });
    let done = support::await_successes(&mut watch, n).await?;
    let seconds = started.elapsed().as_secs_f64();
    let ids = submit.await??;
    let missing = ids.iter().filter(|id| !done.contains(*id)).count();
    if missing > 0 {
        bail!("{missing} submitted tasks never completed");
    }
    Ok(seconds)
}

fn value() -> Option<CacheValue> {
    Some(CacheValue {
        kind: Some(cache_value::Kind::Raw(vec![7u8; 100].into())),
    })
}

/// The keys `cache_mix` reads, written before its CPU window.
async fn preload(nodes: &[Node]) -> Result<()> {
    for i in 0..10_000u32 {
        let mut c = nodes[i as usize % nodes.len()].cache.clone();
        c.set(SetRequest {
            level: CacheLevel::Api as i32,
            key: format!("k{i}"),
            value: value(),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

/// Gets and Sets (9:1) for `seconds` from every node at once: calls.
async fn cache_mix(nodes: &[Node], seconds: f64, concurrency: usize) -> Result<(u64, u64)> {
    let calls = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut workers = Vec::new();
    for node in nodes {
        for w in 0..concurrency {
            let mut c = node.cache.clone();
            let (calls, errors) = (calls.clone(), errors.clone());
            workers.push(tokio::spawn(async move {
                let mut i = w as u64 * 7919;
                while Instant::now() < until {
                    i = i.wrapping_add(1);
                    let key = format!("k{}", i % 10_000);
                    let ok = if i.is_multiple_of(10) {
                        c.set(SetRequest {
                            level: CacheLevel::Api as i32,
                            key,
                            value: value(),
                            ..Default::default()
                        })
                        .await
                        .is_ok()
                    } else {
                        c.get(GetRequest {
                            level: CacheLevel::Api as i32,
                            key,
                        })
                        .await
                        .is_ok()
                    };
                    if ok {
                        calls.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for w in workers {
        w.await?;
    }
    Ok((
        calls.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
    ))
}

fn emit(line: serde_json::Value, out: &mut std::fs::File) {
    println!("{line}");
    let _ = writeln!(out, "{line}");
}

async fn run() -> Result<()> {
    let tasks = env_usize("BENCH_TASKS", 20_000)?;
    let reps = env_usize("BENCH_REPS", 1)?.max(1);
    let cache_seconds = env_usize("BENCH_CACHE_SECONDS", 5)? as f64;
    let concurrency = env_usize("BENCH_CACHE_CONCURRENCY", 16)?;
    let node_counts: Vec<usize> = std::env::var("BENCH_NODES")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
        .map(|s| s.trim().parse().context("BENCH_NODES is a list of numbers"))
        .collect::<Result<_>>()?;
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tmp");
    let results = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("bench-results");
    std::fs::create_dir_all(&results)?;
    let mut out = std::fs::File::create(results.join("scale.jsonl"))?;

    let single = std::env::var("BENCH_TOPOLOGY").is_ok_and(|t| t == "single");
    let cluster = if single {
        Cluster::single(&tmp).await?
    } else {
        Cluster::start(&tmp).await?
    };
    let url = cluster.url();
    eprintln!("cluster: {url}");
    for (q, at) in cluster.placement(&QUEUES).await? {
        eprintln!("  queue {q}: {at}");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut table = Vec::new();
    for &n in &node_counts {
        for rep in 1..=reps {
            let prefix = format!("kscale{}n{n}r{rep}", std::process::id());
            let mut nodes = start_nodes(n, &url, &prefix).await?;
            tasks_e2e(&nodes, 600).await?; // warm-up: scripts loaded everywhere
            let cpu = |nodes: &[Node]| -> Vec<f64> {
                nodes
                    .iter()
                    .map(|n| cpu_seconds(n.koo.guard.pid()).unwrap_or(f64::NAN))
                    .collect()
            };
            cluster.reset_stats().await?;
            let (koo0, redis0) = (cpu(&nodes), cluster.cpu());
            let seconds = tasks_e2e(&nodes, tasks).await?;
            let (koo1, redis1) = (cpu(&nodes), cluster.cpu());
            let commands = cluster.commands_per(tasks).await?;
            let per = |a: f64, b: f64, k: usize| (a - b) * 1e6 / k as f64;
            let koo_per_node: Vec<f64> = koo1
                .iter()
                .zip(&koo0)
                .map(|(a, b)| per(*a, *b, tasks))
                .collect();
            let tps = tasks as f64 / seconds;
            emit(
                serde_json::json!({
                    "mode": "tasks", "topology": if single { "single" } else { "cluster" }, "nodes": n, "rep": rep, "n": tasks, "queues": QUEUES.len(),
                    "cores": cores, "tasks_per_s": tps,
                    "cpu_us_per_task": {
                        "koo_per_node": koo_per_node,
                        "koo_total": koo_per_node.iter().sum::<f64>(),
                        "redis_total": per(redis1, redis0, tasks),
                    },
                    "redis_calls_per_task": commands,
                }),
                &mut out,
            );
            preload(&nodes).await?;
            let (koo0, redis0) = (cpu(&nodes), cluster.cpu());
            let (calls, errors) = cache_mix(&nodes, cache_seconds, concurrency).await?;
            let (koo1, redis1) = (cpu(&nodes), cluster.cpu());
            let ops = calls as f64 / cache_seconds;
            let koo_cache: Vec<f64> = koo1
                .iter()
                .zip(&koo0)
                .map(|(a, b)| per(*a, *b, calls.max(1) as usize))
                .collect();
            emit(
                serde_json::json!({
                    "mode": "cache", "topology": if single { "single" } else { "cluster" }, "nodes": n, "rep": rep, "seconds": cache_seconds,
                    "concurrency_per_node": concurrency, "get_set": "9:1", "value_bytes": 100,
                    "ops_per_s": ops, "errors": errors,
                    "cpu_us_per_call": {
                        "koo_per_node": koo_cache,
                        "redis_total": per(redis1, redis0, calls.max(1) as usize),
                    },
                }),
                &mut out,
            );
            if errors > 0 {
                bail!("{errors} cache calls failed");
            }
            for node in &mut nodes {
                node.koo.check_alive()?;
            }
            table.push((n, tps, ops, koo_per_node.iter().sum::<f64>() / n as f64));
            drop(nodes);
        }
    }
    let base = |f: fn(&(usize, f64, f64, f64)) -> f64| {
        let ones: Vec<f64> = table.iter().filter(|r| r.0 == 1).map(f).collect();
        ones.iter().sum::<f64>() / ones.len().max(1) as f64
    };
    let (t1, c1) = (base(|r| r.1), base(|r| r.2));
    eprintln!(
        "\nnodes  tasks/s  efficiency  koo CPU/task/node (us)  cache ops/s  efficiency   ({cores} cores)"
    );
    for (n, tps, ops, cpu) in &table {
        eprintln!(
            "{n:>5}  {tps:>7.0}  {:>10.2}  {cpu:>22.1}  {ops:>11.0}  {:>10.2}",
            tps / (t1 * *n as f64),
            ops / (c1 * *n as f64)
        );
    }
    Ok(())
}
