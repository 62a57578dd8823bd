"""OpenTelemetry, when `opentelemetry-api` is installed (the `koo[otel]` extra).

Calls carry the W3C `traceparent` (and `tracestate`) of the current span, so
that koo's server span, and the task a submit stores, join the caller's
trace; the worker runs each handler in a `task.run <name>` span whose parent
is the context the task carries. Without the package every function here is
a no-op that allocates nothing, and nothing is imported.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from koo.tasks.v1 import task_service_pb2 as tasks_pb

T = TypeVar("T")

try:
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _propagator: TraceContextTextMapPropagator | None = TraceContextTextMapPropagator()
except ImportError:  # the extra is not installed
    _propagator = None

ENABLED = _propagator is not None


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """`traceparent`/`tracestate` of the current span, as call metadata (empty when there is none)."""
    if _propagator is None:
        return ()
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return tuple(carrier.items())


def in_current_context(fn: Callable[[], T]) -> Callable[[], T]:
    """`fn` bound to the caller's context (for a thread that does not inherit it)."""
    if _propagator is None:
        return fn
    ctx = contextvars.copy_context()
    return lambda: ctx.run(fn)


class Run:
    """A handler's span (or nothing), told the run's outcome at the end."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def outcome(self, outcome: str, error: str | None = None) -> None:
        """Records how the run ended (`succeeded`, `failed`)."""
        if self._span is None:
            return
        self._span.set_attribute("koo.task.outcome", outcome)
        if error is not None:
            self._span.set_status(_trace.Status(_trace.StatusCode.ERROR, error))


@contextmanager
def task_span(task: tasks_pb.Task) -> Iterator[Run]:
    """The span of one run of `task`, current inside the block: a child of the span that submitted it."""
    if _propagator is None:
        yield Run(None)
        return
    parent = None
    if task.trace_parent:
        carrier = {"traceparent": task.trace_parent}
        if task.trace_state:
            carrier["tracestate"] = task.trace_state
        parent = _propagator.extract(carrier)
    tracer = _trace.get_tracer("koo")
    with tracer.start_as_current_span(
        f"task.run {task.name}",
        context=parent,
        kind=_trace.SpanKind.CONSUMER,
        attributes={
            "koo.task.id": task.id,
            "koo.task.name": task.name,
            "koo.task.queue": task.queue,
            "koo.task.attempt": task.attempts,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield Run(span)
