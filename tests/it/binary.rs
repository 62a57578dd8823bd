//! The `koo` binary as an operator runs it: configuration errors, `--help`,
//! reflection for grpcurl, `koo health`, and graceful shutdown on SIGTERM.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use koo::pb::cache::v1::{self as pb, cache_service_client::CacheServiceClient};
use tonic::transport::Channel;

/// A `koo` command with none of the caller's configuration leaking in.
fn koo() -> Command {
    common::koo_command()
}

/// A running `koo serve` and the address it announced.
struct Running {
    child: Child,
    addr: String,
    /// Every line koo has logged so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Running {
    fn start(extra_env: &[(&str, &str)]) -> Running {
        let mut child = koo()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .envs(extra_env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn koo");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line.clone());
                if !sent && line.contains("koo serving gRPC") {
                    let addr = line
                        .split("addr=")
                        .nth(1)
                        .unwrap()
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let mut running = Running {
            child,
            addr: String::new(),
            log,
        };
        // On failure `running` drops here and kills the child.
        running.addr = rx
            .recv_timeout(common::EVENT_TIMEOUT)
            .expect("koo announced its address");
        running
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + common::EVENT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "koo did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Invalid configuration stops start-up with a message naming the variable.
#[test]
fn invalid_configuration_names_the_variable() {
    for (var, value) in [
        ("CACHE_MAX_VALUE_SIZE", "0"),
        ("REDIS_MAX_CONNECTIONS", "0"),
        ("CACHE_DEFAULT_TTL", "forever"),
        ("REDIS_URL", "http://localhost"),
        ("REDIS_URL", "redis://127.0.0.1:99999/0"),
        // the task Redis's own settings are named, not REDIS_URL
        ("TASK_BROKER_URL", "redis://127.0.0.1:6379/abc"),
        ("CELERY_BROKER_URL", "redis+sentinel://127.0.0.1:26379/"),
        (
            "TASK_BROKER_URL",
            "redis+sentinel://127.0.0.1:26379/m?db=3&db=5",
        ),
        ("KOO_PREFIX", "has space"),
        ("REDIS_HEALTH_CHECK_INTERVAL", "0"),
        // no Redis URL: nothing would use it
        ("KOO_REDIS_TLS_CA", "/nonexistent/ca.pem"),
    ] {
        let out = koo().arg("serve").env(var, value).output().unwrap();
        assert!(!out.status.success(), "{var}={value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}={value}: {stderr}");
    }
}

/// `koo serve --help` documents every variable.
#[test]
fn help_lists_every_variable() {
    let out = koo().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "KOO_LISTEN",
        "REDIS_URL",
        "REDIS_MAX_CONNECTIONS",
        "REDIS_RETRY_ON_TIMEOUT",
        "REDIS_SOCKET_KEEPALIVE",
        "REDIS_HEALTH_CHECK_INTERVAL",
        "CACHE_DEFAULT_TTL",
        "CACHE_COMPRESSION_THRESHOLD",
        "CACHE_MAX_VALUE_SIZE",
        "KOO_CACHE_WARM_FILE",
        "KOO_HTTP_LISTEN",
    ] {
        assert!(help.contains(var), "--help lacks {var}");
    }
}

/// Reflection answers in both v1 and v1alpha, so grpcurl of any age can list
/// and describe koo's services without proto files.
#[tokio::test]
async fn reflection_lists_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let server = Running::start(&[]);
    let channel = server.channel().await;
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = v1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["koo.cache.v1.CacheService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "koo.cache.v1.CacheService".into(),
            ),
        ),
    };
    let mut stream = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(
            reply.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{reply:?}"
    );
}

