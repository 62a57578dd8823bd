//! A connection's open calls, and the layer that counts them and gives
//! every request its [`Peer`].
//!
//! A call is open from its request until its response body ends or is
//! dropped, so a stream (a WatchTasks) is a call for as long as it runs and
//! its connection is never idle (a health `Watch` excepted: [`IDLE_EXEMPT`]). [`close_when_idle`] ends a connection that
//! has had no open call for the idle timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::conn::ConnInfo;

/// How often per idle timeout [`close_when_idle`] looks at a connection:
/// a connection is closed between the timeout and an eighth more after its
/// last call.
const CHECKS_PER_TIMEOUT: u32 = 8;

/// The open calls of one connection, and how many ever started (so that a
/// short call between two looks still counts as activity).
///
/// Plain counters that the idle watch reads a few times per timeout: a
/// call that notified the watch at its start and at its end (as a `watch`
/// channel did) cost two wake-ups of another task per call, measured on
/// cache `Get`.
#[derive(Debug, Default)]
pub struct Calls {
    open: AtomicUsize,
    started: AtomicU64,
}

impl Calls {
    /// A call starts; it ends when the guard drops.
    pub fn start(self: &Arc<Self>) -> CallGuard {
        self.open.fetch_add(1, Relaxed);
        self.started.fetch_add(1, Relaxed);
        CallGuard(self.clone())
    }

    /// A call that is activity when it starts but does not keep the
    /// connection open while it lasts (a health `Watch`: see
    /// [`IDLE_EXEMPT`]).
    pub fn touch(&self) {
        self.started.fetch_add(1, Relaxed);
    }

    /// Calls open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }
}

/// An open call.
#[derive(Debug)]
pub struct CallGuard(Arc<Calls>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// Cancels `close` once the connection has had no open call for `timeout`
/// (seen by checks [`CHECKS_PER_TIMEOUT`] times per timeout, so never
/// early and at most an eighth late); returns early when `close` is
/// cancelled (the connection ended).
pub async fn close_when_idle(calls: Arc<Calls>, timeout: Duration, close: CancellationToken) {
    let period = (timeout / CHECKS_PER_TIMEOUT).max(Duration::from_millis(1));
    let mut checks = tokio::time::interval(period);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut started = calls.started.load(Relaxed);
    // a time since which no call has been open
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::select! {
            () = close.cancelled() => return,
            _ = checks.tick() => {}
        }
        if calls.open() > 0 {
            idle_since = None;
            continue;
        }
        let now = Instant::now();
        let now_started = calls.started.load(Relaxed);
        if now_started != started {
            // a call came and went since the last check: idle from now on,
            // which is never earlier than its end
            started = now_started;
            idle_since = Some(now);
        }
        if now.duration_since(*idle_since.get_or_insert(now)) >= timeout {
            tracing::debug!(?timeout, "closing an idle connection");
            close.cancel();
            return;
        }
    }
}

/// The one call that does not keep its connection from the idle timeout:
/// a health `Watch` is open to callers without keys, and a connection held
/// by nothing but such streams would never be reclaimed.
pub const IDLE_EXEMPT: &str = "/grpc.health.v1.Health/Watch";

/// Puts the [`super::Peer`] and tonic's `TcpConnectInfo` in every request,
/// and counts it as an open call of its connection until its response body
/// is done.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerLayer;

impl<S> tower::Layer<S> for PeerLayer {
    type Service = PeerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerService(inner)
    }
}

/// See [`PeerLayer`].
#[derive(Debug, Clone)]
pub struct PeerService<S>(S);

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for PeerService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<CallBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let exempt = req.uri().path() == IDLE_EXEMPT;
        let guard = match req.extensions().get::<ConnInfo>().cloned() {
            Some(info) => {
                let guard = if exempt {
                    info.calls.touch();
                    None
                } else {
                    Some(info.calls.start())
                };
                req.extensions_mut().insert(info.tcp);
                req.extensions_mut().insert(info.peer);
                guard
            }
            None => None,
        };
        let call = self.0.call(req);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|inner| CallBody {
                inner,
                _call: guard,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its call open until it is dropped.
    pub struct CallBody<B> {
        #[pin]
        inner: B,
        _call: Option<CallGuard>,
    }
}

impl<B: Body> Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection with an open call is never idle; once the call ends it
    /// closes after the timeout, and a call that starts and ends during the
    /// wait restarts it.
    #[tokio::test(start_paused = true)]
    async fn idle_after_the_last_call() {
        let calls = Arc::new(Calls::default());
        let close = CancellationToken::new();
        let call = calls.start();
        let watch = tokio::spawn(close_when_idle(
            calls.clone(),
            Duration::from_secs(10),
            close.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!close.is_cancelled(), "closed with a call open");
        drop(call);
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(calls.start());
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            !close.is_cancelled(),
            "a short call did not count as activity"
        );
        // closed at the first check a whole timeout after the last call,
        // at most an eighth of it late
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!close.is_cancelled(), "closed before the timeout");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(close.is_cancelled(), "idle connection left open");
        watch.await.unwrap();
        assert_eq!(calls.open(), 0);
    }
}
