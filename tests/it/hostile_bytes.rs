//! Hostile bytes on the gRPC port (RELIABILITY fault 14): garbage, an
//! HTTP/1.1 request, a gRPC message announcing 4 GiB, a truncated gRPC
//! frame, truncated protobuf and a value nested 500 deep. Each gets an error or a closed connection,
//! and koo keeps serving everyone else, also while a hostile connection is
//! held open. Raw sockets and raw HTTP/2 (the `h2` crate) against a real
//! koo server.

use crate::common;

use std::net::SocketAddr;

use common::{EVENT_TIMEOUT, Env};
use koo::pb::cache::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The HTTP/2 client preface a gRPC client opens with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A normal client's call succeeds (on a connection of its own).
async fn normal_call_succeeds(env: &Env) {
    let mut cache = env.cache();
    cache
        .set(pb::SetRequest {
            level: pb::CacheLevel::App as i32,
            key: "still-serving".into(),
            value: Some(pb::CacheValue {
                kind: Some(pb::cache_value::Kind::Text("yes".into())),
            }),
            ttl: None,
            ..Default::default()
        })
        .await
        .expect("a normal call succeeds");
    let got = cache
        .get(pb::GetRequest {
            level: pb::CacheLevel::App as i32,
            key: "still-serving".into(),
        })
        .await
        .expect("a normal call succeeds")
        .into_inner();
    assert!(got.found);
}

/// Writes `bytes` on a fresh connection, then reads until koo closes it;
/// what koo sent back. Panics if koo keeps the connection open.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // koo may close before reading everything: a failed write is an answer
    let _ = tcp.write_all(bytes).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(EVENT_TIMEOUT, tcp.read_to_end(&mut got)).await;
    match read {
        Ok(_) => got,
        Err(_) => panic!(
            "koo kept a connection open after {} hostile bytes",
            bytes.len()
        ),
    }
}

/// One gRPC call spoken by hand over HTTP/2: request headers for `path`,
/// then `body` as DATA (ending the stream when `end`). The grpc-status
/// koo answers with, and the stream's sender (dropping it resets the call).
async fn raw_grpc(
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
    end: bool,
) -> (String, h2::SendStream<bytes::Bytes>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(bytes::Bytes::from(body), end).unwrap();
    let answer = async {
        let response = response.await.expect("an HTTP/2 response");
        // a trailers-only answer carries grpc-status in its headers
        if let Some(s) = response.headers().get("grpc-status") {
            return s.to_str().unwrap().to_owned();
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("response data");
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap().expect("trailers");
        trailers["grpc-status"].to_str().unwrap().to_owned()
    };
    let status = tokio::time::timeout(EVENT_TIMEOUT, answer)
        .await
        .expect("koo answered the call");
    (status, send)
}

/// A gRPC message: the 5-byte prefix (uncompressed, big-endian length) and
/// the message.
fn frame(len: u32, message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    out
}

const GET: &str = "/koo.cache.v1.CacheService/Get";
const SET: &str = "/koo.cache.v1.CacheService/Set";

/// Garbage instead of the HTTP/2 preface, and garbage after a valid
/// preface: koo closes each connection, and serves a normal call after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_the_connection() {
    let env = Env::memory().await;
    let addr = env.server.addr;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    send_raw(addr, &garbage).await;
    let mut after_preface = PREFACE.to_vec();
    after_preface.extend_from_slice(&garbage);
    send_raw(addr, &after_preface).await;
    normal_call_succeeds(&env).await;
}

/// An HTTP/1.1 request on the gRPC port that is not grpc-web gets an
/// answer (400; HTTP/1.1 is accepted for grpc-web), never a hang; koo
/// serves a normal call after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_is_turned_away() {
    let env = Env::memory().await;
    let request =
        b"POST /koo.cache.v1.CacheService/Get HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n";
    let mut tcp = TcpStream::connect(env.server.addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    // the connection stays open (HTTP/1.1 keep-alive): read the answer's head
    let mut got = Vec::new();
    let head = tokio::time::timeout(EVENT_TIMEOUT, async {
        let mut buf = [0u8; 512];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    })
    .await
    .expect("koo answered an HTTP/1.1 request");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    normal_call_succeeds(&env).await;
}

/// A DATA frame whose gRPC prefix announces a 4 GiB message (0xFFFFFFFF)
/// gets OUT_OF_RANGE or RESOURCE_EXHAUSTED at once, without koo waiting
/// for (or allocating) the 4 GiB; while that call's stream and a
/// half-sent preface on another connection are held open, normal calls
/// succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_gib_length_prefix_is_refused_while_others_are_served() {
    let env = Env::memory().await;
    let addr = env.server.addr;
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&PREFACE[..10]).await.unwrap();
    let (status, held) = raw_grpc(addr, SET, frame(u32::MAX, b"\x0a\x01k"), false).await;
    assert!(
        status == (tonic::Code::OutOfRange as i32).to_string()
            || status == (tonic::Code::ResourceExhausted as i32).to_string(),
        "grpc-status {status}"
    );
    normal_call_succeeds(&env).await;
    drop(held);
    drop(stalled);
    normal_call_succeeds(&env).await;
}

/// A gRPC frame cut short (the prefix announces 100 bytes, 3 arrive, the
/// stream ends) and a complete frame of truncated protobuf (a key declared
/// 10 bytes long with 3 present) each get an error status, and a normal
/// call succeeds after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frames_and_protobuf_get_errors() {
    let env = Env::memory().await;
    let addr = env.server.addr;
    let (status, _) = raw_grpc(addr, GET, frame(100, b"\x12\x01k"), true).await;
    assert_ne!(status, "0", "a truncated frame is an error");
    let truncated = b"\x08\x01\x12\x0akey";
    let (status, _) = raw_grpc(addr, GET, frame(truncated.len() as u32, truncated), true).await;
    assert_eq!(
        status,
        (tonic::Code::InvalidArgument as i32).to_string(),
        "truncated protobuf"
    );
    normal_call_succeeds(&env).await;
    // a sanity check of the hand-made call: a valid Get is OK
    let valid = b"\x08\x01\x12\x03key";
    let (status, _) = raw_grpc(addr, GET, frame(valid.len() as u32, valid), true).await;
    assert_eq!(status, "0");
}

/// A JSON value nested 500 lists deep (past protobuf's recursion limit)
/// gets INVALID_ARGUMENT, not a crashed server; a normal call succeeds
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_is_refused() {
    use prost_types::{ListValue, Value, value::Kind};
    let env = Env::memory().await;
    let mut deep = Value {
        kind: Some(Kind::NullValue(0)),
    };
    for _ in 0..500 {
        deep = Value {
            kind: Some(Kind::ListValue(ListValue { values: vec![deep] })),
        };
    }
    let err = env
        .cache()
        .set(pb::SetRequest {
            level: pb::CacheLevel::App as i32,
            key: "deep".into(),
            value: Some(pb::CacheValue {
                kind: Some(pb::cache_value::Kind::Json(deep)),
            }),
            ttl: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    normal_call_succeeds(&env).await;
}
