//! grpc-web and CORS end to end: `koo serve` with its HTTP listener, called
//! by tonic-web's grpc-web client over HTTP/1.1 (what a browser's grpc-web
//! library sends) on both listeners: unary calls, a server stream, errors,
//! the auth gate; and CORS preflights as a browser sends them, with and
//! without `KOO_CORS_ORIGINS`.

use crate::common;

use common::tasks::submit;
use common::{ChildGuard as Guard, logged_addr, serve_logged};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use koo::pb::cache::v1::cache_service_client::CacheServiceClient;
use koo::pb::cache::v1::{self as cache_pb, CacheLevel, cache_value::Kind};
use koo::pb::tasks::v1 as pb;
use koo::pb::tasks::v1::task_service_client::TaskServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_web::{GrpcWebCall, GrpcWebClientLayer, GrpcWebClientService};
use tower::Layer as _;

/// A grpc-web transport over HTTP/1.1.
type Web = GrpcWebClientService<Client<HttpConnector, GrpcWebCall<tonic::body::Body>>>;

/// `koo serve` with its HTTP listener on an ephemeral port: the process,
/// the gRPC address and the HTTP address.
fn serve(env: &[(&str, &str)]) -> (Guard, String, String) {
    let env: Vec<(&str, &str)> = [("KOO_LOG", "info"), ("KOO_HTTP_LISTEN", "127.0.0.1:0")]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let (served, lines) = serve_logged(&env);
    let grpc = logged_addr(&lines, "koo serving gRPC")
        .unwrap_or_else(|| panic!("koo did not start: {lines:#?}"));
    let http = logged_addr(&lines, "koo serving HTTP").expect("an HTTP address");
    (served, grpc, http)
}

/// A grpc-web transport (HTTP/1.1 only, as tonic-web's client speaks it).
fn web() -> Web {
    GrpcWebClientLayer::new().layer(Client::builder(TokioExecutor::new()).build_http())
}

/// The origin a client of `addr` calls.
fn origin(addr: &str) -> http::Uri {
    format!("http://{addr}").parse().unwrap()
}

/// `message`, with `key` as a bearer token if set.
fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

fn set(key: &str, text: &str) -> cache_pb::SetRequest {
    cache_pb::SetRequest {
        level: CacheLevel::App as i32,
        key: key.into(),
        value: Some(cache_pb::CacheValue {
            kind: Some(Kind::Text(text.into())),
        }),
        ttl: None,
        ..Default::default()
    }
}

fn get(key: &str) -> cache_pb::GetRequest {
    cache_pb::GetRequest {
        level: CacheLevel::App as i32,
        key: key.into(),
    }
}

