//! Distributed traces: OpenTelemetry spans exported over OTLP/gRPC, and the
//! W3C trace context a task carries from the call that submitted it to the
//! worker that runs it.
//!
//! Off unless an OTLP endpoint is configured ([`TraceSettings`]). Off, the
//! only cost on a call is one atomic load ([`tracer`] finds nothing): no
//! header is parsed and nothing is allocated. The caller's `traceparent` is
//! still carried by submits (a header read on those calls only), so that an
//! external worker exporting its own spans joins the caller's trace even
//! when koo exports none.
//!
//! The OpenTelemetry API is used directly, not through `tracing`: koo's
//! `tracing` spans are debug-level log context filtered by `KOO_LOG`, and an
//! export that depended on the log filter (or cost a span per call whenever
//! logs are verbose) would surprise an operator.
//!
//! # Layout
//! - [`settings`]: what the `OTEL_*` variables select.
//! - [`export`]: the tracer provider, its OTLP exporter and its shutdown.
//! - [`carry`]: `traceparent`/`tracestate`, read from metadata and carried
//!   in a task.
//! - [`rpc`]: the server span of a call.
//! - [`run`]: the span of a task's execution.

pub mod carry;
pub mod export;
pub mod rpc;
pub mod run;
pub mod settings;

use std::sync::OnceLock;

use opentelemetry_sdk::trace::SdkTracer;

pub use self::carry::Carried;
pub use self::export::{TraceGuard, install};
pub use self::settings::{Root, Sampling, TraceSettings};

/// The process' tracer, set once by [`install`] when export is on. A
/// process-wide value rather than a handle passed down: the span layer, the
/// submit handlers and the worker pools all need it, and "is tracing on" must
/// cost one load on the hot path.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The tracer, when traces are exported.
#[inline]
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}
