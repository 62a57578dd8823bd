//! The HTTP listener's connections, served with hyper-util's auto builder
//! (HTTP/1.1, and HTTP/2 with prior knowledge) instead of `axum::serve`,
//! which exposes none of hyper's settings: with it a client could hold
//! about 400 KiB of unfinished request head per connection (hyper's read
//! buffer) until the idle timeout. Here the head of an HTTP/1 request is
//! bounded in size ([`MAX_HEAD_BYTES`]: past it hyper answers `431`), and
//! an HTTP/2 request's header list as on the gRPC listener.
//!
//! Not in time: hyper's header-read timeout starts when it waits for a
//! request, which on a keep-alive connection is right after the previous
//! response, so it would close every idle keep-alive connection at its
//! value (a REST client posting every few seconds would meet closed
//! connections). An unfinished head is bounded by the idle timeout
//! (`KOO_IDLE_CONNECTION_TIMEOUT`), as before.

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::transport::conn::Conn;

/// The most an HTTP/1 request's line and headers may take (hyper's read
/// buffer; its default is about 400 KiB): far above what browsers, curl
/// and the REST clients send (a few KiB), and the same bound an HTTP/2
/// header list has (16 KiB) with room for long cookies. Bodies are read
/// past it as a stream.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The largest HTTP/2 header list, as the gRPC listener takes it.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// The builder every connection is served with.
fn builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    // no timer: hyper's header-read timeout runs only with one, and it
    // would close idle keep-alive connections (see the module doc)
    builder.http1().max_buf_size(MAX_HEAD_BYTES);
    builder.http2().max_header_list_size(MAX_HEADER_LIST_BYTES);
    builder
}

/// Serves `app` on every connection of `incoming` until `stop`; then
/// stops accepting, asks each connection to close when its requests are
/// done (HTTP/2: GOAWAY), and returns when they have.
pub(super) async fn serve<C>(
    mut incoming: ReceiverStream<Result<Conn, std::io::Error>>,
    app: Router,
    connect_info: fn(&Conn) -> C,
    stop: CancellationToken,
) where
    C: Clone + Send + Sync + 'static,
{
    let builder = builder();
    let graceful = GracefulShutdown::new();
    loop {
        let conn = tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(conn)) => conn,
                // a failed handshake: the accept loop already said why
                Some(Err(_)) => continue,
                None => break,
            },
            () = stop.cancelled() => break,
        };
        let info = ConnectInfo(connect_info(&conn));
        let service = app
            .clone()
            .map_request(move |mut request: http::Request<Incoming>| {
                request.extensions_mut().insert(info.clone());
                request.map(axum::body::Body::new)
            });
        let service = TowerToHyperService::new(service);
        let served = graceful.watch(
            builder
                .serve_connection(TokioIo::new(conn), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            // a client that went away or sent what HTTP does not allow:
            // nothing koo can act on
            let _ = served.await;
        });
    }
    drop(incoming);
    graceful.shutdown().await;
}
