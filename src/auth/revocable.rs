//! A reader's stream (`WatchTasks`, `WatchInvalidations`, ...) that ends
//! when its credentials are revoked. The gate admits a call when it opens,
//! and a dashboard's watch can stay open for days: a leaked reader key
//! removed from the keys file must stop receiving, not only be refused its
//! next call. The check is made on the response body, below every
//! service, so that each streaming RPC (and grpc-web's) gets it without a
//! line in its handler; a worker's `Work` stream has its own (it must hand
//! its tasks back first: `grpc::worker::stream`).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::Recheck;

/// How often an open stream's credentials are checked again.
pub const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// A streaming response's body, ended with the refusal (as gRPC trailers:
/// `UNAUTHENTICATED` for a removed key, `PERMISSION_DENIED` for a changed
/// role) at the first check that the keys file no longer admits its call.
pub struct Revocable {
    /// `None` once ended: dropping it ends the handler's stream.
    inner: Option<tonic::body::Body>,
    recheck: Recheck,
    next_check: Pin<Box<Sleep>>,
}

impl Revocable {
    /// `inner`, checked with `recheck` every [`RECHECK_EVERY`].
    pub fn new(inner: tonic::body::Body, recheck: Recheck) -> Self {
        Self {
            inner: Some(inner),
            recheck,
            next_check: Box::pin(tokio::time::sleep(RECHECK_EVERY)),
        }
    }

    /// The refusal's trailers when a check due now refuses the call.
    fn revoked(&mut self, cx: &mut Context<'_>) -> Option<http::HeaderMap> {
        // every due check re-arms the timer, so it is polled (and this body
        // woken) again a period later
        while self.next_check.as_mut().poll(cx).is_ready() {
            if let Err(e) = self.recheck.still_admitted() {
                let status = tonic::Status::from(e);
                tracing::warn!(
                    method = self.recheck.path(),
                    reason = status.message(),
                    "a stream's credentials are no longer admitted: it ends"
                );
                let (mut parts, ()) = status.into_http::<()>().into_parts();
                parts.headers.remove(http::header::CONTENT_TYPE);
                return Some(parts.headers);
            }
            let next = Instant::now() + RECHECK_EVERY;
            self.next_check.as_mut().reset(next);
        }
        None
    }
}

impl Body for Revocable {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.inner.is_none() {
            return Poll::Ready(None);
        }
        if let Some(trailers) = self.revoked(cx) {
            self.inner = None;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let inner = self.inner.as_mut().expect("checked above");
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        // nothing follows the stream's own trailers (not a second set)
        let last = match &frame {
            None => true,
            Some(Ok(f)) => f.is_trailers(),
            Some(Err(_)) => false,
        };
        if last {
            self.inner = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
