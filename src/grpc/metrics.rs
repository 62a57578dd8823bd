//! gRPC server metrics in the grpc-ecosystem naming (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_handling_seconds`) and koo's open
//! streams per RPC: a tower layer around every service of the router, so
//! that a service added later is counted without a line of its own.
//!
//! The hot path takes no lock and allocates nothing: every method's figures
//! are built at start-up from the descriptor sets (so an RPC's type comes
//! from its proto, not from a hand-kept list) into a map that is only read
//! afterwards, and a call adds to atomics. A path no service declares is
//! counted under `unknown`, so a client cannot grow the label sets.
//! The figures are turned into Prometheus text only when scraped (see
//! [`GrpcMetrics`]'s `Collector`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prost::Message as _;
use tower::{Layer, Service};

use crate::cache::histogram::{Histogram, HistogramSnapshot};

/// Bounds of every exported latency histogram, in seconds.
pub const SECONDS_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// gRPC status codes as grpc-go names them (the grpc-ecosystem label values).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const UNKNOWN: usize = 2;
const CANCELLED: usize = 1;

/// The code of a `grpc-status` value: a number 0..=16, else `Unknown`.
fn code_index(value: &[u8]) -> usize {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|c| *c < CODE_NAMES.len())
        .unwrap_or(UNKNOWN)
}

/// One method's figures.
#[derive(Debug)]
struct Method {
    service: String,
    name: String,
    /// `unary`, `client_stream`, `server_stream` or `bidi_stream`.
    kind: &'static str,
    started: AtomicU64,
    handled: [AtomicU64; 17],
    open: AtomicI64,
    seconds: Histogram,
}

impl Method {
    fn new(service: &str, name: &str, kind: &'static str) -> Self {
        Self {
            service: service.to_owned(),
            name: name.to_owned(),
            kind,
            started: AtomicU64::new(0),
            handled: Default::default(),
            open: AtomicI64::new(0),
            seconds: Histogram::new(),
        }
    }

    fn streams(&self) -> bool {
        self.kind != "unary"
    }
}

/// The figures of every gRPC method koo serves: a cheap `Clone` handle.
#[derive(Debug, Clone)]
pub struct GrpcMetrics {
    methods: Arc<HashMap<String, Arc<Method>>>,
    unknown: Arc<Method>,
}

impl GrpcMetrics {
    /// Figures for every method of the services in `descriptor_sets`
    /// (encoded `FileDescriptorSet`s, as reflection takes them).
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut methods = HashMap::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    let full = match file.package() {
                        "" => service.name().to_owned(),
                        p => format!("{p}.{}", service.name()),
                    };
                    for m in &service.method {
                        let kind = match (m.client_streaming(), m.server_streaming()) {
                            (false, false) => "unary",
                            (true, false) => "client_stream",
                            (false, true) => "server_stream",
                            (true, true) => "bidi_stream",
                        };
                        let path = format!("/{full}/{}", m.name());
                        methods.insert(path, Arc::new(Method::new(&full, m.name(), kind)));
                    }
                }
            }
        }
        Self {
            methods: Arc::new(methods),
            unknown: Arc::new(Method::new("unknown", "unknown", "unary")),
        }
    }

    /// koo's services, health and reflection.
    pub fn for_koo() -> Self {
        Self::new(&[
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])
    }

    /// The method of `path`, or `unknown`.
    fn method(&self, path: &str) -> &Arc<Method> {
        self.methods.get(path).unwrap_or(&self.unknown)
    }

    /// Every method, the `unknown` one last, in a stable order.
    fn all(&self) -> Vec<&Method> {
        let mut all: Vec<&Method> = self.methods.values().map(AsRef::as_ref).collect();
        all.sort_by(|a, b| (&a.service, &a.name).cmp(&(&b.service, &b.name)));
        all.push(&self.unknown);
        all
    }
}

