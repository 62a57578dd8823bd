//! The seed's REST API end to end: `koo serve` with its HTTP listener on an
//! ephemeral port (the embedded store, and once Redis), called with the
//! real `curl` binary: the seed's own maintenance lines verbatim (but for
//! host:port), each of the twenty paths, the error shape, authentication
//! and the body limit.

use crate::common;

use std::time::{Duration, Instant};

use common::rest::{curl, curl_text, seed_maintenance, serve_both, serve_http};
use common::{EVENT_TIMEOUT, TestRedis};
use serde_json::{Value, json};

/// A task id of the right form that no task has.
const UNKNOWN_TASK: &str = "health_check~01a24685096e70e4a7c999d21f9a08ae";

fn get(http: &str, path: &str) -> (u16, Value) {
    curl(&[&format!("http://{http}{path}")])
}

fn post(http: &str, path: &str, body: &Value) -> (u16, Value) {
    curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data",
        &body.to_string(),
        &format!("http://{http}{path}"),
    ])
}

/// Polls `GET /api/v1/tasks/status/{id}` until `want` accepts the task (no
/// event to await over REST; WatchTask is a stream, not mapped).
fn status_until(http: &str, id: &str, want: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (code, body) = get(http, &format!("/api/v1/tasks/status/{id}"));
        assert_eq!(code, 200, "{body}");
        if want(&body["task"]) {
            return body["task"].clone();
        }
        assert!(started.elapsed() < EVENT_TIMEOUT, "task {id}: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ten cache paths, each once, with the fields their replies carry.
fn cache_paths(http: &str) {
    let (code, set) = post(
        http,
        "/api/v1/cache/set",
        &json!({"level": "CACHE_LEVEL_API", "key": "user:1", "value": {"json": {"name": "ada"}}, "ttl": "60s"}),
    );
    assert_eq!(code, 200, "{set}");
    assert_eq!(set["ttl"], "60s");
    assert_eq!(
        set["size_bytes"], "14",
        "64-bit integers are strings: {set}"
    );
    let (code, got) = get(http, "/api/v1/cache/get?level=CACHE_LEVEL_API&key=user:1");
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["found"], true);
    assert_eq!(got["value"]["json"], json!({"name": "ada"}));
    // JSON names and enum numbers work as well as proto names and enum names
    let (_, keys) = get(
        http,
        "/api/v1/cache/keys?level=3&pattern=user:*&pageSize=10",
    );
    assert_eq!(keys["keys"], json!(["user:1"]), "{keys}");
    let (code, deleted) = curl(&[
        "-X",
        "DELETE",
        &format!("http://{http}/api/v1/cache/delete?level=CACHE_LEVEL_API&key=user:1"),
    ]);
    assert_eq!(
        (code, &deleted["deleted"]),
        (200, &json!(true)),
        "{deleted}"
    );
    let (_, missed) = get(http, "/api/v1/cache/get?level=CACHE_LEVEL_API&key=user:1");
    assert_eq!(missed["found"], false, "defaults are written: {missed}");
    post(
        http,
        "/api/v1/cache/set",
        &json!({"key": "k", "value": {"text": "v"}}),
    );
    let (_, cleared) = post(
        http,
        "/api/v1/cache/clear",
        &json!({"level": "CACHE_LEVEL_APP"}),
    );
    assert_eq!(cleared["deleted_count"], "1", "{cleared}");
    let (_, health) = get(http, "/api/v1/cache/health");
    assert_eq!(health["healthy"], true, "{health}");
    let (_, metrics) = get(http, "/api/v1/cache/metrics");
    assert_eq!(metrics["metrics"]["total"]["sets"], "2", "{metrics}");
    let (_, cleanup) = post(http, "/api/v1/cache/cleanup", &json!({"wait": true}));
    assert!(cleanup["report"]["scanned_keys"].is_string(), "{cleanup}");
    let (_, maintenance) = post(http, "/api/v1/cache/maintenance", &json!({}));
    assert!(maintenance["task_id"].is_string(), "{maintenance}");
    let (_, warm) = post(
        http,
        "/api/v1/cache/warm",
        &json!({"entries": [{"key": "hot", "value": {"text": "x"}}], "wait": true}),
    );
    assert_eq!(warm["report"]["loaded"], "1", "{warm}");
}

/// The ten task paths, each once: submit, status, active, cancel, history,
/// retry, metrics, the AI query and the health check (cleanup is the
/// seed's own line).
fn task_paths(http: &str) {
    let (code, submitted) = post(
        http,
        "/api/v1/tasks/submit",
        &json!({"name": "koo.tasks.health_check.run", "category": "TASK_CATEGORY_HEALTH_CHECK", "countdown": "3600s"}),
    );
    assert_eq!(code, 200, "{submitted}");
    let id = submitted["task"]["id"].as_str().expect("an id").to_owned();
    assert_eq!(submitted["task"]["state"], "TASK_STATE_SCHEDULED");
    let task = status_until(http, &id, |t| t["state"] == "TASK_STATE_SCHEDULED");
    assert_eq!(task["name"], "koo.tasks.health_check.run");
    let (_, active) = get(
        http,
        "/api/v1/tasks/active?category=TASK_CATEGORY_HEALTH_CHECK",
    );
    assert!(
        active["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str()),
        "{active}"
    );
    let (code, cancelled) = post(
        http,
        &format!("/api/v1/tasks/cancel/{id}"),
        &json!({"reason": "not today"}),
    );
    assert_eq!(code, 200, "{cancelled}");
    assert_eq!(cancelled["task"]["state"], "TASK_STATE_CANCELLED");
    let (_, history) = get(http, "/api/v1/tasks/history?state=TASK_STATE_CANCELLED");
    assert_eq!(history["tasks"][0]["id"], id.as_str(), "{history}");
    let (code, retried) = post(http, &format!("/api/v1/tasks/retry/{id}"), &json!({}));
    assert_eq!(code, 200, "{retried}");
    // the built-in health check runs it at once
    status_until(http, &id, |t| t["state"] == "TASK_STATE_SUCCEEDED");
    let (_, ai) = post(
        http,
        "/api/v1/tasks/ai/query",
        &json!({"provider": "claude", "prompt": "hello"}),
    );
    assert_eq!(ai["task"]["queue"], "ai_service", "{ai}");
    let (_, check) = post(http, "/api/v1/tasks/health-check", &json!({}));
    let check_id = check["task"]["id"].as_str().expect("an id");
    status_until(http, check_id, |t| t["state"] == "TASK_STATE_SUCCEEDED");
    let (_, metrics) = get(http, "/api/v1/tasks/metrics");
    let ai_queue = metrics["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "ai_service")
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(ai_queue["queued"], "1", "{metrics}");
}

/// Errors: the HTTP status of the gRPC code and `google.rpc.Status` JSON;
/// a request that makes no message is 400 naming the field.
fn errors(http: &str) {
    let (code, body) = get(http, &format!("/api/v1/tasks/status/{UNKNOWN_TASK}"));
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["code"], 5, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(UNKNOWN_TASK),
        "{body}"
    );
    assert!(body["details"].is_array(), "{body}");
    let (code, body) = post(http, "/api/v1/tasks/submit", &json!({"name": ["x"]}));
    assert_eq!((code, &body["code"]), (400, &json!(3)), "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("\"name\""),
        "{body}"
    );
    let (code, body) = curl(&[
        "-X",
        "POST",
        "--data",
        "{not json",
        &format!("http://{http}/api/v1/tasks/submit"),
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("not JSON"),
        "{body}"
    );
    let (code, body) = get(http, "/api/v1/cache/get?key=a&colour=red");
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("\"colour\""),
        "{body}"
    );
    // a query that is not UTF-8 once decoded names no key: refused, not
    // read as U+FFFD (which `%C0` and `%FF` would both have become)
    for bad in ["key=%C0", "key=%FF%FE", "k%FFey=a", "key=%zz"] {
        let (code, body) = curl(&[
            "-X",
            "DELETE",
            &format!("http://{http}/api/v1/cache/delete?{bad}"),
        ]);
        assert_eq!((code, &body["code"]), (400, &json!(3)), "{bad}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("not UTF-8"),
            "{bad}: {body}"
        );
    }
    let (code, body) = get(http, "/api/v1/cache/get?key=caf%C3%A9+au+lait");
    assert_eq!(code, 200, "UTF-8 and `+` as a space still read: {body}");
    // a long body that is not JSON is quoted by its head, with its size
    let long = "z".repeat(5001);
    let (code, body) = curl(&[
        "-X",
        "POST",
        "--data",
        &long,
        &format!("http://{http}/api/v1/tasks/submit"),
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().ends_with("(5001 bytes)"),
        "{body}"
    );
    assert_eq!(get(http, "/api/v1/cache/set").0, 405, "set is a POST");
    let (code, body) = get(http, "/api/v1/cache/nothing");
    assert_eq!((code, &body["code"]), (404, &json!(5)), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("GET \"/api/v1/cache/nothing\""),
        "{body}"
    );
    // the seed's hours_old, checked by the RPC as older_than is
    let cleanup = |query: &str| {
        curl(&[
            "-X",
            "POST",
            &format!("http://{http}/api/v1/tasks/cleanup?{query}"),
        ])
    };
    let (code, body) = cleanup("hours_old=-1");
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("hours_old"),
        "{body}"
    );
    let (code, body) = cleanup("hours_old=2&older_than=60s");
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("older_than"),
        "{body}"
    );
    // the RPC's own validation, with its details
    let (code, body) = post(
        http,
        "/api/v1/tasks/ai/query",
        &json!({"provider": "claude"}),
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        body["details"][0]["field_violations"][0]["field"], "prompt",
        "{body}"
    );
}

