//! Prometheus metrics end to end: `koo serve` with its HTTP listener on an
//! ephemeral port, scraped every second by a real `prometheus` (Debian's
//! package, which `scripts/test` installs) that the test starts on a free
//! port, and queried through Prometheus's HTTP API; `KOO_HTTP_LISTEN=off`
//! and bad values.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tasks::{is_final, submit, wait_task};
use common::{ChildGuard as Guard, free_port, logged_addr, serve_logged};
use koo::pb::cache::v1::{self as cache_pb, CacheLevel, cache_value::Kind};
use koo::pb::tasks::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// How long Prometheus may take to show a value.
const QUERY_DEADLINE: Duration = Duration::from_secs(30);

/// `koo serve` on ephemeral ports with `env`: the process, the gRPC
/// address, the HTTP address if it announced one (it does so before the
/// gRPC line), and the lines logged until then.
fn serve(env: &[(&str, &str)]) -> (Guard, String, Option<String>, Vec<String>) {
    let env: Vec<(&str, &str)> = [("KOO_LOG", "info")]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let (served, lines) = serve_logged(&env);
    let grpc = logged_addr(&lines, "koo serving gRPC")
        .unwrap_or_else(|| panic!("koo did not start: {lines:#?}"));
    let http = logged_addr(&lines, "koo serving HTTP");
    (served, grpc, http, lines)
}

/// The body of `GET http://{addr}{path}` (HTTP/1.1, one request per
/// connection: all these tests need of a client).
pub(crate) async fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_get_as(addr, path, None).await
}

/// [`http_get`] with `Authorization: Bearer <key>` when `key` is set.
async fn http_get_as(addr: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    // a refused request (a TLS port, say) may reset: status 0
    let _ = conn.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// A `prometheus` scraping `target` every second, on a free port with its
/// storage in `dir`.
fn prometheus(target: &str, dir: &Path) -> (Guard, String) {
    let bin = std::env::var("KOO_TEST_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: koo\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(&bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {bin} ({e}): scripts/test installs it (apt-get install prometheus)"
            )
        });
    (Guard(child), addr)
}

