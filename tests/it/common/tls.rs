//! Clients for the TLS tests: tonic channels over TLS (optionally with a
//! client certificate), raw TLS streams that show the certificate the
//! server presented, and grpc.health.v1 calls spoken by hand over HTTP/2 (to
//! watch a connection's own fate, which a tonic channel hides by
//! reconnecting).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::EVENT_TIMEOUT;
use super::certs::Pair;

/// A TLS channel to `addr` trusting `ca`, presenting `client` if given.
pub async fn connect(
    addr: SocketAddr,
    ca: &str,
    client: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether a health check over TLS (with `client`'s certificate) succeeds.
pub async fn health_over_tls(addr: SocketAddr, ca: &str, client: Option<&Pair>) -> bool {
    match connect(addr, ca, client).await {
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .is_ok(),
        Err(_) => false,
    }
}

/// Waits until the server as a whole reports SERVING over `channel`.
pub async fn wait_serving(channel: Channel) {
    let mut stream = HealthClient::new(channel)
        .watch(HealthCheckRequest::default())
        .await
        .expect("health watch")
        .into_inner();
    tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(m) = stream.message().await.expect("health stream") {
            if m.status == ServingStatus::Serving as i32 {
                return;
            }
        }
    })
    .await
    .expect("never SERVING");
}

/// A raw TLS connection trusting `ca` (ALPN h2), and the certificate the
/// server presented.
pub async fn tls_stream(
    addr: SocketAddr,
    ca: &str,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    tls_stream_as(addr, ca, None).await
}

/// [`tls_stream`] presenting `client`'s certificate.
pub async fn tls_stream_as(
    addr: SocketAddr,
    ca: &str,
    client: Option<&Pair>,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    tls_stream_alpn(addr, ca, client, &[b"h2"]).await
}

/// [`tls_stream_as`] offering the ALPN protocols `alpn`.
pub async fn tls_stream_alpn(
    addr: SocketAddr,
    ca: &str,
    client: Option<&Pair>,
    alpn: &[&[u8]],
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(koo::transport::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert.as_bytes()).unwrap()],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(c.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let cert = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, cert)
}

/// An HTTP/2 connection over `io`; the task resolves when it closes.
pub async fn h2_open<IO>(io: IO) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    let closed = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, closed)
}

/// Makes a grpc.health.v1 call `method` with an empty request; returns the
/// response stream once its headers arrived (the call is open until its
/// response ends or is dropped).
pub async fn h2_health_call(
    send: &mut h2::client::SendRequest<Bytes>,
    method: &str,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    h2_call(send, &format!("/grpc.health.v1.Health/{method}")).await
}

/// Makes the call `path` (`/service/Method`) with an empty request; returns
/// the response stream once its headers arrived.
pub async fn h2_call(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    let request = http::Request::post(format!("http://koo{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let call = async {
        *send = send.clone().ready().await.expect("h2 ready");
        let (response, mut body) = send.send_request(request, false).expect("send request");
        // tonic reads a unary request to its end before answering
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .expect("send body");
        let response = response.await.expect("response headers");
        assert_eq!(response.status(), 200);
        (body, response.into_body())
    };
    tokio::time::timeout(EVENT_TIMEOUT, call)
        .await
        .expect("no answer to a health call")
}

/// A unary health check over a raw HTTP/2 connection; its grpc-status.
pub async fn h2_health_check(send: &mut h2::client::SendRequest<Bytes>) -> String {
    let (_body, mut recv) = h2_health_call(send, "Check").await;
    let status = async {
        while let Some(chunk) = recv.data().await {
            chunk.expect("response data");
        }
        let trailers = recv.trailers().await.expect("trailers").expect("trailers");
        trailers["grpc-status"].to_str().unwrap().to_owned()
    };
    tokio::time::timeout(EVENT_TIMEOUT, status)
        .await
        .expect("no end to a health check")
}