/// Every path on the embedded store, the seed's lines first.
#[test]
fn the_seeds_paths_on_the_embedded_store() {
    let (_koo, http) = serve_http(&[]);
    seed_maintenance(&http);
    cache_paths(&http);
    task_paths(&http);
    errors(&http);
}

/// The seed's lines and a task's round trip on Redis.
#[tokio::test]
async fn the_seeds_lines_on_redis() {
    let redis = TestRedis::start().await;
    let url = redis.url();
    let (_koo, http) = serve_http(&[("REDIS_URL", url.as_str())]);
    seed_maintenance(&http);
    let (_, check) = post(&http, "/api/v1/tasks/health-check", &json!({}));
    let id = check["task"]["id"].as_str().expect("an id");
    let task = status_until(&http, id, |t| t["state"] == "TASK_STATE_SUCCEEDED");
    assert_eq!(task["attempts"], 1, "{task}");
    let (_, health) = get(&http, "/api/v1/cache/health");
    assert_eq!(health["backend"], "BACKEND_KIND_REDIS", "{health}");
}

/// With keys, a REST call is authenticated as a gRPC call: 401 without a
/// key, 403 for a reader on a write path, 200 with the right key (as a
/// bearer token); a body over KOO_MAX_MESSAGE_SIZE is 413, but a refused
/// caller's body is not read; `/metrics` counts the calls.
#[test]
fn keys_roles_and_the_body_limit() {
    use common::auth::{KeysFile, READER, WRITER, all_roles};
    let keys = KeysFile::new(&all_roles());
    let path = keys.path();
    let (_koo, http) = serve_http(&[
        ("KOO_AUTH_FILE", path.to_str().unwrap()),
        ("KOO_MAX_MESSAGE_SIZE", "65536"),
    ]);
    let health = format!("http://{http}/api/v1/cache/health");
    let (code, body) = curl(&[&health]);
    assert_eq!((code, &body["code"]), (401, &json!(16)), "{body}");
    let reader = format!("authorization: Bearer {READER}");
    let (code, body) = curl(&["-H", &reader, &health]);
    assert_eq!((code, &body["healthy"]), (200, &json!(true)), "{body}");
    let warm = format!("http://{http}/api/v1/cache/warm");
    let (code, body) = curl(&["-X", "POST", "-H", &reader, &warm]);
    assert_eq!((code, &body["code"]), (403, &json!(7)), "{body}");
    let writer = format!("authorization: Bearer {WRITER}");
    let (code, body) = curl(&["-X", "POST", "-H", &writer, &warm]);
    assert_eq!(code, 200, "{body}");
    assert!(body["task_id"].is_string(), "{body}");
    let big = json!({"key": "k", "value": {"text": "x".repeat(70_000)}}).to_string();
    let set = format!("http://{http}/api/v1/cache/set");
    let (code, body) = curl(&["-X", "POST", "-H", &writer, "--data", &big, &set]);
    assert_eq!((code, &body["code"]), (413, &json!(8)), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("KOO_MAX_MESSAGE_SIZE"),
        "{body}"
    );
    // a caller the gate refuses is refused before its body is read: no
    // key, or a reader's write, gets 401 / 403 whatever it sends
    let (code, body) = curl(&["-X", "POST", "--data", &big, &set]);
    assert_eq!((code, &body["code"]), (401, &json!(16)), "{body}");
    let (code, body) = curl(&["-X", "POST", "-H", &reader, "--data", "{not json", &set]);
    assert_eq!((code, &body["code"]), (403, &json!(7)), "{body}");
    // counted as the gRPC port's calls are, refusals included
    let metrics = format!("http://{http}/metrics");
    let (code, text) = curl_text(&["-H", &reader, &metrics]);
    assert_eq!(code, 200, "{text}");
    for counted in [
        r#"grpc_method="GetHealth",grpc_code="Unauthenticated"} 1"#,
        r#"grpc_method="GetHealth",grpc_code="OK"} 1"#,
        r#"grpc_method="Warm",grpc_code="PermissionDenied"} 1"#,
        r#"grpc_method="Warm",grpc_code="OK"} 1"#,
    ] {
        assert!(text.contains(counted), "{counted} in\n{text}");
    }
}

