//! A real Sentinel deployment for one test: a primary, its replicas
//! (`--replicaof`), and Sentinels (`redis-server --sentinel` with a config
//! file in a tempdir) watching the primary as `m`, with short timeouts
//! (down after 500 ms, failover timeout 2 s) so that a failover takes a few
//! seconds. Everything stops when the handle drops.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{EVENT_TIMEOUT, TestRedis, free_port};

/// The name the Sentinels know the primary by.
pub const MASTER: &str = "m";

/// One `redis-server --sentinel` process.
pub struct Sentinel {
    pub port: u16,
    child: Option<Child>,
    /// Its `requirepass`, if any.
    password: Option<String>,
}

impl Sentinel {
    fn url(&self) -> String {
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("redis://{auth}127.0.0.1:{}/", self.port)
    }

    /// A direct connection to this Sentinel.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to a Sentinel")
    }

    /// The primary's port as this Sentinel names it now.
    pub async fn primary_port(&self) -> Option<u16> {
        let mut c = self.conn().await;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER)
            .query_async(&mut c)
            .await
            .ok()?;
        addr.map(|(_, port)| port)
    }
}

/// A primary, its replicas and the Sentinels watching it.
pub struct TestSentinels {
    /// `redis[0]` is the first primary; the others its replicas.
    pub redis: Vec<TestRedis>,
    pub sentinels: Vec<Sentinel>,
    _dir: tempfile::TempDir,
}

impl TestSentinels {
    /// A primary, one replica, three Sentinels (quorum 2); returns once
    /// every Sentinel knows the replica and the other Sentinels, so that a
    /// failover can be agreed at once.
    pub async fn start() -> Self {
        Self::start_with(1, 3).await
    }

    /// A primary with `replicas` replicas and `sentinels` Sentinels (quorum:
    /// a majority).
    pub async fn start_with(replicas: usize, sentinels: usize) -> Self {
        Self::start_secured(replicas, sentinels, None, None).await
    }

    /// Like [`Self::start_with`], with a `requirepass` on the primary (set
    /// once it is up, and given to the Sentinels as `auth-pass`) and on the
    /// Sentinels.
    pub async fn start_secured(
        replicas: usize,
        sentinels: usize,
        password: Option<&str>,
        sentinel_password: Option<&str>,
    ) -> Self {
        assert!(
            password.is_none() || replicas == 0,
            "a secured primary has no replicas here"
        );
        // Every server works in the tempdir: a replica writes the RDB of
        // its full sync (dump.rdb) in its working directory.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let in_dir = |name: &str| {
            let d = dir.path().to_str().unwrap().to_owned();
            vec![
                "--dir".to_owned(),
                d,
                "--dbfilename".into(),
                format!("{name}.rdb"),
            ]
        };
        let primary = TestRedis::start_with(&strs(&in_dir("primary"))).await;
        let mut auth = String::new();
        if let Some(pw) = password {
            let mut c = primary.conn().await;
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("requirepass")
                .arg(pw)
                .query_async(&mut c)
                .await
                .unwrap();
            auth += &format!("sentinel auth-pass {MASTER} {pw}\n");
        }
        if let Some(pw) = sentinel_password {
            auth += &format!("requirepass {pw}\n");
        }
        let of = primary.port.to_string();
        let mut redis = vec![primary];
        for i in 0..replicas {
            let mut extra = in_dir(&format!("replica-{i}"));
            extra.extend(["--replicaof".into(), "127.0.0.1".into(), of.clone()]);
            redis.push(TestRedis::start_with(&strs(&extra)).await);
        }
        // A Sentinel finds replicas in the primary's INFO, which it reads
        // on connecting and then every 10 s: they must be online first.
        wait_online(&redis[0], replicas).await;
        let bin = std::env::var("KOO_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let quorum = sentinels / 2 + 1;
        let sentinels = (0..sentinels)
            .map(|i| {
                let port = free_port();
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                         sentinel monitor {MASTER} 127.0.0.1 {of} {quorum}\n\
                         sentinel down-after-milliseconds {MASTER} 500\n\
                         sentinel failover-timeout {MASTER} 2000\n{auth}",
                        dir = dir.path().display()
                    ),
                )
                .expect("write a Sentinel config");
                let child = Command::new(&bin)
                    .arg(&conf)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {bin} --sentinel ({e})"));
                Sentinel {
                    port,
                    child: Some(child),
                    password: sentinel_password.map(str::to_owned),
                }
            })
            .collect();
        let deployment = Self {
            redis,
            sentinels,
            _dir: dir,
        };
        deployment.wait_known(replicas).await;
        deployment
    }

    /// `redis+sentinel://` naming every Sentinel and the primary `m`.
    pub fn url(&self) -> String {
        self.url_for(MASTER)
    }

    /// `redis+sentinel://` naming every Sentinel and the primary `master`.
    pub fn url_for(&self, master: &str) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{master}", hosts.join(","))
    }

    /// Waits until every Sentinel sees `replicas` replicas and all the
    /// other Sentinels (they learn of each other through hello messages on
    /// the primary, every 2 s).
    async fn wait_known(&self, replicas: usize) {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        let others = self.sentinels.len() - 1;
        let mut last = Default::default();
        'wait: loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Sentinels never saw the replicas and each other: {last:?}"
            );
            for s in &self.sentinels {
                let known = match redis::Client::open(s.url())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                {
                    Ok(mut c) => redis::cmd("SENTINEL")
                        .arg("MASTER")
                        .arg(MASTER)
                        .query_async::<std::collections::HashMap<String, String>>(&mut c)
                        .await
                        .unwrap_or_default(),
                    Err(_) => Default::default(),
                };
                let count = |f: &str| known.get(f).and_then(|n| n.parse::<usize>().ok());
                if count("num-slaves") != Some(replicas)
                    || count("num-other-sentinels") != Some(others)
                {
                    last = (s.port, known);
                    // Sentinel has no event to await for this
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'wait;
                }
            }
            return;
        }
    }

    /// Waits until every Sentinel names a primary other than `old` (a
    /// failover completed); returns its index in `redis`.
    pub async fn wait_failover(&self, old: u16) -> usize {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let mut ports = Vec::new();
            for s in &self.sentinels {
                ports.push(s.primary_port().await);
            }
            if let Some(Some(port)) = ports.first()
                && *port != old
                && ports.iter().all(|p| *p == Some(*port))
            {
                return self.redis.iter().position(|r| r.port == *port).unwrap();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no failover: the Sentinels name {ports:?}"
            );
            // Sentinel has no event to await for this (short of its Pub/Sub)
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until what was written on the primary `i` so far reached its
    /// replicas (`WAIT`: replication is in order, so a last write's
    /// acknowledgement covers every earlier one).
    pub async fn wait_replicated(&self, i: usize) {
        let mut c = self.redis[i].conn().await;
        let _: () = redis::cmd("SET")
            .arg("test:fence")
            .arg(1)
            .query_async(&mut c)
            .await
            .unwrap();
        let acked: usize = redis::cmd("WAIT")
            .arg(self.redis.len() - 1)
            .arg(EVENT_TIMEOUT.as_millis() as u64)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(acked, self.redis.len() - 1, "the replicas acknowledged");
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits until `primary` has `replicas` replicas online.
async fn wait_online(primary: &TestRedis, replicas: usize) {
    if replicas == 0 {
        return; // (and a secured primary has none)
    }
    let mut c = primary.conn().await;
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut c)
            .await
            .unwrap();
        if info.matches("state=online").count() >= replicas {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replicas never came online: {info}"
        );
        // replication has no event to await here
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for TestSentinels {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
