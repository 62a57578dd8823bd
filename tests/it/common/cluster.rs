//! A real Redis Cluster for one test: six `redis-server --cluster-enabled
//! yes` processes on free loopback ports (three masters, three replicas),
//! joined with `redis-cli --cluster create`, stopped when the handle drops.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{EVENT_TIMEOUT, free_port};

/// One node of a [`TestCluster`].
pub struct Node {
    pub port: u16,
    child: Option<Child>,
    /// How to start it again (see [`Node::restart`]).
    command: Vec<std::ffi::OsString>,
}

impl Node {
    /// A direct connection to this node (not cluster-aware).
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to a cluster node")
    }

    /// `host:port` as the cluster names it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts a killed node again with its configuration file: it rejoins
    /// the cluster (as a replica when its replica took its slots over).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "node {} is running", self.port);
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart a cluster node");
        self.child = Some(child);
        wait_ping(self.port).await;
    }

    /// SIGKILLs the node.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Three masters and their replicas.
pub struct TestCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts six nodes and creates the cluster; returns once every node
    /// reports `cluster_state:ok`.
    pub async fn start() -> Self {
        Self::start_with(6, 1).await
    }

    /// Starts `n` nodes with `replicas` replicas per master.
    pub async fn start_with(n: usize, replicas: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let bin = std::env::var("KOO_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(start_node(&bin, dir.path(), i).await);
        }
        let cluster = Self { nodes, _dir: dir };
        let cli = std::env::var("KOO_TEST_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
        let out = tokio::process::Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(cluster.nodes.iter().map(Node::addr))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {cli} ({e})"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok().await;
        cluster
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(Node::addr).collect();
        format!("redis+cluster://{}/", hosts.join(","))
    }

    /// Waits until every running node says `cluster_state:ok` and agrees on
    /// the masters.
    pub async fn wait_ok(&self) {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        'wait: loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster did not become ok"
            );
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let mut c = node.conn().await;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                if !info.contains("cluster_state:ok") {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'wait;
                }
            }
            return;
        }
    }

    /// Waits until every running master has an online replica (`INFO
    /// replication`) that acknowledges (a first `WAIT 1` can take up to a
    /// second after a replica comes online; later ones take microseconds).
    pub async fn wait_replicated(&self) {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        'wait: loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replicas did not come online"
            );
            for port in self.masters().await {
                let node = self.nodes.iter().find(|n| n.port == port).unwrap();
                let mut c = node.conn().await;
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                if !info.contains("state=online") {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'wait;
                }
            }
            for port in self.masters().await {
                let node = self.nodes.iter().find(|n| n.port == port).unwrap();
                let mut c = node.conn().await;
                let acked: i64 = redis::cmd("WAIT")
                    .arg(1)
                    .arg(EVENT_TIMEOUT.as_millis() as u64)
                    .query_async(&mut c)
                    .await
                    .unwrap_or(0);
                assert!(acked >= 1, "the replica of {port} does not acknowledge");
            }
            return;
        }
    }

    /// The ports of the masters now serving slots, as the first running
    /// node sees them.
    pub async fn masters(&self) -> Vec<u16> {
        let node = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let mut c = node.conn().await;
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() > 8 && f[2].contains("master") && !f[2].contains("fail")
            })
            .filter_map(|l| {
                l.split(' ')
                    .nth(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// The port of the master serving `key`'s slot now.
    pub async fn master_of(&self, key: &str) -> u16 {
        let port = self.try_master_of(key).await;
        port.unwrap_or_else(|| panic!("no live master serves the slot of {key}"))
    }

    /// The port of the live master serving `key`'s slot (`CLUSTER KEYSLOT`
    /// and the slot ranges of `CLUSTER NODES`); `None` while none does
    /// (its master failed and no replica has taken over yet).
    pub async fn try_master_of(&self, key: &str) -> Option<u16> {
        let node = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let mut c = node.conn().await;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap();
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await
            .unwrap();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let serves = f[8..].iter().filter(|r| !r.starts_with('[')).any(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                (a.parse::<u16>().unwrap()..=b.parse::<u16>().unwrap()).contains(&slot)
            });
            if serves {
                let port = f[1].split('@').next().unwrap().rsplit(':').next().unwrap();
                return Some(port.parse().unwrap());
            }
        }
        None
    }

    /// A direct connection to the node listening on `port`.
    pub async fn conn_at(&self, port: u16) -> redis::aio::MultiplexedConnection {
        let node = self.nodes.iter().find(|n| n.port == port);
        node.unwrap_or_else(|| panic!("no node on port {port}"))
            .conn()
            .await
    }

    /// A direct connection to the master serving `key`'s slot now.
    pub async fn conn_to_master_of(&self, key: &str) -> redis::aio::MultiplexedConnection {
        self.conn_at(self.master_of(key).await).await
    }

    /// The node listening on `port`.
    pub fn node(&mut self, port: u16) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }
}

/// Starts node `i` on free ports (its own and its bus port) and waits
/// until it answers. A port found free can be taken before the server
/// binds it (by another test's connection): the node then exits at once,
/// and is started again on other ports.
async fn start_node(bin: &str, dir: &std::path::Path, i: usize) -> Node {
    for _ in 0..5 {
        let port = free_port();
        let conf = dir.join(format!("nodes-{i}.conf"));
        let mut command = Command::new(bin);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", conf.to_str().unwrap()])
            .args(["--cluster-node-timeout", "1000"])
            // a bus port of its own: the default, port + 10000, can be
            // taken or past 65535 for a high ephemeral port
            .args(["--cluster-port", &free_port().to_string()])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} ({e}); scripts/test installs it"));
        if up_or_exited(port, &conf, &mut child).await {
            let command = std::iter::once(command.get_program().to_owned())
                .chain(command.get_args().map(ToOwned::to_owned))
                .collect();
            return Node {
                port,
                child: Some(child),
                command,
            };
        }
        let _ = std::fs::remove_file(&conf);
    }
    panic!("cluster node {i} could not start on five pairs of free ports")
}

/// Waits until the server on `port` answers as `child` (its cluster
/// configuration file is `conf`: another test's server may hold the port)
/// and returns `true`, or until `child` has exited (`false`).
async fn up_or_exited(port: u16, conf: &std::path::Path, child: &mut Child) -> bool {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && let Ok((_, file)) = redis::cmd("CONFIG")
                .arg("GET")
                .arg("cluster-config-file")
                .query_async::<(String, String)>(&mut c)
                .await
            && file == conf.to_str().unwrap()
        {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster node {port} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ping(port: u16) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster node {port} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