/// Bounds of the task histograms (`koo_task_run_seconds`,
/// `koo_task_wait_seconds`), in seconds: the latency bounds, then up to an
/// hour, since tasks run for minutes (the default time limit is 30 min) and
/// wait through countdowns; a percentile past the last bound reads as it.
/// (The recorded histogram resolves up to about 71 minutes.)
pub const TASK_SECONDS_BOUNDS: [f64; 21] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Writes `snapshot` as a Prometheus histogram in seconds, with the
/// latency bounds ([`SECONDS_BOUNDS`]).
pub fn encode_seconds(
    encoder: &mut MetricEncoder<'_>,
    snapshot: &HistogramSnapshot,
) -> Result<(), std::fmt::Error> {
    encode_seconds_in(encoder, snapshot, &SECONDS_BOUNDS)
}

/// Writes `snapshot` as a Prometheus histogram in seconds, with `bounds`.
pub fn encode_seconds_in(
    encoder: &mut MetricEncoder<'_>,
    snapshot: &HistogramSnapshot,
    bounds_s: &[f64],
) -> Result<(), std::fmt::Error> {
    let bounds: Vec<Duration> = bounds_s
        .iter()
        .map(|b| Duration::from_secs_f64(*b))
        .collect();
    let (counts, sum) = snapshot.cumulative(&bounds);
    let count = snapshot.count();
    let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(bounds_s.len() + 1);
    let mut below = 0;
    for (bound, cumulative) in bounds_s.iter().zip(counts) {
        // the encoder wants each bucket's own count and sums them itself
        buckets.push((*bound, cumulative - below));
        below = cumulative;
    }
    buckets.push((f64::INFINITY, count.saturating_sub(below)));
    encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

impl Collector for GrpcMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.all();
        {
            let help = "Total number of RPCs started on the server (per instance).";
            let mut family = encoder.encode_descriptor(
                "grpc_server_started",
                help,
                None,
                MetricType::Counter,
            )?;
            for m in &all {
                let started = m.started.load(Relaxed);
                counter(&mut family.encode_family(&labels(m))?, started)?;
            }
        }
        {
            let help = "Total number of RPCs completed on the server, by gRPC code (per instance).";
            let mut family = encoder.encode_descriptor(
                "grpc_server_handled",
                help,
                None,
                MetricType::Counter,
            )?;
            for m in &all {
                for (code, name) in CODE_NAMES.iter().enumerate() {
                    let n = m.handled[code].load(Relaxed);
                    if n == 0 && code != 0 {
                        continue;
                    }
                    let [t, s, me] = labels(m);
                    let set = [t, s, me, ("grpc_code", name)];
                    counter(&mut family.encode_family(&set)?, n)?;
                }
            }
        }
        {
            let help = "Seconds from an RPC's start to its status (per instance).";
            let mut family = encoder.encode_descriptor(
                "grpc_server_handling_seconds",
                help,
                None,
                MetricType::Histogram,
            )?;
            for m in all.iter().filter(|m| m.started.load(Relaxed) > 0) {
                encode_seconds(
                    &mut family.encode_family(&labels(m))?,
                    &m.seconds.snapshot(),
                )?;
            }
        }
        let help = "Streaming RPCs open now, by RPC (per instance).";
        let mut family =
            encoder.encode_descriptor("koo_grpc_open_streams", help, None, MetricType::Gauge)?;
        for m in all.iter().filter(|m| m.streams()) {
            let open = m.open.load(Relaxed).max(0);
            family.encode_family(&labels(m))?.encode_gauge(&open)?;
        }
        Ok(())
    }
}

fn labels(m: &Method) -> [(&'static str, &str); 3] {
    [
        ("grpc_type", m.kind),
        ("grpc_service", m.service.as_str()),
        ("grpc_method", m.name.as_str()),
    ]
}

fn counter(encoder: &mut MetricEncoder<'_>, n: u64) -> Result<(), std::fmt::Error> {
    encoder.encode_counter::<NoLabelSet, u64, u64>(&n, None)
}

/// Counts every call of the services it wraps.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: GrpcMetrics,
}

