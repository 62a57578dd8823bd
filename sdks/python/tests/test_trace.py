"""Traces across a task, with real processes: a koo exporting OTLP to a real
OTLP/gRPC receiver run here (opentelemetry-proto's servicer), this process
as the submitter and as the worker (the OpenTelemetry SDK recording its spans).

The chain: the caller's span -> koo's SubmitTask server span (exported by
koo) -> the worker's `task.run` span, and koo's `task.report` span of the
worker's Complete, all of one trace.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from koo import TaskCategory, TaskManager, Worker

from .conftest import KooServer
from .test_worker import running

SUBMIT = "koo.tasks.v1.TaskService/SubmitTask"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on a free loopback port."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.arrived = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.arrived:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)
            self.arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, name: str, timeout: float = 15) -> trace_pb2.Span:
        """The first span named `name`, waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                found = [s for s in self.spans if s.name == name]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {name} span; got {[s.name for s in self.spans]}")
                self.arrived.wait(left)


_exporter = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """This process's finished spans (the SDK installed once per process)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(provider)
    return _exporter


@pytest.fixture
def traced_koo() -> Iterator[tuple[KooServer, Receiver]]:
    """A koo exporting its spans to a receiver of this test."""
    receiver = Receiver()
    server = KooServer(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "20",
        }
    )
    try:
        yield server, receiver
    finally:
        server.stop()
        receiver.server.stop(None)


def test_worker_span_joins_the_submitters_trace(
    spans: InMemorySpanExporter, traced_koo: tuple[KooServer, Receiver], ns: str
) -> None:
    """The worker's handler span is a child of koo's SubmitTask span, itself a child of the caller's span."""
    server, receiver = traced_koo
    name = f"sdk.{ns}.traced"
    w = Worker(server.target)
    inside: dict[str, Any] = {}

    @w.task(name)
    def handler() -> str:
        inside["trace_id"] = trace.get_current_span().get_span_context().trace_id
        return "ok"

    tracer = trace.get_tracer("test")

    async def scenario() -> int:
        tm = TaskManager(server.target)
        with tracer.start_as_current_span("caller") as caller:
            task_id = await tm.submit_task(name, TaskCategory.RESEARCH)
        assert await tm.result(task_id, timeout=15) == "ok"
        return caller.get_span_context().trace_id

    with running(w):
        trace_id = asyncio.run(scenario())
    caller = next(s for s in spans.get_finished_spans() if s.name == "caller")
    submit = receiver.wait_for(SUBMIT)
    assert int.from_bytes(submit.trace_id, "big") == trace_id
    assert int.from_bytes(submit.parent_span_id, "big") == caller.context.span_id
    run = next(s for s in spans.get_finished_spans() if s.name == f"task.run {name}")
    assert run.context.trace_id == trace_id
    assert run.parent is not None and run.parent.span_id == int.from_bytes(submit.span_id, "big")
    assert run.attributes is not None and run.attributes["koo.task.outcome"] == "succeeded"
    # the handler ran inside it (a sync handler, on a thread of its own)
    assert inside["trace_id"] == trace_id
    # koo's span of the worker's Complete joins the same trace
    report = receiver.wait_for(f"task.report {name}")
    assert report.trace_id == submit.trace_id and report.parent_span_id == submit.span_id
