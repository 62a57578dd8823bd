//! Test harness: a real `redis-server` on a free loopback port and the real
//! koo server on an ephemeral port, reached over a real gRPC channel.
//!
//! Nothing here mocks Redis or gRPC. Each test gets its own Redis process (so
//! tests never share data and never touch a Redis the user runs) and its own
//! koo server; both are stopped when the handles drop.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod auth;
pub mod certs;
pub mod chaos;
pub mod cluster;
pub mod python;
pub mod rest;
pub mod sentinel;
pub mod stream;
#[macro_use]
pub mod tasks;
pub mod tls;

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use koo::cache::CacheConfig;
use koo::pb::cache::v1::cache_service_client::CacheServiceClient;
use koo::server::{Settings, StoreSettings};
use koo::store::{MemoryConfig, RedisConfig};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long any awaited event may take before a test fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The built `koo` binary as a command with none of the caller's
/// configuration leaking in (`REDIS_*`, `CACHE_*`, `KOO_*`, `TASK_*`, `OTEL_*`,
/// `CELERY_*` removed), so that a test sets exactly what it means to.
pub fn koo_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_koo"));
    for (name, _) in std::env::vars() {
        if ["REDIS_", "CACHE_", "KOO_", "TASK_", "CELERY_", "OTEL_"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            cmd.env_remove(name);
        }
    }
    // KOO_HTTP_LISTEN's default port would collide between tests running
    // at once; a test that wants it sets its own.
    cmd.env("KOO_HTTP_LISTEN", "off");
    cmd
}

/// A child process, killed (and reaped) when the test ends, however it
/// ends.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `koo serve` with `variable=value`, which must stop it at start-up: its
/// standard error, which must name the variable.
pub fn serve_refused(variable: &str, value: &str) -> String {
    let out = koo_command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env(variable, value)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run koo serve");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{variable}={value}: koo started");
    assert!(stderr.contains(variable), "{variable}={value}: {stderr}");
    stderr
}

/// Starts `koo serve` on an ephemeral gRPC port with `env` (and none of the
/// caller's configuration), and reads its log until it announced its gRPC
/// address (or stopped): the process and the lines it wrote.
pub fn serve_logged(env: &[(&str, &str)]) -> (ChildGuard, Vec<String>) {
    serve_logged_draining(env, true)
}

/// [`serve_logged`], then closes koo's stderr (the reader of its log pipe
/// gone).
pub fn serve_logged_then_close(env: &[(&str, &str)]) -> (ChildGuard, Vec<String>) {
    serve_logged_draining(env, false)
}

fn serve_logged_draining(env: &[(&str, &str)], drain: bool) -> (ChildGuard, Vec<String>) {
    use std::io::BufRead as _;
    let mut child = koo_command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn koo serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut read = std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok);
        for line in read.by_ref() {
            let announced = line.contains("koo serving gRPC");
            lines.push(line);
            if announced {
                break;
            }
        }
        let _ = tx.send(lines);
        // keep draining, so that the tests read koo's log lines as written
        // (a closed stderr loses them: tests/it/binary.rs)
        if drain {
            read.for_each(drop);
        }
    });
    let served = ChildGuard(child);
    let lines = rx.recv_timeout(EVENT_TIMEOUT).expect("koo serve logged");
    (served, lines)
}

/// The `addr=` field of the first of `lines` that contains `needle`.
pub fn logged_addr(lines: &[String], needle: &str) -> Option<String> {
    lines.iter().find(|l| l.contains(needle)).map(|l| {
        let after = l.split("addr=").nth(1).expect("an addr field");
        after.split_whitespace().next().unwrap().to_owned()
    })
}

