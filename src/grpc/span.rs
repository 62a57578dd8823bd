//! One tracing span per RPC, named by its gRPC path: a tower layer around
//! every service of the router, so that a service added later is covered
//! without a line of its own.
//!
//! The span is at `debug` level. Disabled (koo's default `info`), it costs
//! a cached interest check per call and allocates nothing: the fields are
//! only evaluated when the span is enabled. Enabled, every event the
//! handler logs carries the RPC (`rpc.service`, `rpc.method`), and
//! OpenTelemetry-aware subscribers name the span by `otel.name`.
//!
//! The span covers the handler up to its response headers; a streaming
//! response's later messages are produced outside it (tonic polls them).
//!
//! When traces are exported ([`crate::trace`]), the same layer opens the
//! call's OpenTelemetry server span, a child of the caller's `traceparent`,
//! and the handler runs inside its context (submits read it to carry it
//! in the task). When not, that costs one atomic load.

use std::task::{Context, Poll};

use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::trace::rpc::Traced;

/// Opens a span per call.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpanLayer;

impl<S> Layer<S> for SpanLayer {
    type Service = Spanned<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Spanned { inner }
    }
}

/// [`SpanLayer`]'s service.
#[derive(Debug, Clone)]
pub struct Spanned<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for Spanned<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Traced<Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = span_of(request.uri().path());
        let traced = crate::trace::rpc::start(&request);
        // entered while the handler's future is created, as well as polled
        let answer = {
            let _attached = traced.as_ref().map(|cx| cx.clone().attach());
            span.in_scope(|| self.inner.call(request))
        };
        Traced::new(answer.instrument(span), traced)
    }
}

/// The span of the call to `path` (`/koo.tasks.v1.TaskService/SubmitTask`).
fn span_of(path: &str) -> tracing::Span {
    tracing::debug_span!(
        "rpc",
        otel.name = path.trim_start_matches('/'),
        rpc.system = "grpc",
        rpc.service = service_and_method(path).0,
        rpc.method = service_and_method(path).1,
    )
}

/// The service and method a gRPC path names (`""` for a part it lacks).
fn service_and_method(path: &str) -> (&str, &str) {
    path.trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};

    use super::*;

    /// A span's name and its fields.
    type Seen = (String, Vec<(String, String)>);

    /// Records each new span's name and fields.
    #[derive(Clone, Default)]
    struct Spans(Arc<Mutex<Vec<Seen>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: LayerContext<'_, S>,
        ) {
            struct Fields(Vec<(String, String)>);
            impl Visit for Fields {
                fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
                    self.0.push((f.name().to_owned(), format!("{v:?}")));
                }
                fn record_str(&mut self, f: &Field, v: &str) {
                    self.0.push((f.name().to_owned(), v.to_owned()));
                }
            }
            let mut fields = Fields(Vec::new());
            attrs.record(&mut fields);
            let name = attrs.metadata().name().to_owned();
            self.0.lock().unwrap().push((name, fields.0));
        }
    }

    fn call(path: &str) -> &'static str {
        let mut svc = SpanLayer.layer(tower::service_fn(|_: http::Request<()>| async {
            // the handler runs inside the call's span
            let inside = !tracing::Span::current().is_disabled();
            let answer = if inside { "in span" } else { "no span" };
            Ok::<_, std::convert::Infallible>(http::Response::new(answer))
        }));
        let request = http::Request::builder().uri(path).body(()).unwrap();
        futures::executor::block_on(svc.call(request))
            .unwrap()
            .into_body()
    }

    /// A call runs in a span named by its path, service and method.
    #[test]
    fn each_call_has_a_span_named_by_its_path() {
        let spans = Spans::default();
        let subscriber = tracing_subscriber::registry()
            .with(spans.clone())
            .with(tracing_subscriber::filter::LevelFilter::DEBUG);
        let answer = tracing::subscriber::with_default(subscriber, || {
            call("/koo.tasks.v1.TaskService/SubmitTask")
        });
        assert_eq!(answer, "in span");
        let spans = spans.0.lock().unwrap();
        let (name, fields) = &spans[0];
        assert_eq!(name, "rpc");
        let field = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(
            field("otel.name"),
            Some("koo.tasks.v1.TaskService/SubmitTask")
        );
        assert_eq!(field("rpc.service"), Some("koo.tasks.v1.TaskService"));
        assert_eq!(field("rpc.method"), Some("SubmitTask"));
    }

    /// Below `debug`, no span is made.
    #[test]
    fn disabled_below_debug() {
        let subscriber =
            tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::INFO);
        let answer = tracing::subscriber::with_default(subscriber, || {
            call("/koo.cache.v1.CacheService/Get")
        });
        assert_eq!(answer, "no span");
    }
}