/// The value of the instant query `promql` (summed over its series), once
/// `want` accepts it; panics with the last answer past the deadline.
async fn query_until(prom: &str, promql: &str, want: impl Fn(f64) -> bool) -> f64 {
    let started = Instant::now();
    let path = format!("/api/v1/query?query={}", encode(&format!("sum({promql})")));
    let mut last = String::new();
    while started.elapsed() < QUERY_DEADLINE {
        // Prometheus may not be listening yet: that is an answer to wait out
        if tokio::net::TcpStream::connect(prom).await.is_ok() {
            let (_, body) = http_get(prom, &path).await;
            if let Some(v) = value_of(&body)
                && want(v)
            {
                return v;
            }
            last = body;
        }
        // no event to await: Prometheus scrapes on its own clock
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{promql}: no accepted value within {QUERY_DEADLINE:?}; last answer: {last}");
}

/// The sample value of a vector answer with one series.
fn value_of(body: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let sample = v["data"]["result"].get(0)?;
    sample["value"][1].as_str()?.parse().ok()
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Cache calls (a set, a hit, two misses) and a task run to its end.
async fn some_calls(grpc: &str) {
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cache = cache_pb::cache_service_client::CacheServiceClient::new(channel.clone());
    let get = |key: &str| cache_pb::GetRequest {
        level: CacheLevel::App as i32,
        key: key.into(),
    };
    cache
        .set(cache_pb::SetRequest {
            level: CacheLevel::App as i32,
            key: "k".into(),
            value: Some(cache_pb::CacheValue {
                kind: Some(Kind::Text("v".into())),
            }),
            ttl: None,
            ..Default::default()
        })
        .await
        .unwrap();
    cache.get(get("k")).await.unwrap();
    for key in ["nope", "nope2"] {
        cache.get(get(key)).await.unwrap();
    }
    let mut tasks = pb::task_service_client::TaskServiceClient::new(channel);
    let task = tasks
        .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let done = wait_task(&mut tasks, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
}

/// A real Prometheus scraping koo sees the gRPC calls by method and code,
/// the cache's hits and misses, the succeeded task and the worker slots.
#[tokio::test]
async fn prometheus_scrapes_grpc_cache_and_task_figures() {
    let (_koo, grpc, http, _) = serve(&[("KOO_HTTP_LISTEN", "127.0.0.1:0")]);
    let http = http.expect("koo announced its HTTP address");
    some_calls(&grpc).await;
    let (status, text) = http_get(&http, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    // submits given straight to an idle slot, per queue (how many depends
    // on whether a slot was on the board: the family is what is checked)
    assert!(
        sample(&text, "koo_task_handoffs_total", &[r#"queue="research""#]).is_some(),
        "{text}"
    );
    // task times run past the request bounds' 10 s, up to an hour
    for bound in ["10.0", "60.0", "3600.0"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("koo_task_run_seconds_bucket{")
                    && l.contains(r#"queue="research""#)
                    && l.contains(&format!("le=\"{bound}\""))),
            "no {bound} s bucket in {text}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (_prom, prom) = prometheus(&http, dir.path());
    let get = r#"grpc_server_handled_total{grpc_service="koo.cache.v1.CacheService",grpc_method="Get",grpc_code="OK"}"#;
    assert_eq!(query_until(&prom, get, |v| v >= 3.0).await, 3.0);
    let started = r#"grpc_server_started_total{grpc_method="Get"}"#;
    assert_eq!(query_until(&prom, started, |v| v >= 3.0).await, 3.0);
    let seconds = r#"grpc_server_handling_seconds_count{grpc_method="Get"}"#;
    assert_eq!(query_until(&prom, seconds, |v| v >= 3.0).await, 3.0);
    let hits = r#"koo_cache_hits_total{level="app"}"#;
    assert_eq!(query_until(&prom, hits, |v| v >= 1.0).await, 1.0);
    let misses = r#"koo_cache_misses_total{level="app"}"#;
    assert_eq!(query_until(&prom, misses, |v| v >= 2.0).await, 2.0);
    let succeeded = r#"koo_tasks_outcomes_total{queue="research",outcome="succeeded"}"#;
    assert_eq!(query_until(&prom, succeeded, |v| v >= 1.0).await, 1.0);
    let own = r#"koo_tasks_total{queue="research",outcome="succeeded"}"#;
    assert_eq!(query_until(&prom, own, |v| v >= 1.0).await, 1.0);
    let ran = r#"koo_task_run_seconds_count{queue="research"}"#;
    assert_eq!(query_until(&prom, ran, |v| v >= 1.0).await, 1.0);
    // the built-in pool: 4 slots by default
    assert_eq!(
        query_until(&prom, "koo_worker_slots", |v| v > 0.0).await,
        4.0
    );
    dashboard_queries_name_exported_metrics(&text, &prom).await;
}

/// Every PromQL expression of deploy/grafana/koo-dashboard.json names only
/// metrics of `scrape` (a real one), and Prometheus accepts each.
async fn dashboard_queries_name_exported_metrics(scrape: &str, prom: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/koo-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let exported = |name: &str| {
        scrape
            .lines()
            .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
    };
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{expr}: no metric found");
        for name in names {
            assert!(exported(&name), "{expr}: koo exports no {name}");
        }
        let promql = expr.replace("$__rate_interval", "10s");
        let path = format!("/api/v1/query?query={}", encode(&promql));
        let (status, body) = http_get(prom, &path).await;
        assert_eq!(status, 200, "{expr}: {body}");
    }
}

/// The metric names of a PromQL expression: its identifiers, less label
/// matchers (`{..}`), ranges (`[..]`), strings, `by (..)`/`without (..)`
/// lists, function names (followed by `(`), keywords and numbers.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: [&str; 9] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
    ];
    // what closes the matcher, range or string being skipped
    let mut closer: Option<char> = None;
    let mut plain = String::new();
    for c in expr.chars() {
        match (closer, c) {
            (None, '{') => closer = Some('}'),
            (None, '[') => closer = Some(']'),
            (None, '"') => closer = Some('"'),
            (None, _) => plain.push(c),
            // a string inside a matcher: its braces are text
            (Some('}'), '"') => closer = Some('\u{1}'),
            (Some('\u{1}'), '"') => closer = Some('}'),
            (Some(end), _) if c == end => {
                closer = None;
                plain.push(' ');
            }
            _ => {}
        }
    }
    let mut names = Vec::new();
    let mut skip_list = false;
    let mut rest = plain.as_str();
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '(') {
        rest = &rest[start..];
        if rest.starts_with('(') {
            rest = &rest[1..];
            if skip_list {
                // the label list of `by (..)`: up to its `)`
                rest = &rest[rest.find(')').map_or(rest.len(), |i| i + 1)..];
                skip_list = false;
            }
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let word = &rest[..end];
        rest = &rest[end..];
        let next = rest.trim_start();
        let call = next.starts_with('(') || next.starts_with("by ") || next.starts_with("without ");
        if word == "by" || word == "without" {
            skip_list = true;
        } else if !call && !KEYWORDS.contains(&word) {
            names.push(word.to_owned());
        }
    }
    names
}

/// Names come out of functions, aggregations and selectors; labels,
/// ranges and keywords do not.
#[test]
fn metric_names_of_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, op) (rate(koo_cache_operation_seconds_bucket{op="get"}[$__rate_interval]))) / max(koo_workers)"#,
    );
    assert_eq!(names, ["koo_cache_operation_seconds_bucket", "koo_workers"]);
}

