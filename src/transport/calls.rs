//! A connection's open calls, and the layer that counts them and gives
//! every request its [`Peer`].
//!
//! A call is open from its request until its response body ends or is
//! dropped, so a stream (a WatchTasks) is a call for as long as it runs and
//! its connection is never idle. [`close_when_idle`] ends a connection that
//! has had no open call for the idle timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::conn::ConnInfo;

/// Open calls, and how many ever started (so that a short call between two
/// looks still counts as activity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Count {
    open: usize,
    started: u64,
}

/// The open calls of one connection.
#[derive(Debug)]
pub struct Calls(watch::Sender<Count>);

impl Default for Calls {
    fn default() -> Self {
        Self(watch::Sender::new(Count::default()))
    }
}

impl Calls {
    /// A call starts; it ends when the guard drops.
    pub fn start(self: &Arc<Self>) -> CallGuard {
        self.0.send_modify(|c| {
            c.open += 1;
            c.started += 1;
        });
        CallGuard(self.clone())
    }

    /// Calls open now.
    pub fn open(&self) -> usize {
        self.0.borrow().open
    }
}

/// An open call.
#[derive(Debug)]
pub struct CallGuard(Arc<Calls>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.0.send_modify(|c| c.open -= 1);
    }
}

/// Cancels `close` once the connection has had no open call for `timeout`;
/// returns early when `close` is cancelled (the connection ended).
pub async fn close_when_idle(calls: Arc<Calls>, timeout: Duration, close: CancellationToken) {
    let mut count = calls.0.subscribe();
    loop {
        let idle = tokio::select! {
            () = close.cancelled() => return,
            idle = count.wait_for(|c| c.open == 0) => match idle {
                Ok(c) => *c,
                Err(_) => return,
            },
        };
        tokio::select! {
            () = close.cancelled() => return,
            () = tokio::time::sleep(timeout) => {
                tracing::debug!(?timeout, "closing an idle connection");
                close.cancel();
                return;
            }
            busy = count.wait_for(|c| c.open > 0 || c.started != idle.started) => {
                if busy.is_err() { return }
            }
        }
    }
}

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
        let guard = match req.extensions().get::<ConnInfo>().cloned() {
            Some(info) => {
                let guard = info.calls.start();
                req.extensions_mut().insert(info.tcp);
                req.extensions_mut().insert(info.peer);
                Some(guard)
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
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(close.is_cancelled(), "idle connection left open");
        watch.await.unwrap();
        assert_eq!(calls.open(), 0);
    }
}
