//! koo against a Redis that is not open: a real `redis-server` that speaks
//! only TLS (`--port 0 --tls-port`, certificates made here with rcgen, client
//! certificates required), and one whose koo user holds exactly the
//! documented ACL line (with and without `INFO`).
//!
//! The TLS tests run the real binaries (`koo serve`, `koo worker`) with the
//! documented variables, so that the path an operator uses is the one tested.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use koo::pb::cache::v1::{
    self as pb, CacheLevel, cache_service_client::CacheServiceClient, cache_value::Kind,
};
use koo::pb::tasks::v1::{TaskState, task_service_client::TaskServiceClient};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use common::tasks::{self as t, exits_within, submit, wait_task};
use common::{EVENT_TIMEOUT, TestRedis, TestServer, free_port};

/// Certificates for one test: a CA, a server certificate for 127.0.0.1 and
/// localhost, a client certificate, and a second CA that signed nothing koo
/// meets.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, names: &[&str], cn: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let root = ca("koo test CA");
        let (server_cert, server_key) = leaf(&root, &["127.0.0.1", "localhost"], "redis");
        let (client_cert, client_key) = leaf(&root, &[], "koo");
        Pki {
            ca: write("ca.pem", &root.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &ca("some other CA").pem()),
            _dir: dir,
        }
    }

    /// The variables that give koo this CA and client certificate.
    fn koo_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KOO_REDIS_TLS_CA", self.ca.display().to_string()),
            ("KOO_REDIS_TLS_CERT", self.client_cert.display().to_string()),
            ("KOO_REDIS_TLS_KEY", self.client_key.display().to_string()),
        ]
    }
}

/// A `redis-server` that listens only on TLS and requires client certificates.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    async fn start(pki: &Pki) -> Self {
        let port = free_port();
        let path = |p: &Path| p.display().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &path(&pki.server_cert)])
            .args(["--tls-key-file", &path(&pki.server_key)])
            .args(["--tls-ca-cert-file", &path(&pki.ca)])
            .args(["--tls-auth-clients", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = TlsRedis { port, child };
        redis.wait_ready(pki).await;
        redis
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }

    /// Polls with a TLS PING until the server answers (a process start has
    /// no event to await).
    async fn wait_ready(&self, pki: &Pki) {
        let read = |p: &Path| std::fs::read(p).unwrap();
        let certs = redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(&pki.client_cert),
                client_key: read(&pki.client_key),
            }),
            root_cert: Some(read(&pki.ca)),
        };
        let client = redis::Client::build_with_tls(self.url(), certs).unwrap();
        let until = tokio::time::Instant::now() + EVENT_TIMEOUT;
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
                tokio::time::Instant::now() < until,
                "TLS redis never came up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `koo serve` process and the address it announced.
struct Serve {
    child: Child,
    channel: Channel,
}