/// On either listener, a grpc-web client sets and gets a value, sees a bad
/// request's status with its message, and follows a task to its end over
/// a server stream (WatchTask), all over HTTP/1.1.
#[tokio::test]
async fn grpc_web_on_both_listeners() {
    let (_koo, grpc, http) = serve(&[]);
    for addr in [&grpc, &http] {
        let mut cache = CacheServiceClient::with_origin(web(), origin(addr));
        cache.set(set("web", addr)).await.unwrap();
        let got = cache.get(get("web")).await.unwrap().into_inner();
        assert!(got.found, "{addr}");
        let value = got.value.and_then(|v| v.kind);
        assert_eq!(value, Some(Kind::Text(addr.to_string())), "{addr}");
        let bad = cache
            .get(cache_pb::GetRequest {
                level: 99,
                key: "x".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{addr}: {bad:?}");
        assert!(bad.message().contains("level"), "{addr}: {bad:?}");

        let mut tasks = TaskServiceClient::with_origin(web(), origin(addr));
        let task = tasks
            .submit_task(submit("koo.diagnostics.noop", serde_json::json!({})))
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        let mut stream = tasks
            .watch_task(pb::WatchTaskRequest {
                task_id: task.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut last = None;
        while let Some(update) = stream.message().await.unwrap() {
            last = update.task;
        }
        let last = last.expect("the stream sent the task");
        assert_eq!(last.state, pb::TaskState::Succeeded as i32, "{addr}");
    }
}

/// grpc-web calls pass the same gate as gRPC ones on both listeners: no
/// key is UNAUTHENTICATED, a reader's write PERMISSION_DENIED, a writer's
/// write accepted.
#[tokio::test]
async fn grpc_web_calls_pass_the_auth_gate() {
    use common::auth::{KeysFile, READER, WRITER, all_roles};
    let keys = KeysFile::new(&all_roles());
    let path = keys.path();
    let (_koo, grpc, http) = serve(&[("KOO_AUTH_FILE", path.to_str().unwrap())]);
    for addr in [&grpc, &http] {
        let mut cache = CacheServiceClient::with_origin(web(), origin(addr));
        let none = cache.get(with_key(get("k"), None)).await.unwrap_err();
        assert_eq!(none.code(), Code::Unauthenticated, "{addr}: {none:?}");
        let reader = cache
            .set(with_key(set("k", "v"), Some(READER)))
            .await
            .unwrap_err();
        assert_eq!(reader.code(), Code::PermissionDenied, "{addr}: {reader:?}");
        cache
            .set(with_key(set("k", "v"), Some(WRITER)))
            .await
            .unwrap();
        let got = cache.get(with_key(get("k"), Some(READER))).await.unwrap();
        assert!(got.into_inner().found, "{addr}");
    }
}

/// One HTTP/1.1 request (one per connection); the status and the headers,
/// names lowercased.
async fn request(addr: &str, head: &str) -> (u16, Vec<(String, String)>) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let head = answer.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The preflight a browser sends before a grpc-web call from `from`.
fn preflight(from: &str) -> String {
    format!(
        "OPTIONS /koo.cache.v1.CacheService/Get HTTP/1.1\r\nOrigin: {from}\r\n\
         Access-Control-Request-Method: POST\r\n\
         Access-Control-Request-Headers: content-type,x-grpc-web,authorization"
    )
}

/// Without KOO_CORS_ORIGINS no CORS header is sent (a browser then lets
/// only same-origin pages call); with it, an allowed origin's preflight is
/// answered on both listeners (methods, the auth header, the exposed
/// grpc-status) and another origin's is not.
#[tokio::test]
async fn cors_only_for_the_configured_origins() {
    const APP: &str = "https://app.example.com";
    let (_plain, grpc, http) = serve(&[]);
    for addr in [&grpc, &http] {
        let (_, headers) = request(addr, &preflight(APP)).await;
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            None,
            "{addr}: {headers:?}"
        );
    }
    let (_cors, grpc, http) = serve(&[(
        "KOO_CORS_ORIGINS",
        "https://app.example.com, http://localhost:3000",
    )]);
    for addr in [&grpc, &http] {
        let (status, headers) = request(addr, &preflight(APP)).await;
        assert_eq!(status, 200, "{addr}: {headers:?}");
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            Some(APP),
            "{addr}: {headers:?}"
        );
        let allowed = header(&headers, "access-control-allow-headers").unwrap_or("");
        assert!(allowed.contains("authorization"), "{addr}: {headers:?}");
        assert!(allowed.contains("x-grpc-web"), "{addr}: {headers:?}");
        assert_eq!(header(&headers, "access-control-allow-credentials"), None);
        let (_, headers) = request(addr, &preflight("https://evil.example.com")).await;
        assert_eq!(
            header(&headers, "access-control-allow-origin"),
            None,
            "{addr}: {headers:?}"
        );
        // the call itself: its status headers are readable by the page
        let call = format!(
            "POST /koo.cache.v1.CacheService/Get HTTP/1.1\r\nOrigin: {APP}\r\n\
             Content-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\nContent-Length: 0"
        );
        let (status, headers) = request(addr, &call).await;
        assert_eq!(status, 200, "{addr}: {headers:?}");
        assert_eq!(header(&headers, "access-control-allow-origin"), Some(APP));
        let exposed = header(&headers, "access-control-expose-headers").unwrap_or("");
        assert!(exposed.contains("grpc-status"), "{addr}: {headers:?}");
    }
}

/// The HTTP listener answers what is neither a route nor gRPC with 404,
/// and the gRPC listener a plain HTTP/1.1 request with 400.
#[tokio::test]
async fn what_is_not_grpc_web() {
    let (_koo, grpc, http) = serve(&[]);
    let (status, _) = request(&http, "GET /nothing-here HTTP/1.1").await;
    assert_eq!(status, 404);
    let (status, _) = request(&grpc, "GET /metrics HTTP/1.1").await;
    assert_eq!(status, 400);
}

/// A KOO_CORS_ORIGINS entry that is no origin stops koo with a message
/// naming the setting and quoting the entry.
#[tokio::test]
async fn bad_cors_origins_fail_startup_naming_the_setting() {
    for value in ["app.example.com", "https://app.example.com/path"] {
        let stderr = common::serve_refused("KOO_CORS_ORIGINS", value);
        assert!(stderr.contains(value), "{value}: {stderr}");
    }
}

/// A revoked key ends a grpc-web stream too, on both listeners: the
/// refusal arrives as the stream's trailers (the check is on the response
/// body, below grpc-web's translation).
#[tokio::test]
async fn a_revoked_key_ends_a_grpc_web_stream() {
    use common::auth::{ADMIN, KeysFile, READER, all_roles, entry};
    let keys = KeysFile::new(&all_roles());
    let path = keys.path();
    let (_koo, grpc, http) = serve(&[
        ("KOO_AUTH_FILE", path.to_str().unwrap()),
        ("KOO_AUTH_RELOAD_INTERVAL", "100ms"),
    ]);
    let mut streams = Vec::new();
    for addr in [&grpc, &http] {
        let mut cache = CacheServiceClient::with_origin(web(), origin(addr));
        let request = with_key(cache_pb::WatchInvalidationsRequest::default(), Some(READER));
        let mut stream = cache
            .watch_invalidations(request)
            .await
            .unwrap()
            .into_inner();
        let ready = tokio::time::timeout(common::EVENT_TIMEOUT, stream.message()).await;
        let ready = ready.expect("the stream answers").unwrap().unwrap();
        assert_eq!(ready.kind, cache_pb::InvalidationKind::Ready as i32);
        streams.push(stream);
    }
    keys.write(&entry("ci-admin", "admin", ADMIN, ""));
    for stream in &mut streams {
        let end = tokio::time::timeout(common::EVENT_TIMEOUT, stream.message()).await;
        let end = end.expect("the stream ends").unwrap_err();
        assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    }
}