/// `koo health` exits 0 against a serving koo and non-zero when none answers.
#[tokio::test]
async fn health_subcommand_exit_codes() {
    let server = Running::start(&[]);
    server.channel().await;
    let out = koo()
        .args(["health", "--addr", &server.addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    drop(server);
    let port = common::free_port();
    let out = koo()
        .args([
            "health",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // a zero timeout is a usage error (exit 2), not an unreachable koo
    let out = koo().args(["health", "--timeout", "0s"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("greater than zero"));
}

/// SIGTERM first reports NOT_SERVING to health watchers, ends open
/// WatchMetrics streams cleanly (OK, not an error), and exits 0.
#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut server = Running::start(&[]);
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = health.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let mut client = CacheServiceClient::new(channel);
    let mut stream = client
        .watch_metrics(pb::WatchMetricsRequest {
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("first snapshot");
    server.signal("TERM");
    let not_serving = tokio::time::timeout(common::EVENT_TIMEOUT, health.message())
        .await
        .expect("health update")
        .unwrap()
        .expect("health stream open");
    assert_eq!(not_serving.status, ServingStatus::NotServing as i32);
    let end = tokio::time::timeout(common::EVENT_TIMEOUT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("stream ended");
    assert!(matches!(end, Ok(None)), "stream ended with {end:?}");
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Waits (up to the event timeout) for koo to log a line containing
/// `text`; fails showing what it did log.
fn assert_logged(server: &Running, text: &str) {
    let deadline = std::time::Instant::now() + common::EVENT_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if server.log.lock().unwrap().iter().any(|l| l.contains(text)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "koo never logged {text:?}; its log:\n{}",
        server.log.lock().unwrap().join("\n")
    );
}

/// With its Redis down (one server, or every seed of a Cluster), koo
/// serves NOT_SERVING, a WatchInvalidations stream ends UNAVAILABLE
/// rather than staying silent, and SIGTERM stops koo at once rather than
/// after the shutdown grace (30 s: Kubernetes' own, which would SIGKILL
/// it); the Cluster client's per-attempt reconnection lines stay out of
/// the log.
#[tokio::test]
async fn a_koo_whose_redis_is_down_stops_promptly_and_quietly() {
    for url in [
        format!("redis://127.0.0.1:{}/0", common::free_port()),
        format!("redis+cluster://127.0.0.1:{}/", common::free_port()),
    ] {
        let mut server = Running::start(&[("REDIS_URL", &url), ("KOO_SHUTDOWN_DRAIN", "0ms")]);
        // the workers have met the outage (their polls come a second apart)
        assert_logged(&server, "cannot lease");
        let mut cache = CacheServiceClient::new(server.channel().await);
        let first = tokio::time::timeout(common::EVENT_TIMEOUT, async {
            cache
                .watch_invalidations(pb::WatchInvalidationsRequest::default())
                .await?
                .into_inner()
                .message()
                .await
        })
        .await
        .expect("WatchInvalidations said nothing");
        let e = first.expect_err("a watch on a Redis that is down");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{url}: {e:?}");
        server.signal("TERM");
        let (server, status) = tokio::task::spawn_blocking(move || {
            let status = server.wait();
            (server, status)
        })
        .await
        .unwrap();
        assert!(status.success(), "{url}: {status:?}");
        let log = server.log.lock().unwrap();
        let chatter = log
            .iter()
            .filter(|l| l.contains("redis::cluster_handling"))
            .count();
        assert_eq!(
            chatter, 0,
            "{url}: {chatter} lines of the client's reconnections"
        );
        assert!(
            !log.iter()
                .any(|l| l.contains("did not stop within the shutdown grace")),
            "{url}: {}",
            log.join("\n")
        );
    }
}

/// A Redis that answers but refuses the URL's database stops start-up
/// with a message naming the setting (koo would otherwise serve
/// NOT_SERVING for ever); the task Redis's own setting is named for it.
#[tokio::test]
async fn a_database_redis_refuses_stops_start_up() {
    let redis = common::TestRedis::start().await;
    let good = redis.url();
    let bad = format!("redis://127.0.0.1:{}/9999", redis.port);
    for (env, setting) in [
        (vec![("REDIS_URL", bad.as_str())], "REDIS_URL"),
        (
            vec![
                ("REDIS_URL", good.as_str()),
                ("TASK_BROKER_URL", bad.as_str()),
            ],
            "TASK_BROKER_URL",
        ),
    ] {
        let mut child = koo()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let read = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut out);
            out
        });
        let deadline = std::time::Instant::now() + common::EVENT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{setting}: koo kept running on a database Redis refuses");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = read.join().unwrap();
        assert!(!status.success(), "{setting}: {log}");
        assert!(
            log.contains(&format!("{setting}: ")) && log.contains("refuses its database"),
            "{setting}: {log}"
        );
    }
}

/// KOO_LOG_FORMAT=json writes one JSON object per line, and a flag given on
/// the command line wins over its environment variable.
#[test]
fn json_logs_and_flags_override_environment() {
    let mut child = koo()
        .args(["serve", "--listen", "127.0.0.1:0", "--prefix", "from-flag"])
        .env("KOO_LOG_FORMAT", "json")
        .env("KOO_PREFIX", "bad prefix")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let first = lines.next().expect("a log line").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let parsed: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first}: {e}"));
    assert!(parsed.get("level").is_some(), "{parsed}");
    assert!(parsed.get("message").is_some(), "{parsed}");
}

/// koo whose stderr is closed (the reader of its log pipe gone) goes on
/// serving: a log line it cannot write is lost, never a panic of the call
/// that logged it (an admin call's audit line here).
#[tokio::test]
async fn a_closed_stderr_loses_log_lines_not_calls() {
    let (mut guard, lines) = common::serve_logged_then_close(&[("KOO_LOG", "debug")]);
    let addr = common::logged_addr(&lines, "koo serving gRPC").expect("an address");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cache = CacheServiceClient::new(channel);
    for _ in 0..3 {
        cache
            .clear_level(pb::ClearLevelRequest {
                level: pb::CacheLevel::App as i32,
            })
            .await
            .expect("an audited admin call answered with stderr closed");
    }
    assert!(
        guard.0.try_wait().unwrap().is_none(),
        "koo exited with stderr closed"
    );
}

/// `TOKIO_WORKER_THREADS` sets how many threads koo's runtime runs (the
/// README's advice for a machine shared with Redis depends on it): one when
/// asked for one, three for three, whatever the machine's CPUs.
#[test]
fn the_runtime_runs_the_threads_it_is_told() {
    for threads in [1, 3] {
        let running = Running::start(&[("TOKIO_WORKER_THREADS", &threads.to_string())]);
        let tasks = format!("/proc/{}/task", running.child.id());
        let count = || {
            std::fs::read_dir(&tasks)
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.trim() == "tokio-rt-worker")
                .count()
        };
        // a thread takes its name once it first runs, which on a loaded
        // machine can be after koo answers: read until the count settles
        // on the asked number or the wait ends
        let until = std::time::Instant::now() + common::EVENT_TIMEOUT;
        let mut workers = count();
        while workers < threads && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
            workers = count();
        }
        assert_eq!(
            workers, threads,
            "runtime threads with TOKIO_WORKER_THREADS={threads}"
        );
    }
}

/// The HTTP listener serves REST and grpc-web for every service, so a
/// non-loopback one without TLS or keys gets the same SECURITY warning as
/// the gRPC port; the loopback default gets none.
#[tokio::test]
async fn an_exposed_http_listener_is_warned_about() {
    let exposed = Running::start(&[("KOO_HTTP_LISTEN", "0.0.0.0:0")]);
    assert_logged(
        &exposed,
        "SECURITY: koo listens on a non-loopback address (KOO_HTTP_LISTEN)",
    );
    let local = Running::start(&[("KOO_HTTP_LISTEN", "127.0.0.1:0")]);
    local.channel().await;
    assert!(
        !local
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("SECURITY"))
    );
}

/// Keys without TLS on a non-loopback listener: the keys cross the network
/// readable, said at start-up; an empty keys file (no one admitted) is said
/// too.
#[test]
fn plaintext_keys_and_an_empty_keys_file_are_warned_about() {
    use crate::common::auth::{KeysFile, all_roles};
    let keys = KeysFile::new(&all_roles());
    let path = keys.path();
    let plaintext = Running::start(&[
        ("KOO_HTTP_LISTEN", "0.0.0.0:0"),
        ("KOO_AUTH_FILE", path.to_str().unwrap()),
    ]);
    assert_logged(
        &plaintext,
        "SECURITY: koo listens on a non-loopback address (KOO_HTTP_LISTEN) in PLAINTEXT: API keys",
    );
    let empty = KeysFile::new("");
    let path = empty.path();
    let locked = Running::start(&[("KOO_AUTH_FILE", path.to_str().unwrap())]);
    assert_logged(&locked, "holds no keys and no principals");
}

/// A server certificate clients would refuse is said at start-up, naming
/// the file and the setting (koo still starts: a rotation may be on its way).
#[test]
fn an_expired_server_certificate_is_logged() {
    use crate::common::certs::{Ca, CertDir};
    let dir = CertDir::new();
    let (cert, key) = dir.write_pair("server", &Ca::new("expiry-ca").expired_server());
    let server = Running::start(&[
        ("KOO_TLS_CERT", cert.to_str().unwrap()),
        ("KOO_TLS_KEY", key.to_str().unwrap()),
    ]);
    assert_logged(&server, "(KOO_TLS_CERT) expired on Jan  1 00:00:00 2021");
}

/// A schedule created through the API under a default's name is kept when
/// the configuration turns that default on, and the start-up log says that
/// the default does not run (it was silent: the maintenance task never ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_schedule_hiding_a_default_is_warned_about() {
    use koo::pb::schedule::v1 as spb;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();
    let mut first = Running::start(&[("KOO_DATA_DIR", dir), ("KOO_SCHEDULE_CACHE_WARM", "off")]);
    let mut c = spb::schedule_service_client::ScheduleServiceClient::new(first.channel().await);
    c.create_schedule(spb::CreateScheduleRequest {
        schedule: Some(spb::Schedule {
            name: "cache-warm".into(),
            cron: "0 4 * * *".into(),
            task: Some(spb::TaskTemplate {
                name: "koo.diagnostics.echo".into(),
                category: koo::pb::tasks::v1::TaskCategory::Research as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        paused: false,
    })
    .await
    .unwrap();
    drop(c);
    first.signal("TERM");
    let status = first.wait();
    assert!(
        status.success(),
        "{status:?}: {}",
        first.log.lock().unwrap().join("\n")
    );
    let second = Running::start(&[("KOO_DATA_DIR", dir)]);
    assert_logged(&second, "has a default schedule's name: it is kept");
}

/// An empty REDIS_URL (an empty secret, say) still means the embedded
/// store, as before, but says so at WARN: the replicas of such a deployment
/// would not share anything.
#[test]
fn an_empty_redis_url_is_warned_about() {
    let server = Running::start(&[("REDIS_URL", "")]);
    assert_logged(&server, "REDIS_URL is set but empty");
}

/// A warm file koo cannot read is said once at start-up (each warm-up
/// would otherwise fail only as a task).
#[test]
fn an_unreadable_warm_file_is_warned_about() {
    let server = Running::start(&[("KOO_CACHE_WARM_FILE", "/nonexistent/warm.jsonl")]);
    assert_logged(&server, "KOO_CACHE_WARM_FILE cannot be read");
}

/// Redis refusing koo's credentials (a wrong password) is logged as an
/// ERROR naming the URL's setting, once, beside the outage's warnings; the
/// password itself never reaches the log.
#[tokio::test]
async fn refused_credentials_are_an_error() {
    let redis = common::TestRedis::start().await;
    let mut conn = redis.conn().await;
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("the-right-one")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let url = format!("redis://:pw-not-logged@127.0.0.1:{}/0", redis.port);
    let server = Running::start(&[("REDIS_URL", &url)]);
    assert_logged(&server, "Redis refuses koo's credentials");
    let log = server.log.lock().unwrap();
    let line = log
        .iter()
        .find(|l| l.contains("refuses koo's credentials"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("REDIS_URL"),
        "{line}"
    );
    assert!(!log.iter().any(|l| l.contains("pw-not-logged")), "{log:#?}");
}