/// The listening TCP sockets of process `pid` (from /proc).
fn listening_sockets(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.trim_end_matches(']').to_owned())
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(3) == Some(&"0A") && f.get(9).is_some_and(|i| inodes.iter().any(|n| n == i))
        })
        .count()
}

/// `KOO_HTTP_LISTEN=off`: no HTTP address announced and one listening
/// socket (gRPC's); with an address, two.
#[tokio::test]
async fn http_listen_off_serves_nothing() {
    let (off, _, http, lines) = serve(&[("KOO_HTTP_LISTEN", "off")]);
    assert_eq!(http, None, "{lines:#?}");
    assert_eq!(listening_sockets(off.0.id()), 1);
    let (on, _, http, _) = serve(&[("KOO_HTTP_LISTEN", "127.0.0.1:0")]);
    assert!(http.is_some());
    assert_eq!(listening_sockets(on.0.id()), 2);
}

/// A value that is no address, or an address in use, stops koo with a
/// message naming KOO_HTTP_LISTEN.
#[tokio::test]
async fn bad_http_listen_fails_startup_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let in_use = taken.local_addr().unwrap().to_string();
    for value in ["localhost", "127.0.0.1", in_use.as_str()] {
        common::serve_refused("KOO_HTTP_LISTEN", value);
    }
}

/// With a keys file, `/metrics` needs what GetMetrics needs: no key is
/// 401, a worker key 403, a reader key the metrics.
#[tokio::test]
async fn metrics_need_a_reader_key_when_keys_are_configured() {
    use common::auth::{KeysFile, READER, WORKER, all_roles};
    let keys = KeysFile::new(&all_roles());
    let path = keys.path();
    let (_koo, _, http, _) = serve(&[
        ("KOO_HTTP_LISTEN", "127.0.0.1:0"),
        ("KOO_AUTH_FILE", path.to_str().unwrap()),
    ]);
    let http = http.expect("koo announced its HTTP address");
    let (status, body) = http_get_as(&http, "/metrics", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("needs credentials"), "{body}");
    let (status, body) = http_get_as(&http, "/metrics", Some("koo_not-a-key")).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = http_get_as(&http, "/metrics", Some(WORKER)).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = http_get_as(&http, "/metrics", Some(READER)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("grpc_server_started_total"), "{body}");
}

/// With KOO_TLS_*, the HTTP listener speaks HTTPS with the gRPC port's
/// certificate to a client that offers only HTTP/1.1 (as curl --http1.1 and
/// Python's urllib3 do), and a plaintext request gets no answer.
#[tokio::test]
async fn metrics_over_https_with_the_grpc_certificate() {
    use common::certs::{Ca, CertDir};
    let dir = CertDir::new();
    let ca = Ca::new("metrics-test-ca");
    let server = ca.server("localhost");
    let (cert, key) = dir.write_pair("server", &server);
    let (_koo, _, http, _) = serve(&[
        ("KOO_HTTP_LISTEN", "127.0.0.1:0"),
        ("KOO_TLS_CERT", cert.to_str().unwrap()),
        ("KOO_TLS_KEY", key.to_str().unwrap()),
    ]);
    let http: std::net::SocketAddr = http.expect("an HTTP address").parse().unwrap();
    let (mut tls, presented) =
        common::tls::tls_stream_alpn(http, &ca.cert, None, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(presented, server.der());
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // a TLS peer may close without close_notify once it has answered
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("grpc_server_started_total"));
    let (status, _) = http_get(&http.to_string(), "/metrics").await;
    assert_eq!(status, 0, "a plaintext request was answered");
}