impl MetricsLayer {
    /// Counts into `metrics`.
    pub fn new(metrics: GrpcMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// [`MetricsLayer`]'s service.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B, R> Service<http::Request<B>> for Metered<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = Call::start(self.metrics.method(request.uri().path()).clone());
        MeteredFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

/// One call under way: counted as handled once, when its status is known,
/// or as `Canceled` if it is dropped before (the client went away).
struct Call {
    method: Arc<Method>,
    start: Instant,
    done: bool,
}

impl Call {
    fn start(method: Arc<Method>) -> Self {
        method.started.fetch_add(1, Relaxed);
        if method.streams() {
            method.open.fetch_add(1, Relaxed);
        }
        Self {
            method,
            start: Instant::now(),
            done: false,
        }
    }

    fn end(&mut self, code: usize) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.method;
        m.handled[code].fetch_add(1, Relaxed);
        m.seconds.record(self.start.elapsed());
        if m.streams() {
            m.open.fetch_sub(1, Relaxed);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.end(CANCELLED);
    }
}

pin_project! {
    /// The response future: a status in the headers (a trailers-only
    /// reply, as for most errors) ends the call at once; otherwise the body
    /// carries the call to its trailers.
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, R, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<MeteredBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                if let (Some(call), Some(status)) =
                    (&mut call, response.headers().get("grpc-status"))
                {
                    call.end(code_index(status.as_bytes()));
                }
                Ok(response.map(|inner| MeteredBody { inner, call }))
            }
            Err(e) => {
                if let Some(call) = &mut call {
                    call.end(UNKNOWN);
                }
                Err(e)
            }
        })
    }
}

pin_project! {
    /// A response body that ends its call at the trailers.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(call) = this.call {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(status) = f.trailers_ref().and_then(|t| t.get("grpc-status")) {
                        call.end(code_index(status.as_bytes()));
                    }
                }
                Some(Err(_)) | None => call.end(UNKNOWN),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `grpc-status` values map to grpc-go's names; garbage is `Unknown`.
    #[test]
    fn status_values_map_to_code_names() {
        assert_eq!(CODE_NAMES[code_index(b"0")], "OK");
        assert_eq!(CODE_NAMES[code_index(b"5")], "NotFound");
        assert_eq!(CODE_NAMES[code_index(b"16")], "Unauthenticated");
        assert_eq!(CODE_NAMES[code_index(b"17")], "Unknown");
        assert_eq!(CODE_NAMES[code_index(b"x")], "Unknown");
        assert_eq!(CODE_NAMES[code_index(b"")], "Unknown");
    }

    /// Methods and their types come from the descriptors; a path no
    /// service declares is counted under one `unknown` method.
    #[test]
    fn methods_from_descriptors_and_unknown_paths_bounded() {
        let m = GrpcMetrics::for_koo();
        let get = m.method("/koo.cache.v1.CacheService/Get");
        assert_eq!(
            (get.service.as_str(), get.name.as_str()),
            ("koo.cache.v1.CacheService", "Get")
        );
        assert_eq!(get.kind, "unary");
        assert_eq!(
            m.method("/grpc.health.v1.Health/Watch").kind,
            "server_stream"
        );
        let a = m.method("/evil/one");
        let b = m.method("/evil/two");
        assert!(Arc::ptr_eq(a, b));
        assert_eq!(a.name, "unknown");
    }

    /// A call ends once: its first status counts, a later drop does not
    /// count it again; a call dropped before its status is `Canceled`.
    #[test]
    fn a_call_ends_once_and_a_dropped_one_is_cancelled() {
        let m = GrpcMetrics::for_koo();
        let watch = m.method("/grpc.health.v1.Health/Watch").clone();
        let mut call = Call::start(watch.clone());
        assert_eq!(watch.open.load(Relaxed), 1);
        call.end(code_index(b"5"));
        drop(call);
        drop(Call::start(watch.clone()));
        assert_eq!(watch.started.load(Relaxed), 2);
        assert_eq!(watch.handled[5].load(Relaxed), 1);
        assert_eq!(watch.handled[CANCELLED].load(Relaxed), 1);
        assert_eq!(watch.open.load(Relaxed), 0);
        assert_eq!(watch.seconds.snapshot().count(), 2);
    }
}
