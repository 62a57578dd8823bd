//! The server span of a gRPC call: a child of the caller's `traceparent`,
//! named by the call's path (`koo.tasks.v1.TaskService/SubmitTask`), with
//! the RPC semantic conventions' attributes. Opened by
//! `crate::grpc::span::SpanLayer` around every service, so that every RPC,
//! worker RPCs included, is covered.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};

/// The context of `request`'s server span, or `None` (nothing read, nothing
/// allocated) when traces are not exported.
#[inline]
pub fn start<B>(request: &http::Request<B>) -> Option<Context> {
    let tracer = super::tracer()?;
    let parent = super::carry::extract(request.headers());
    let path = request.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracer
        .span_builder(path.to_owned())
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_owned()),
            KeyValue::new("rpc.method", method.to_owned()),
        ])
        .start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

pin_project_lite::pin_project! {
    /// A call's response future, run inside its server span (when there is
    /// one), which ends when the response headers are ready.
    #[derive(Debug)]
    pub struct Traced<F> {
        #[pin]
        inner: F,
        cx: Option<Context>,
    }
}

impl<F> Traced<F> {
    /// `inner` inside `cx` (a no-op wrapper when `cx` is `None`).
    pub fn new(inner: F, cx: Option<Context>) -> Self {
        Self { inner, cx }
    }
}

impl<F, B, E> Future for Traced<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(cx) = this.cx.as_ref() else {
            return this.inner.poll(task);
        };
        let out = {
            let _attached = cx.clone().attach();
            ready!(this.inner.poll(task))
        };
        let span = cx.span();
        // a trailers-only response (every error of a unary call) has its
        // status in the headers; otherwise it comes later, in trailers
        let code = match &out {
            Ok(response) => response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<i64>().ok()),
            Err(_) => Some(2),
        };
        if let Some(code) = code {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
            if code != 0 {
                span.set_status(Status::error(format!("gRPC status {code}")));
            }
        }
        span.end();
        *this.cx = None;
        Poll::Ready(out)
    }
}