/// The sum of the samples of `name` with every label in `labels` (`k="v"`
/// strings) in an OpenMetrics text; `None` when there is none.
pub(crate) fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// `/metrics` of a process started with KOO_HTTP_LISTEN=`addr`, once it
/// answers with a sample of `name` that `want` accepts.
async fn scrape_until(
    addr: &str,
    name: &str,
    labels: &[&str],
    want: impl Fn(f64) -> bool,
) -> String {
    let until = Instant::now() + QUERY_DEADLINE;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let (status, text) = http_get(addr, "/metrics").await;
            if status == 200 && sample(&text, name, labels).is_some_and(&want) {
                return text;
            }
        }
        assert!(
            Instant::now() < until,
            "{addr}: no {name} {labels:?} in time"
        );
        // the process's counters have no event a test can await
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `koo worker` serves its own `/metrics` when KOO_HTTP_LISTEN is set: the
/// task its slot ran is counted there (koo serve, with no slots, counts
/// only the submit), with the queues' shared figures and no gRPC or cache
/// series. `koo scheduler` counts its fires. Off by default: no listener.
#[tokio::test]
async fn worker_and_scheduler_serve_their_own_metrics() {
    use common::tasks::{is_final, submit_ok, worker_with};
    let redis = common::TestRedis::start().await;
    let url = redis.url();
    let (_koo, grpc, _, _) = serve(&[
        ("REDIS_URL", url.as_str()),
        ("KOO_WORKER_CONCURRENCY", "0"),
        ("KOO_NO_SCHEDULER", "true"),
    ]);
    let worker_http = format!("127.0.0.1:{}", free_port());
    let worker = Guard(worker_with(
        &redis,
        &[("KOO_HTTP_LISTEN", worker_http.as_str())],
    ));
    let quiet = Guard(worker_with(&redis, &[]));
    // both announced (the quiet one up): it listens on nothing by default;
    // then it goes, so that the scraped worker runs what follows (two
    // workers racing for each task left it all to one under load)
    scrape_until(&worker_http, "koo_workers", &[], |n| n >= 2.0).await;
    assert_eq!(
        listening_sockets(quiet.0.id()),
        0,
        "a worker listened by default"
    );
    drop(quiet);
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = pb::task_service_client::TaskServiceClient::new(channel);
    let noop = || submit("koo.diagnostics.noop", serde_json::json!({}));
    let task = submit_ok(&mut tasks, noop()).await;
    let done = wait_task(&mut tasks, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    // the worker's listener may still be coming up: wait until it answers
    scrape_until(&worker_http, "koo_worker_slots", &[], |_| true).await;
    // the worker counts it (its counters are flushed, not awaited)
    let text = scrape_until(
        &worker_http,
        "koo_tasks_total",
        &[r#"outcome="succeeded""#],
        |n| n >= 1.0,
    )
    .await;
    assert!(sample(&text, "koo_worker_slots", &[]).is_some(), "{text}");
    assert!(!text.contains("grpc_server_"), "{text}");
    assert!(!text.contains("koo_cache_"), "{text}");
    drop(worker);

    let scheduler_http = format!("127.0.0.1:{}", free_port());
    let scheduler = std::process::Command::new(env!("CARGO_BIN_EXE_koo"))
        .arg("scheduler")
        .env("REDIS_URL", &url)
        .env("KOO_HTTP_LISTEN", &scheduler_http)
        // every second (six fields), so that a fire comes at once
        .env("KOO_SCHEDULE_HEALTH_CHECK", "* * * * * *")
        .env("KOO_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn koo scheduler");
    let _scheduler = Guard(scheduler);
    scrape_until(&scheduler_http, "koo_schedule_fires_total", &[], |n| {
        n >= 1.0
    })
    .await;
}
