//! The span of one execution of a task by a built-in handler:
//! `task.run <name>`, a child of the context the task carries (the span
//! that submitted it), so that it joins the submitter's trace.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};

use crate::domain::task::Task;

/// The context of `task`'s run span (`None` when traces are not exported).
pub fn start(task: &Task) -> Option<Context> {
    let tracer = super::tracer()?;
    let parent = task
        .trace
        .as_ref()
        .map(super::Carried::context)
        .unwrap_or_default();
    let span = tracer
        .span_builder(format!("task.run {}", task.name))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("koo.task.id", task.id.to_string()),
            KeyValue::new("koo.task.name", task.name.clone()),
            KeyValue::new("koo.task.queue", task.id.queue().to_string()),
            KeyValue::new("koo.task.attempt", i64::from(task.attempts)),
        ])
        .start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// The span of a schedule's tick submitting its task: the root of that
/// task's trace (`None` when traces are not exported). It ends when dropped.
pub fn fire(schedule: &str, tick_ms: i64) -> Option<Context> {
    let tracer = super::tracer()?;
    let span = tracer
        .span_builder(format!("schedule.fire {schedule}"))
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("koo.schedule", schedule.to_owned()),
            KeyValue::new("koo.schedule.tick_ms", tick_ms),
        ])
        .start_with_context(tracer, &Context::new());
    Some(Context::new().with_span(span))
}

/// The span of an external worker's report (a Complete or Fail on the Work
/// stream) of a held task: a child of the span that submitted the task,
/// beside the worker's own run span (`None` when traces are not exported).
/// It ends when dropped.
pub fn report(task: &Task, worker: &str, outcome: &'static str) -> Option<Context> {
    let tracer = super::tracer()?;
    let parent = task
        .trace
        .as_ref()
        .map(super::Carried::context)
        .unwrap_or_default();
    let span = tracer
        .span_builder(format!("task.report {}", task.name))
        .with_kind(SpanKind::Server)
        .with_attributes([
            KeyValue::new("koo.task.id", task.id.to_string()),
            KeyValue::new("koo.task.name", task.name.clone()),
            KeyValue::new("koo.task.attempt", i64::from(task.attempts)),
            KeyValue::new("koo.task.outcome", outcome),
            KeyValue::new("koo.worker", worker.to_owned()),
        ])
        .start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// Ends a run span with the run's outcome (`succeeded`, `failed`,
/// `timed_out`, `lost`, `handed_back`); a failure also sets the span's
/// error status.
pub fn finish(cx: Option<Context>, outcome: &'static str, error: Option<&str>) {
    let Some(cx) = cx else { return };
    let span = cx.span();
    span.set_attribute(KeyValue::new("koo.task.outcome", outcome));
    if let Some(message) = error {
        span.set_status(Status::error(message.to_owned()));
    }
    span.end();
}

pin_project_lite::pin_project! {
    /// A future polled inside a context (a plain wrapper without one).
    #[derive(Debug)]
    pub struct InContext<F> {
        #[pin]
        inner: F,
        cx: Option<Context>,
    }
}

impl<F> InContext<F> {
    /// `inner`, polled inside `cx` when there is one.
    pub fn new(inner: F, cx: Option<Context>) -> Self {
        Self { inner, cx }
    }
}

impl<F: Future> Future for InContext<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _attached = this.cx.as_ref().map(|cx| cx.clone().attach());
        this.inner.poll(task)
    }
}
