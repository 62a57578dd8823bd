//! A local Redis Cluster for the benchmarks (`scale`, `tasks_flow`):
//! three masters and three replicas (`redis-server --cluster-enabled yes`
//! on free loopback ports, joined by `redis-cli --cluster create`), or one
//! plain server for comparison.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{RedisServer, cpu_seconds, start_redis};

pub struct Cluster {
    pub nodes: Vec<RedisServer>,
    /// One plain server instead (`BENCH_TOPOLOGY=single`), for comparison.
    single: bool,
}

impl Cluster {
    /// One `redis-server`, not a Cluster: the same workload for comparison.
    pub async fn single(tmp: &Path) -> Result<Self> {
        let server =
            std::env::var("KOO_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let node = start_redis(&server, tmp, &["--maxmemory-policy", "noeviction"]).await?;
        Ok(Self {
            nodes: vec![node],
            single: true,
        })
    }

    pub async fn start(tmp: &Path) -> Result<Self> {
        let server =
            std::env::var("KOO_BENCH_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut nodes = Vec::new();
        for i in 0..6 {
            let dir = tmp.join(format!("scale-node-{i}-{}", std::process::id()));
            let conf = dir.join("nodes.conf");
            std::fs::create_dir_all(&dir)?;
            let _ = std::fs::remove_file(&conf);
            let conf = conf.to_string_lossy().into_owned();
            // a bus port of its own: the default, port + 10000, can be taken
            // or past 65535 for a high ephemeral port
            let bus = super::free_port()?.to_string();
            nodes.push(
                start_redis(
                    &server,
                    &dir,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf,
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-port",
                        &bus,
                        "--maxmemory-policy",
                        "noeviction",
                    ],
                )
                .await?,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| {
                n.url
                    .trim_start_matches("redis://")
                    .trim_end_matches("/0")
                    .to_owned()
            })
            .collect();
        let cli = std::env::var("KOO_BENCH_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
        let out = std::process::Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("cannot run {cli}"))?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let cluster = Self {
            nodes,
            single: false,
        };
        cluster.wait_ok().await?;
        Ok(cluster)
    }

    pub async fn wait_ok(&self) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(30);
        'again: loop {
            if Instant::now() > until {
                bail!("the cluster did not reach cluster_state:ok in 30 s");
            }
            for node in &self.nodes {
                let mut c = node_conn(&node.url).await?;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await?;
                if !info.contains("cluster_state:ok") {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'again;
                }
            }
            return Ok(());
        }
    }

    pub fn url(&self) -> String {
        if self.single {
            return self.nodes[0].url.clone();
        }
        let hosts: Vec<&str> = self
            .nodes
            .iter()
            .map(|n| n.url.trim_start_matches("redis://").trim_end_matches("/0"))
            .collect();
        format!("redis+cluster://{}/", hosts.join(","))
    }

    /// `CONFIG RESETSTAT` on every node (before a measured run).
    pub async fn reset_stats(&self) -> Result<()> {
        for node in &self.nodes {
            let mut c = node_conn(&node.url).await?;
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut c)
                .await?;
        }
        Ok(())
    }

    /// The commands the masters ran per task since [`Self::reset_stats`]
    /// (`INFO commandstats`; a script's inner commands count too), the
    /// most frequent first: what a task costs Redis, whatever the machine.
    pub async fn commands_per(&self, tasks: usize) -> Result<serde_json::Value> {
        let mut calls: std::collections::BTreeMap<String, u64> = Default::default();
        for node in &self.nodes {
            let mut c = node_conn(&node.url).await?;
            let role: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await?;
            if !role.contains("role:master") {
                continue;
            }
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut c)
                .await?;
            for (name, n) in super::commandstats(&stats) {
                *calls.entry(name.to_owned()).or_default() += n;
            }
        }
        let mut sorted: Vec<(String, u64)> = calls.into_iter().collect();
        sorted.sort_by_key(|s| std::cmp::Reverse(s.1));
        let total: u64 = sorted
            .iter()
            .filter(|(n, _)| n != "evalsha")
            .map(|(_, c)| c)
            .sum();
        let mut out = serde_json::Map::new();
        out.insert(
            "all_but_evalsha".into(),
            (total as f64 / tasks as f64).into(),
        );
        for (name, n) in sorted.into_iter().take(16) {
            let per = (n as f64 / tasks as f64 * 100.0).round() / 100.0;
            out.insert(name, per.into());
        }
        Ok(out.into())
    }

    pub fn cpu(&self) -> f64 {
        self.nodes
            .iter()
            .filter_map(|n| cpu_seconds(n.guard.pid()))
            .sum()
    }

    /// Which master (port) holds each of `queues`' slots.
    pub async fn placement(&self, queues: &[&str]) -> Result<Vec<(String, String)>> {
        if self.single {
            return Ok(Vec::new());
        }
        let mut c = node_conn(&self.nodes[0].url).await?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        for q in queues {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("{{t:{q}}}"))
                .query_async(&mut c)
                .await?;
            let owner = nodes
                .lines()
                .find(|l| {
                    l.split(' ').skip(8).any(|r| match r.split_once('-') {
                        Some((a, b)) => {
                            a.parse::<u16>().is_ok_and(|a| a <= slot)
                                && b.parse::<u16>().is_ok_and(|b| slot <= b)
                        }
                        None => r.parse::<u16>().is_ok_and(|s| s == slot),
                    })
                })
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("?")
                .split('@')
                .next()
                .unwrap_or("?")
                .to_owned();
            out.push(((*q).to_owned(), format!("slot {slot} on {owner}")));
        }
        Ok(out)
    }
}

/// A connection of its own to one Redis node (`redis://HOST:PORT/0`).
pub async fn node_conn(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}