/// REST calls and gRPC calls share one KOO_MAX_INFLIGHT_CALLS bound: with
/// one slot held by a gRPC LeaseTask waiting for work, a REST call is 429
/// (code 8) naming the limit; once the lease call ends, REST is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_grpc_share_the_inflight_bound() {
    use koo::pb::worker::v1::{LeaseTaskRequest, worker_service_client::WorkerServiceClient};
    let (_koo, http, grpc) = common::rest::serve_both(&[("KOO_MAX_INFLIGHT_CALLS", "1")]);
    let mut worker = WorkerServiceClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    let holder = tokio::spawn(async move {
        worker
            .lease_task(LeaseTaskRequest {
                worker_name: "holder".into(),
                queues: vec!["research".into()],
                wait: Some(common::tasks::millis(30_000)),
                ..Default::default()
            })
            .await
    });
    let started = Instant::now();
    let refused = loop {
        let (code, body) = tokio::task::spawn_blocking({
            let http = http.clone();
            move || get(&http, "/api/v1/tasks/metrics")
        })
        .await
        .unwrap();
        if code == 429 {
            break body;
        }
        assert_eq!(code, 200, "{body}");
        assert!(!holder.is_finished(), "the held call ended early");
        assert!(started.elapsed() < EVENT_TIMEOUT, "never shed");
        // no event to await: the lease call takes its slot on koo's side
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(refused["code"], 8, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("KOO_MAX_INFLIGHT_CALLS"),
        "{refused}"
    );
    holder.abort();
    let started = Instant::now();
    loop {
        let (code, body) = tokio::task::spawn_blocking({
            let http = http.clone();
            move || get(&http, "/api/v1/tasks/metrics")
        })
        .await
        .unwrap();
        if code == 200 {
            break;
        }
        assert_eq!(code, 429, "{body}");
        assert!(
            started.elapsed() < EVENT_TIMEOUT,
            "the slot was never given back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Under mTLS a REST call's principal is its connection's certificate, as
/// for gRPC: a writer principal may set but not clear (403 naming it), a
/// certificate no principal names is 401.
#[test]
fn mtls_principals_over_rest() {
    use common::auth::{ADMIN, KeysFile, entry};
    use common::certs::{Ca, CertDir};
    let dir = CertDir::new();
    let ca = Ca::new("rest-test-ca");
    let (cert, key) = dir.write_pair("server", &ca.server("localhost"));
    let ca_file = dir.write("ca.pem", &ca.cert);
    let (api_cert, api_key) = dir.write_pair("api", &ca.client("spiffe://prod/api"));
    let (other_cert, other_key) = dir.write_pair("other", &ca.client("spiffe://prod/other"));
    let keys = KeysFile::new(&format!(
        "{}[[principal]]\nname = \"spiffe://prod/api\"\nrole = \"writer\"\n",
        entry("ops", "admin", ADMIN, "")
    ));
    let path = keys.path();
    let (_koo, http) = serve_http(&[
        ("KOO_TLS_CERT", cert.to_str().unwrap()),
        ("KOO_TLS_KEY", key.to_str().unwrap()),
        ("KOO_TLS_CLIENT_CA", ca_file.to_str().unwrap()),
        ("KOO_AUTH_FILE", path.to_str().unwrap()),
    ]);
    let port = http.rsplit_once(':').unwrap().1;
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = |path: &str| format!("https://localhost:{port}{path}");
    let as_client = |cert: &std::path::Path, key: &std::path::Path, args: &[&str]| {
        let mut all = vec![
            "--resolve",
            &resolve,
            "--cacert",
            ca_file.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        curl(&all)
    };
    let set = url("/api/v1/cache/set");
    let (code, body) = as_client(
        &api_cert,
        &api_key,
        &[
            "-X",
            "POST",
            "--data",
            r#"{"key": "k", "value": {"text": "v"}}"#,
            &set,
        ],
    );
    assert_eq!(code, 200, "{body}");
    let clear = url("/api/v1/cache/clear");
    let (code, body) = as_client(&api_cert, &api_key, &["-X", "POST", &clear]);
    assert_eq!((code, &body["code"]), (403, &json!(7)), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("spiffe://prod/api"),
        "{body}"
    );
    let (code, body) = as_client(&other_cert, &other_key, &[&url("/api/v1/cache/health")]);
    assert_eq!((code, &body["code"]), (401, &json!(16)), "{body}");
}

/// An HTTP/1 request's head is bounded in size (64 KiB: past it, `431`,
/// where hyper's own default read about 400 KiB), while a head with 40 KiB
/// of headers is served.
#[test]
fn request_heads_are_bounded_in_size() {
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream;

    let (_koo, http) = serve_http(&[]);
    let exchange = |head: &str| -> String {
        let mut tcp = TcpStream::connect(&http).expect("connect");
        tcp.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        tcp.write_all(head.as_bytes()).expect("send");
        let mut reply = vec![0; 512];
        let n = tcp.read(&mut reply).expect("a reply");
        String::from_utf8_lossy(&reply[..n]).into_owned()
    };
    let with_header = |bytes: usize| {
        format!(
            "GET /api/v1/cache/health HTTP/1.1\r\nhost: localhost\r\nx-padding: {}\r\nconnection: close\r\n\r\n",
            "p".repeat(bytes)
        )
    };
    let served = exchange(&with_header(40 * 1024));
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let refused = exchange(&with_header(70 * 1024));
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
}

/// A browser cannot act for another site on an open koo (no keys): a
/// form-style POST that names another origin, or that the browser marks
/// cross-site, is refused 403 and changes nothing; a request to a name a
/// page may have rebound to 127.0.0.1 is refused on both listeners (a
/// grpc-web call PERMISSION_DENIED). Clients that are not browsers, the
/// same origin, and what `KOO_CORS_ORIGINS` / `KOO_ALLOWED_HOSTS` allow
/// pass.
#[test]
fn browsers_cannot_act_for_other_sites() {
    let (_koo, http, grpc) = serve_both(&[]);
    let set = json!({"level": "CACHE_LEVEL_APP", "key": "victim", "value": {"json": 1}});
    assert_eq!(post(&http, "/api/v1/cache/set", &set).0, 200);
    let clear = format!("http://{http}/api/v1/cache/clear?level=CACHE_LEVEL_APP");
    let form = "content-type: application/x-www-form-urlencoded";
    for header in ["origin: https://evil.example", "sec-fetch-site: cross-site"] {
        let (code, why) = curl_text(&["-X", "POST", "-H", form, "-H", header, &clear]);
        assert_eq!(code, 403, "{header}: {why}");
        assert!(why.contains("KOO_CORS_ORIGINS"), "{why}");
    }
    let read = format!("http://{http}/api/v1/cache/get?level=CACHE_LEVEL_APP&key=victim");
    let (code, got) = curl(&[&read]);
    assert_eq!(
        (code, got["value"]["json"].as_f64()),
        (200, Some(1.0)),
        "still there: {got}"
    );
    let rebound = format!("host: evil.example:{}", http.rsplit(':').next().unwrap());
    let (code, why) = curl_text(&["-H", &rebound, &read]);
    assert_eq!(code, 403, "{why}");
    assert!(why.contains("DNS rebinding"), "{why}");
    assert_eq!(curl(&["-H", "host: localhost", &read]).0, 200);
    // grpc-web on the gRPC port: refused in the call's own terms
    let (_, head) = curl_text(&[
        "-i",
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc-web+proto",
        "-H",
        "host: evil.example",
        "--data-binary",
        "",
        &format!("http://{grpc}/koo.cache.v1.CacheService/GetHealth"),
    ]);
    assert!(head.contains("grpc-status: 7"), "{head}");
    // the same origin (the dashboard) and a client without the headers
    let own = format!("origin: http://{http}");
    assert_eq!(curl(&["-X", "POST", "-H", form, "-H", &own, &clear]).0, 200);

    let (_koo, http) = serve_http(&[
        ("KOO_CORS_ORIGINS", "https://app.example.com"),
        ("KOO_ALLOWED_HOSTS", "koo.example.com"),
    ]);
    let clear = format!("http://{http}/api/v1/cache/clear?level=CACHE_LEVEL_APP");
    let app = "origin: https://app.example.com";
    assert_eq!(curl(&["-X", "POST", "-H", form, "-H", app, &clear]).0, 200);
    let proxied = "host: koo.example.com";
    assert_eq!(
        curl(&["-H", proxied, &format!("http://{http}/metrics")]).0,
        200
    );
}
