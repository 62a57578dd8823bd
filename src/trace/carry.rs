//! The W3C trace context (`traceparent`, `tracestate`): read from a call's
//! metadata, carried in a task from its submit to its execution, and handed
//! to external workers. Parsing is the SDK's `TraceContextPropagator`; a
//! malformed header reads as no header (the call starts a new trace), never
//! as an error.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The header names, as gRPC metadata keys.
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// A task's trace context (the domain's type: the stores keep it).
pub use crate::domain::task::TraceContext as Carried;

/// Where headers are read from: HTTP headers or gRPC metadata.
pub trait Headers {
    /// The header `name` as text, if present and ASCII.
    fn header(&self, name: &str) -> Option<&str>;
}

impl Headers for http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Headers for tonic::metadata::MetadataMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The propagator's view of a [`Headers`].
struct Extract<'a, H: ?Sized>(&'a H);

impl<H: Headers + ?Sized> Extractor for Extract<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The remote parent named by `headers` (an empty context when there is
/// none or it is malformed).
pub fn extract<H: Headers + ?Sized>(headers: &H) -> Context {
    TraceContextPropagator::new().extract(&Extract(headers))
}

// The reading and writing of the domain's plain strings lives here, beside
// the propagator, so that the domain does not depend on OpenTelemetry.
impl Carried {
    /// What a submit carries: the call's server span when koo exports
    /// traces, the caller's own context otherwise (so that an external
    /// worker still joins the caller's trace); `None` when there is neither.
    pub fn of_call<H: Headers + ?Sized>(headers: &H) -> Option<Self> {
        if super::tracer().is_some() {
            Self::of_context(&Context::current())
        } else {
            // no header, no parsing: the common case costs one lookup
            headers.header(TRACEPARENT)?;
            Self::of_context(&extract(headers))
        }
    }

    /// The context of `cx`'s span, if it has a valid one.
    pub fn of_context(cx: &Context) -> Option<Self> {
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut fields = std::collections::HashMap::new();
        TraceContextPropagator::new().inject_context(cx, &mut fields);
        Some(Self {
            parent: fields.remove(TRACEPARENT)?,
            state: fields.remove(TRACESTATE).filter(|s| !s.is_empty()),
        })
    }

    /// Checks stored text (`None`: malformed, treated as absent).
    pub fn parse(parent: &str, state: Option<&str>) -> Option<Self> {
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACEPARENT, parent.parse().ok()?);
        if let Some(state) = state.and_then(|s| s.parse().ok()) {
            headers.insert(TRACESTATE, state);
        }
        Self::of_context(&extract(&headers))
    }

    /// The context whose remote parent is this span.
    pub fn context(&self) -> Context {
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = self.parent.parse() {
            headers.insert(TRACEPARENT, v);
        }
        if let Some(v) = self.state.as_deref().and_then(|s| s.parse().ok()) {
            headers.insert(TRACESTATE, v);
        }
        extract(&headers)
    }

    /// The trace id, 32 hex digits.
    pub fn trace_id(&self) -> &str {
        self.parent.get(3..35).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A valid `traceparent` is carried as is; a malformed one is dropped.
    #[test]
    fn carried_from_metadata_without_export() {
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACEPARENT, PARENT.parse().unwrap());
        headers.insert(TRACESTATE, "vendor=x".parse().unwrap());
        let carried = Carried::of_call(&headers).unwrap();
        assert_eq!(carried.parent, PARENT);
        assert_eq!(carried.state.as_deref(), Some("vendor=x"));
        assert_eq!(carried.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "nonsense",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            headers.insert(TRACEPARENT, bad.parse().unwrap());
            assert_eq!(Carried::of_call(&headers), None, "{bad}");
        }
        assert_eq!(Carried::of_call(&http::HeaderMap::new()), None);
    }

    /// Stored text round-trips through a context.
    #[test]
    fn parse_and_context() {
        let c = Carried::parse(PARENT, None).unwrap();
        assert_eq!(Carried::of_context(&c.context()), Some(c));
        assert_eq!(Carried::parse("00-xyz", None), None);
    }
}