/// A free loopback port (the OS picks it; we release it for the child).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A `redis-server` started for one test.
pub struct TestRedis {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl TestRedis {
    /// Starts a fresh, empty, non-persistent Redis on a free port.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts Redis with extra `--option value` arguments.
    pub async fn start_with(extra: &[&str]) -> Self {
        let mut redis = TestRedis {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        redis.launch().await;
        redis
    }

    /// A Redis URL for this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn launch(&mut self) {
        let bin = std::env::var("KOO_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}); install redis-server (scripts/test does) or set KOO_TEST_REDIS_SERVER")
            });
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let client = redis::Client::open(self.url()).unwrap();
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
                "redis on port {} did not come up",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A direct connection, for checking what koo wrote.
    /// (No response timeout: tests send slow commands such as DEBUG SLEEP.)
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to test redis")
    }

    /// `field` of `INFO section` (e.g. `stats`, `total_reads_processed`).
    pub async fn info_field(&self, section: &str, field: &str) -> String {
        let info: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("INFO {section} has no {field}"))
            .trim()
            .to_owned()
    }

    /// How many times Redis has run `commands` (`INFO commandstats`'
    /// counts, summed; e.g. `["evalsha", "eval"]`).
    pub async fn command_calls(&self, commands: &[&str]) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn().await)
            .await
            .unwrap();
        info.lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
                commands.contains(&name).then_some(rest)
            })
            .map(|rest| rest.split(',').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// Sends a signal (e.g. "STOP", "CONT") to the server.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process ignores SIGKILL until continued on some kernels' views; be sure.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// Settings for tests: short intervals so that failures and recoveries are
/// seen in well under a second.
pub fn test_settings(store: StoreSettings) -> Settings {
    let mut settings = Settings {
        store,
        cache: CacheConfig {
            metrics_flush_interval: Duration::from_millis(100),
            key_count_interval: Duration::ZERO,
            ..CacheConfig::default()
        },
        health_check_interval: Duration::from_millis(200),
        memory_sweep_interval: Duration::from_secs(3600),
        request_timeout: Duration::from_secs(5),
        bulk_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(5),
        shutdown_drain: Duration::ZERO,
        // the HTTP listener's default port would collide between tests
        http_listen: None,
        ..Settings::default()
    };
    // as in production: tasks live on the cache's Redis when there is one
    if let StoreSettings::Redis(r) = &settings.store {
        settings.tasks.redis = Some(r.clone());
    }
    settings
}

/// Redis settings for tests: a short breaker cool-down and connect timeout.
pub fn redis_settings(url: &str) -> StoreSettings {
    StoreSettings::Redis(RedisConfig {
        breaker_cooldown: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(500),
        max_connections: 4,
        ..RedisConfig::new(url)
    })
}

/// The embedded store.
pub fn memory_settings() -> StoreSettings {
    StoreSettings::Memory(MemoryConfig::default())
}

/// A koo server running in this process on an ephemeral port.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts koo with `settings` and connects to it.
    pub async fn spawn(settings: Settings) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            koo::server::run(listener, settings, async {
                let _ = stopped.await;
            })
            .await
            .expect("server failed");
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to koo");
        TestServer {
            addr,
            channel,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A CacheService client that accepts values up to the default limit.
    pub fn cache(&self) -> CacheServiceClient<Channel> {
        CacheServiceClient::new(self.channel.clone())
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// A grpc.health.v1 client.
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    /// Waits until the health of `service` becomes `want`, using the Watch
    /// stream (an event, not a poll).
    pub async fn wait_health(&self, service: &str, want: ServingStatus) {
        let mut stream = self
            .health()
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health watch")
            .into_inner();
        let wait = async {
            while let Some(msg) = stream.message().await.expect("health stream") {
                if msg.status == want as i32 {
                    return;
                }
            }
            panic!("health stream ended before {want:?}");
        };
        tokio::time::timeout(EVENT_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| panic!("health of {service:?} never became {want:?}"));
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(EVENT_TIMEOUT, task)
                .await
                .expect("server did not stop")
                .expect("server task panicked");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Which store a test runs against.
pub enum Backend {
    Memory,
    Redis(TestRedis),
    Cluster(cluster::TestCluster),
}

/// A koo server and (for Redis) its Redis.
pub struct Env {
    pub server: TestServer,
    pub backend: Backend,
}

impl Env {
    /// koo on the embedded store.
    pub async fn memory() -> Self {
        Self::memory_with(|_| {}).await
    }

    /// koo on the embedded store with adjusted settings.
    pub async fn memory_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings(memory_settings());
        adjust(&mut settings);
        let server = TestServer::spawn(settings).await;
        server.wait_health("", ServingStatus::Serving).await;
        Env {
            server,
            backend: Backend::Memory,
        }
    }

    /// koo on a fresh Redis.
    pub async fn redis() -> Self {
        Self::redis_with(|_| {}).await
    }

    /// koo on a fresh Redis with adjusted settings.
    pub async fn redis_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let redis = TestRedis::start().await;
        let mut settings = test_settings(redis_settings(&redis.url()));
        adjust(&mut settings);
        let server = TestServer::spawn(settings).await;
        server.wait_health("", ServingStatus::Serving).await;
        Env {
            server,
            backend: Backend::Redis(redis),
        }
    }

    /// koo on a fresh Redis Cluster (three masters, three replicas).
    pub async fn cluster() -> Self {
        Self::cluster_with(|_| {}).await
    }

    /// koo on a fresh Redis Cluster with adjusted settings.
    pub async fn cluster_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let cluster = cluster::TestCluster::start().await;
        let mut settings = test_settings(redis_settings(&cluster.url()));
        adjust(&mut settings);
        let server = TestServer::spawn(settings).await;
        server.wait_health("", ServingStatus::Serving).await;
        Env {
            server,
            backend: Backend::Cluster(cluster),
        }
    }

    /// The CacheService client.
    pub fn cache(&self) -> CacheServiceClient<Channel> {
        self.server.cache()
    }

    fn redis_mut(&mut self) -> &mut TestRedis {
        match &mut self.backend {
            Backend::Redis(r) => r,
            _ => panic!("this env has no single Redis"),
        }
    }

    /// Kills the env's Redis and waits until koo reports NOT_SERVING.
    pub async fn kill_redis(&mut self) {
        self.redis_mut().kill();
        self.server.wait_health("", ServingStatus::NotServing).await;
    }

    /// Restarts the env's Redis (empty) and waits until koo reports SERVING.
    pub async fn restart_redis(&mut self) {
        self.redis_mut().restart().await;
        self.server.wait_health("", ServingStatus::Serving).await;
    }

    /// Whether koo's store is Redis (one server or a Cluster).
    pub fn is_redis(&self) -> bool {
        !matches!(self.backend, Backend::Memory)
    }

    /// A fresh env of the same kind as this one, with adjusted settings.
    pub async fn same_kind_with(&self, adjust: impl FnOnce(&mut Settings)) -> Self {
        match self.backend {
            Backend::Memory => Self::memory_with(adjust).await,
            Backend::Redis(_) => Self::redis_with(adjust).await,
            Backend::Cluster(_) => Self::cluster_with(adjust).await,
        }
    }

    /// The test Redis, if this env has one.
    pub fn redis_server(&self) -> Option<&TestRedis> {
        match &self.backend {
            Backend::Redis(r) => Some(r),
            _ => None,
        }
    }
}

/// Generates, for each named `async fn scenario(env: Env)`, a module with a
/// test on the embedded store and one on Redis, so that one suite covers both.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name($crate::common::Env::memory().await).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name($crate::common::Env::redis().await).await;
                }
            }
        )*
    };
}

/// [`on_both_stores!`], and a third test on a Redis Cluster (three masters,
/// three replicas), for the scenarios that must hold there too.
#[macro_export]
macro_rules! on_all_stores {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name($crate::common::Env::memory().await).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name($crate::common::Env::redis().await).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cluster() {
                    super::$name($crate::common::Env::cluster().await).await;
                }
            }
        )*
    };
}

/// The cache's metrics (`GetMetrics`) through `c`.
pub async fn cache_metrics(
    c: &mut CacheServiceClient<Channel>,
) -> koo::pb::cache::v1::CacheMetrics {
    c.get_metrics(koo::pb::cache::v1::GetMetricsRequest {})
        .await
        .expect("GetMetrics")
        .into_inner()
        .metrics
        .expect("a metrics snapshot")
}