impl Serve {
    async fn start(env: &[(&str, String)]) -> Self {
        let mut child = common::koo_command()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("KOO_LOG", "info")
            .env("KOO_NO_SCHEDULER", "true")
            .env("KOO_WORKER_CONCURRENCY", "0")
            .env("REDIS_HEALTH_CHECK_INTERVAL", "200ms")
            .env("KOO_REDIS_CONNECT_TIMEOUT", "2s")
            .env("REDIS_MAX_CONNECTIONS", "2")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn koo serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("addr=").nth(1)
                    && line.contains("koo serving gRPC")
                {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let addr = match rx.recv_timeout(EVENT_TIMEOUT) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("koo serve did not start (status {:?})", child.wait());
            }
        };
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to koo serve");
        Serve { child, channel }
    }

    fn cache(&self) -> CacheServiceClient<Channel> {
        CacheServiceClient::new(self.channel.clone())
    }

    fn tasks(&self) -> TaskServiceClient<Channel> {
        TaskServiceClient::new(self.channel.clone())
    }

    async fn wait_health(&self, want: ServingStatus) {
        wait_health(&self.channel, want).await;
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits on the health Watch stream until `want` (an event, not a poll).
async fn wait_health(channel: &Channel, want: ServingStatus) {
    let mut stream = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let wait = async {
        while let Some(msg) = stream.message().await.unwrap() {
            if msg.status == want as i32 {
                return;
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| panic!("health never became {want:?}"));
}

/// A `koo worker` process with `env`, stopped on drop.
struct Worker(Child);

impl Worker {
    fn start(env: &[(&str, String)]) -> Self {
        let child = common::koo_command()
            .arg("worker")
            .env("KOO_WORKER_CONCURRENCY", "1")
            .env("KOO_WORKER_POLL_INTERVAL", "20ms")
            .env("KOO_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn koo worker");
        Worker(child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn set_req(key: &str, text: &str) -> pb::SetRequest {
    pb::SetRequest {
        level: CacheLevel::App as i32,
        key: key.into(),
        value: Some(pb::CacheValue {
            kind: Some(Kind::Text(text.into())),
        }),
        ttl: None,
        ..Default::default()
    }
}

/// The cache smoke path: a Set, then a Get that returns the value.
async fn cache_smoke(mut cache: CacheServiceClient<Channel>) {
    cache.set(set_req("smoke", "over tls")).await.unwrap();
    let got = cache
        .get(pb::GetRequest {
            level: CacheLevel::App as i32,
            key: "smoke".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found, "{got:?}");
    assert_eq!(
        got.value.and_then(|v| v.kind),
        Some(Kind::Text("over tls".into()))
    );
}

/// The task smoke path: a submit that a worker runs to SUCCEEDED.
async fn task_smoke(mut tasks: TaskServiceClient<Channel>) {
    let task = t::submit_ok(
        &mut tasks,
        submit("koo.diagnostics.noop", serde_json::json!({})),
    )
    .await;
    let done = wait_task(&mut tasks, &task.id, t::is_final).await;
    assert_eq!(done.state, TaskState::Succeeded as i32, "{done:?}");
}

/// Scenario: Redis speaks only TLS and requires a client certificate. `koo
/// serve`, a `koo worker` and a `koo scheduler` process, given `rediss://`,
/// the CA file and a client certificate and key, serve the cache (Set,
/// Get), run a task to SUCCEEDED, and fire a schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_ca_and_client_certificate_serves_cache_and_tasks() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki).await;
    let mut env = pki.koo_env();
    env.push(("REDIS_URL", redis.url()));
    let serve = Serve::start(&env).await;
    serve.wait_health(ServingStatus::Serving).await;
    cache_smoke(serve.cache()).await;
    let _worker = Worker::start(&env);
    task_smoke(serve.tasks()).await;
    scheduler_fires(&serve, &env).await;
}

/// Starts `koo scheduler` with `env` and a health check every second, and
/// waits for the task it submits (the WatchTasks event).
async fn scheduler_fires(serve: &Serve, env: &[(&str, String)]) {
    let mut events = serve
        .tasks()
        .watch_tasks(koo::pb::tasks::v1::WatchTasksRequest {
            name: "koo.tasks.health_check.run".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut scheduler = common::koo_command()
        .arg("scheduler")
        .env("KOO_LOG", "warn")
        .env("KOO_SCHEDULE_HEALTH_CHECK", "* * * * * *")
        .env("KOO_SCHEDULE_CACHE_CLEANUP", "off")
        .env("KOO_SCHEDULE_CACHE_WARM", "off")
        .env("KOO_SCHEDULE_DATABASE_MAINTENANCE", "off")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn koo scheduler");
    let fired = tokio::time::timeout(EVENT_TIMEOUT, events.message()).await;
    let _ = scheduler.kill();
    let _ = scheduler.wait();
    let event = fired
        .expect("the scheduler never submitted over TLS")
        .unwrap()
        .expect("an event");
    assert_eq!(event.queue, "health_check", "{event:?}");
}

/// Scenario: koo is given a CA that did not sign Redis's certificate: it
/// starts, stays NOT_SERVING, and GetHealth says why (the certificate); a
/// cache call is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_wrong_ca_is_refused() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki).await;
    let mut env = pki.koo_env();
    env[0].1 = pki.other_ca.display().to_string();
    env.push(("REDIS_URL", redis.url()));
    let serve = Serve::start(&env).await;
    // Each GetHealth probes Redis; the first ones may end before a TLS
    // handshake has failed (a timeout says nothing of certificates), so
    // probe until one has seen the refusal.
    let until = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let health = loop {
        let health = serve
            .cache()
            .get_health(pb::GetHealthRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(!health.healthy, "{health:?}");
        if health.last_error.contains("certificate") || tokio::time::Instant::now() > until {
            break health;
        }
    };
    println!(
        "GetHealth with the wrong CA: last_error={:?}",
        health.last_error
    );
    assert!(
        health.last_error.contains("invalid peer certificate"),
        "the reason names the certificate: {:?}",
        health.last_error
    );
    let status = HealthClient::new(serve.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let refused = serve.cache().set(set_req("k", "v")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
}

/// Scenario: unusable TLS settings stop `koo serve` at start-up with a
/// message naming the setting: a missing CA file, a CA file without a
/// certificate, a certificate without its key, and TLS files with a
/// plaintext `redis://` URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_name_the_setting() {
    let pki = Pki::new();
    let garbage = pki._dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let tls_url = ("REDIS_URL", "rediss://127.0.0.1:1/0".to_owned());
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![
                tls_url.clone(),
                ("KOO_REDIS_TLS_CA", "/nonexistent/ca.pem".into()),
            ],
            "KOO_REDIS_TLS_CA",
        ),
        (
            vec![
                tls_url.clone(),
                ("KOO_REDIS_TLS_CA", garbage.display().to_string()),
            ],
            "KOO_REDIS_TLS_CA",
        ),
        (
            vec![
                tls_url.clone(),
                ("KOO_REDIS_TLS_CERT", pki.client_cert.display().to_string()),
            ],
            "KOO_REDIS_TLS_KEY",
        ),
        (
            vec![
                tls_url.clone(),
                ("KOO_REDIS_TLS_CERT", pki.client_cert.display().to_string()),
                ("KOO_REDIS_TLS_KEY", garbage.display().to_string()),
            ],
            "KOO_REDIS_TLS_KEY",
        ),
        (
            vec![
                ("REDIS_URL", "redis://127.0.0.1:1/0".into()),
                ("KOO_REDIS_TLS_CA", pki.ca.display().to_string()),
            ],
            "rediss://",
        ),
    ];
    for (env, named) in cases {
        let mut child = common::koo_command()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let exited = exits_within(&mut child, EVENT_TIMEOUT).await;
        if !exited {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(exited && !out.status.success(), "{env:?} started: {stderr}");
        assert!(stderr.contains(named), "{env:?}: {stderr}");
        assert!(
            !stderr.contains("BEGIN") && !stderr.contains("not a certificate"),
            "no PEM content in the message: {stderr}"
        );
    }
}

/// The rules of koo's Redis user, as documented (README, Security).
fn acl_rules() -> Vec<String> {
    koo::store::redis::REDIS_ACL_RULES
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A fresh Redis whose `koo` user has exactly `rules` on keys `koo:*`, and
/// whose `default` user needs a password; the URL koo is given.
async fn acl_redis(rules: &[String]) -> (TestRedis, String) {
    let redis = TestRedis::start().await;
    let mut admin = redis.conn().await;
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg("koo")
        .arg("reset")
        .arg("on")
        .arg(">koo-secret")
        .arg("~koo:*")
        .arg("resetchannels")
        .arg(rules);
    setuser.query_async::<()>(&mut admin).await.unwrap();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("resetpass")
        .arg(">admin-secret")
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    // the default user now needs its password: koo gets in only as `koo`
    let anonymous = redis::Client::open(redis.url()).unwrap();
    let mut c = anonymous.get_multiplexed_async_connection().await.unwrap();
    let refused = redis::cmd("GET")
        .arg("koo:x")
        .query_async::<Option<String>>(&mut c)
        .await;
    assert!(refused.is_err(), "the default user is still open");
    let url = format!("redis://koo:koo-secret@127.0.0.1:{}/0", redis.port);
    (redis, url)
}

/// koo in process on `url` with one built-in worker.
async fn koo_on(url: &str) -> TestServer {
    let mut settings = common::test_settings(common::redis_settings(url));
    t::short_intervals(&mut settings, 1);
    let server = TestServer::spawn(settings).await;
    server.wait_health("", ServingStatus::Serving).await;
    server
}

/// Runs StartMaintenance to its end and returns its report.
async fn maintenance(server: &TestServer) -> pb::MaintenanceReport {
    server
        .cache()
        .start_maintenance(pb::StartMaintenanceRequest { wait: true })
        .await
        .expect("StartMaintenance")
        .into_inner()
        .report
        .expect("a report")
}

/// Scenario: koo's Redis user holds exactly the documented ACL line (and
/// the default user is password-protected): the cache and task smoke paths
/// pass, and the memory reports carry Redis's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_with_documented_line_serves_cache_and_tasks() {
    let (_redis, url) = acl_redis(&acl_rules()).await;
    let server = koo_on(&url).await;
    cache_smoke(server.cache()).await;
    task_smoke(t::client(&server)).await;
    let report = maintenance(&server).await;
    assert!(report.used_memory_bytes > 0, "{report:?}");
    assert_eq!(report.eviction_policy, "noeviction");
    let health = server
        .cache()
        .get_health(pb::GetHealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.healthy && health.used_memory_bytes > 0, "{health:?}");
}

/// Scenario: the same user without `INFO`: the smoke paths still pass, and
/// the reports that read INFO degrade instead of failing: StartMaintenance
/// and GetHealth say the memory figures are unknown, GetMetrics is partial
/// and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_without_info_degrades_memory_reports() {
    let mut rules = acl_rules();
    rules.push("-info".to_owned());
    let (_redis, url) = acl_redis(&rules).await;
    let server = koo_on(&url).await;
    cache_smoke(server.cache()).await;
    task_smoke(t::client(&server)).await;
    let report = maintenance(&server).await;
    println!("StartMaintenance without INFO: {report:?}");
    assert_eq!(report.used_memory_bytes, 0);
    assert!(
        report.eviction_policy.contains("INFO not permitted"),
        "{report:?}"
    );
    let health = server
        .cache()
        .get_health(pb::GetHealthRequest {})
        .await
        .unwrap()
        .into_inner();
    println!("GetHealth without INFO: {health:?}");
    assert!(health.healthy, "{health:?}");
    assert!(
        health.eviction_policy.contains("INFO not permitted"),
        "{health:?}"
    );
    let metrics = server
        .cache()
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .metrics
        .expect("metrics");
    println!(
        "GetMetrics without INFO: partial={} reason={:?}",
        metrics.partial, metrics.partial_reason
    );
    assert!(metrics.partial, "{metrics:?}");
    assert!(metrics.partial_reason.contains("INFO"), "{metrics:?}");
}

/// Scenario: an ACL user's password in REDIS_URL, TASK_BROKER_URL and
/// TASK_RESULT_BACKEND (each logged at start-up) never reaches koo's logs
/// (debug level), while the user name does.
#[test]
fn redis_passwords_never_reach_the_logs() {
    let mut child = common::koo_command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KOO_LOG", "debug")
        .env("REDIS_URL", "redis://koo:hunter2-secret@127.0.0.1:1/0")
        .env(
            "TASK_BROKER_URL",
            "redis://koo:hunter2-secret@127.0.0.1:1/1",
        )
        .env(
            "TASK_RESULT_BACKEND",
            "redis://koo:hunter2-secret@127.0.0.1:1/2",
        )
        .env("KOO_WORKER_CONCURRENCY", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn koo serve");
    let mut logs = String::new();
    for line in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        logs.push_str(&line);
        logs.push('\n');
        if line.contains("koo serving gRPC") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(logs.contains("koo serving gRPC"), "{logs}");
    assert!(!logs.contains("hunter2"), "a password was logged:\n{logs}");
    assert!(logs.contains("redis://koo:***@127.0.0.1:1/0"), "{logs}");
    assert!(logs.contains("redis://koo:***@127.0.0.1:1/2"), "{logs}");
}

/// Six `redis-server` processes speaking only TLS, with TLS between the
/// nodes too (`--tls-cluster yes --tls-replication yes`), joined into a
/// Cluster of three masters and three replicas with `redis-cli --tls
/// --cluster create`.
struct TlsCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl TlsCluster {
    async fn start(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |p: &Path| p.display().to_string();
        let mut cluster = TlsCluster {
            ports: Vec::new(),
            children: Vec::new(),
            _dir: dir,
        };
        for i in 0..6 {
            let port = free_port();
            let conf = cluster._dir.path().join(format!("nodes-{i}.conf"));
            let child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--tls-cert-file", &path(&pki.server_cert)])
                .args(["--tls-key-file", &path(&pki.server_key)])
                .args(["--tls-ca-cert-file", &path(&pki.ca)])
                .args(["--tls-auth-clients", "yes"])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .args(["--cluster-config-file", &path(&conf)])
                // a bus port of its own: the default, port + 10000, can be
                // taken or past 65535 for a high ephemeral port
                .args(["--cluster-port", &free_port().to_string()])
                .arg("--dir")
                .arg(cluster._dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            cluster.ports.push(port);
            cluster.children.push(child);
        }
        for &port in &cluster.ports {
            cluster.wait(pki, port, &["PING"], "PONG").await;
        }
        let out = Command::new("redis-cli")
            .args(cluster.cli_tls(pki))
            .args(["--cluster", "create"])
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --tls --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for &port in &cluster.ports {
            cluster
                .wait(pki, port, &["CLUSTER", "INFO"], "cluster_state:ok")
                .await;
        }
        cluster
    }

    fn cli_tls(&self, pki: &Pki) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        vec![
            "--tls".into(),
            "--cacert".into(),
            path(&pki.ca),
            "--cert".into(),
            path(&pki.client_cert),
            "--key".into(),
            path(&pki.client_key),
        ]
    }

    /// Polls `redis-cli` on `port` until its reply contains `want` (a
    /// process start and a cluster's agreement have no event to await).
    async fn wait(&self, pki: &Pki, port: u16, cmd: &[&str], want: &str) {
        let until = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let out = tokio::process::Command::new("redis-cli")
                .args(self.cli_tls(pki))
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(cmd)
                .output()
                .await
                .expect("run redis-cli");
            if String::from_utf8_lossy(&out.stdout).contains(want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "TLS cluster node {port}: {cmd:?} never answered {want:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("rediss+cluster://{}/", hosts.join(","))
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Scenario: a Redis Cluster that speaks only TLS and requires client
/// certificates; `koo serve` given `rediss+cluster://` and the same CA and
/// client certificate serves the cache across the masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_cluster_serves_the_cache() {
    let pki = Pki::new();
    let cluster = TlsCluster::start(&pki).await;
    let mut env = pki.koo_env();
    env.push(("REDIS_URL", cluster.url()));
    let serve = Serve::start(&env).await;
    serve.wait_health(ServingStatus::Serving).await;
    let mut cache = serve.cache();
    for i in 0..30 {
        cache
            .set(set_req(&format!("k{i}"), &format!("v{i}")))
            .await
            .unwrap();
    }
    for i in 0..30 {
        let got = cache
            .get(pb::GetRequest {
                level: CacheLevel::App as i32,
                key: format!("k{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got.value.and_then(|v| v.kind),
            Some(Kind::Text(format!("v{i}"))),
            "k{i}"
        );
    }
}

/// Scenario: malformed Cluster and Sentinel URLs stop `koo serve` at start
/// with the reason, never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cluster_and_sentinel_urls_name_the_problem() {
    for (url, want) in [
        (
            "redis+cluster://u:secret@127.0.0.1:7000/2",
            "only database 0",
        ),
        ("redis+cluster://u:secret@127.0.0.1", "is not HOST:PORT"),
        (
            "redis+sentinel://u:secret@127.0.0.1:26379",
            "name the primary",
        ),
        (
            "redis+cluster://u:secret@127.0.0.1:7000?foo=1",
            "unknown parameter",
        ),
    ] {
        let message = common::serve_refused("REDIS_URL", url);
        assert!(message.contains(want), "{url}: {message}");
        assert!(!message.contains("secret"), "{url}: {message}");
    }
}
