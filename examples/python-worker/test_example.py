"""Tests of the example worker that need no koo.

    cd examples/python-worker && ./setup.sh && .venv/bin/python -m unittest -v

- The handlers, called directly with a stand-in context: PDF extraction on
  testdata/sample.pdf, the AI handler against fake_openai (in-process, free
  port), the no-endpoint failure, 4xx vs 5xx retryability, and the chaos
  suite's ledger.
- The event lines: the SDK's `WorkerEvent`s printed as the JSON lines the
  Rust tests read.
- worker.py as a process against a scripted WorkerService: exit status 2 on
  a bad token, 0 on SIGTERM.

The worker itself (the protocol, heartbeats, reconnects, cancel, revoke) is
the SDK's, tested against real koo processes in sdks/python/tests.
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from koo import Fatal, Retry, WorkerEvent
from koo.worker.v1 import worker_service_pb2 as worker_pb2
from koo.worker.v1 import worker_service_pb2_grpc as worker_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fake_openai  # noqa: E402
import worker  # noqa: E402

SAMPLE_PDF = HERE / "testdata" / "sample.pdf"
PAGE_TEXTS = [
    "Page one: the cerebral cortex.",
    "Page two: the hippocampus and memory.",
    "Page three: the cerebellum and motion.",
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


class FakeContext:
    """Stands in for the SDK's `TaskContext` (what the handlers use of it):
    records progress reports; `_signal` sets `cancelled` as koo's cancel does."""

    def __init__(self) -> None:
        self.task_id = "task-1"
        self.attempt = 1
        self.lease_token = 1
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self.progress_reports: list[tuple[float, str, dict | None]] = []

    def progress(self, percent: float, message: str = "", metadata: dict | None = None) -> None:
        self.progress_reports.append((percent, message, metadata))

    def _signal(self, reason: str) -> None:
        self.cancel_reason = reason
        self.cancelled.set()


def call(handler: Any, args: list, kwargs: dict | None = None) -> tuple[Any, FakeContext]:
    """Calls a handler as the SDK does: the task's args and kwargs, plus ctx."""
    ctx = FakeContext()
    return handler(*args, ctx=ctx, **(kwargs or {})), ctx


# --------------------------------------------------------------------------
# PDF handler
# --------------------------------------------------------------------------


class PdfHandlerTest(unittest.TestCase):
    def test_extracts_every_page_with_progress(self) -> None:
        result, ctx = call(worker.process_document, [str(SAMPLE_PDF), "doc_1"])
        self.assertEqual(result["document_id"], "doc_1")
        self.assertEqual(result["pages"], 3)
        self.assertEqual(result["characters"], sum(len(t) for t in PAGE_TEXTS))
        self.assertTrue(result["text_preview"].startswith(PAGE_TEXTS[0]))
        for text in PAGE_TEXTS:
            self.assertIn(text, result["text_preview"])
        self.assertEqual([p[1] for p in ctx.progress_reports], ["page 1 of 3", "page 2 of 3", "page 3 of 3"])
        self.assertAlmostEqual(ctx.progress_reports[0][0], 100 / 3)
        self.assertEqual(ctx.progress_reports[-1][0], 100.0)
        self.assertEqual(ctx.progress_reports[0][2], {"page": 1, "pages": 3, "chars": len(PAGE_TEXTS[0])})
        json.dumps(result, allow_nan=False)  # the result is JSON-able

    def test_missing_file_is_not_retryable(self) -> None:
        with self.assertRaises(Fatal) as caught:
            call(worker.process_document, ["/path/to/document.pdf", "doc_123"])
        self.assertIn("does not exist", caught.exception.message)

    def test_not_a_pdf_is_not_retryable(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".pdf", delete=False) as f:
            f.write("hello, I am not a PDF\n")
        self.addCleanup(os.unlink, f.name)
        with self.assertRaises(Fatal) as caught:
            call(worker.process_document, [f.name, "doc_2"])
        self.assertIn("not a readable PDF", caught.exception.message)

    def test_bad_page_delay_is_refused(self) -> None:
        with self.assertRaises(Fatal):
            call(worker.process_document, [str(SAMPLE_PDF), "d"], {"page_delay_seconds": 61})

    def test_stops_mid_document_when_cancelled(self) -> None:
        # 0.5 s before each page; cancelled during the wait before page 2.
        ctx = FakeContext()
        timer = threading.Timer(0.75, ctx._signal, args=("cancelled",))
        started = time.monotonic()
        timer.start()
        self.addCleanup(timer.cancel)
        with self.assertRaises(Fatal) as caught:
            worker.process_document(str(SAMPLE_PDF), "d", ctx=ctx, page_delay_seconds=0.5)
        self.assertLess(time.monotonic() - started, 1.4)  # the sleep was interrupted
        self.assertRegex(caught.exception.message, r"^stopped at page [23] of 3: cancelled$")
        self.assertLess(len(ctx.progress_reports), 3)


# --------------------------------------------------------------------------
# AI handler against fake_openai
# --------------------------------------------------------------------------


class LedgerHandlerTest(unittest.TestCase):
    def test_appends_one_line_per_execution(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "ledger.jsonl")
            handler = worker.make_ledger_handler(path)
            first, _ = call(handler, [], {"ms": 1})
            call(handler, [], {"ms": 1})
            with open(path, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f]
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0], first)
        self.assertEqual(
            (first["task_id"], first["attempt"], first["token"], first["pid"]),
            ("task-1", 1, 1, os.getpid()),
        )

    def test_needs_the_file_from_the_environment(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != worker.LEDGER_ENV}
        cmd = [sys.executable, str(HERE / "worker.py"), "--serve", "ledger"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=env)
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertIn(worker.LEDGER_ENV, out.stderr)


class AiHandlerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.server = fake_openai.FakeOpenAI.start(api_key="sk-test")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    def handler(self, api_key: str | None = "sk-test", base_url: str | None = None):
        return worker.make_ai_handler(base_url or self.server.base_url, api_key, "gpt-4o-mini", 5.0)

    def test_round_trip(self) -> None:
        result, ctx = call(
            self.handler(),
            ["openai", "what is the hippocampus?"],
            {"model": "fake-large", "temperature": 0.2, "system": "be brief"},
        )
        self.assertEqual(result["provider"], "openai")
        self.assertEqual(result["model"], "fake-large")
        self.assertEqual(result["answer"], "echo: what is the hippocampus?")
        self.assertEqual(result["finish_reason"], "stop")
        self.assertEqual(result["usage"]["completion_tokens"], 5)
        self.assertEqual([(p[0], p[1]) for p in ctx.progress_reports], [(10, "calling fake-large"), (100, "done")])
        sent = self.server.requests[-1]
        self.assertEqual(sent["messages"][0], {"role": "system", "content": "be brief"})
        self.assertEqual(sent["temperature"], 0.2)

    def test_default_model_and_max_tokens(self) -> None:
        result, _ = call(self.handler(), ["claude", "one two three four"], {"max_tokens": 2})
        self.assertEqual(result["model"], "gpt-4o-mini")
        self.assertEqual(result["answer"], "echo: one")
        self.assertEqual(result["finish_reason"], "length")

    def test_no_endpoint(self) -> None:
        handler = worker.make_ai_handler(None, None, "gpt-4o-mini")
        with self.assertRaises(Fatal) as caught:
            call(handler, ["openai", "hi"])
        self.assertEqual(
            caught.exception.message,
            "no AI endpoint configured: set OPENAI_BASE_URL or --ai-base-url",
        )

    def assert_fails(self, prompt: str, retryable: bool, api_key: str | None = "sk-test",
                     base_url: str | None = None) -> Fatal | Retry:
        with self.assertRaises((Fatal, Retry)) as caught:
            call(self.handler(api_key, base_url), ["openai", prompt])
        self.assertIsInstance(caught.exception, Retry if retryable else Fatal, caught.exception)
        return caught.exception

    def test_4xx_is_not_retryable(self) -> None:
        err = self.assert_fails("!error 400 the prompt is malformed", retryable=False)
        self.assertEqual(err.message, "AI endpoint returned HTTP 400: the prompt is malformed")
        err = self.assert_fails("hi", retryable=False, api_key="sk-wrong")
        self.assertIn("HTTP 401: Incorrect API key provided.", err.message)

    def test_429_and_5xx_are_retryable(self) -> None:
        self.assertIn("HTTP 503", self.assert_fails("!error 503", retryable=True).message)
        self.assertIn("HTTP 500", self.assert_fails("!error 500 boom", retryable=True).message)
        self.assertIn("HTTP 429", self.assert_fails("!error 429 slow down", retryable=True).message)

    def test_unreachable_is_retryable(self) -> None:
        probe = fake_openai.FakeOpenAI(0)  # take a free port, then free it
        url = probe.base_url
        probe.server_close()
        self.assert_fails("hi", retryable=True, base_url=url)

    def test_models_and_unknown_paths(self) -> None:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(
            self.server.base_url + "/models", headers={"Authorization": "Bearer sk-test"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            self.assertEqual(json.load(resp)["data"][0]["id"], "gpt-4o-mini")
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(self.server.base_url + "/nope", timeout=5)
        self.assertEqual(caught.exception.code, 404)
        self.assertIn("Unknown request URL", json.load(caught.exception)["error"]["message"])

# --------------------------------------------------------------------------
# Event lines
# --------------------------------------------------------------------------


class EventLinesTest(unittest.TestCase):
    def lines(self, events: list[WorkerEvent], quiet: set[str] = frozenset()) -> list[dict]:
        out = io.StringIO()
        sink = worker.EventLines(quiet, out)
        for e in events:
            sink(e)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_the_sdk_events_print_as_the_documented_lines(self) -> None:
        E = WorkerEvent
        got = self.lines([
            E("welcome", "", {"worker_id": "w-1", "lease_seconds": 30.0, "heartbeat_seconds": 10.0}),
            E("task", "a", {"name": "t.add", "attempt": 1, "held": 1}),
            E("progress", "a", {"percent": 50.0, "message": "adding"}),
            E("reported", "a", {"outcome": "complete"}),
            E("accepted", "a", {"outcome": "complete", "state": "TASK_STATE_SUCCEEDED", "held": 0}),
            E("accepted", "b", {"outcome": "fail", "state": "TASK_STATE_CANCELLED", "held": 0}),
            E("refused", "c", {"outcome": "complete", "code": 10, "message": "lease lapsed", "held": 0}),
            E("refused", "d", {"outcome": "fail", "code": 3, "message": "too large", "held": 0}),
            E("cancel", "b", {"reason": "by request"}),
            E("soft_time_limit", "e", {}),
            E("revoked", "e", {"reason": "hard time limit reached", "held": 0}),
            E("disconnected", "", {"error": "UNAVAILABLE: gone"}),
        ])
        self.assertEqual(got, [
            {"event": "welcome", "worker_id": "w-1", "lease_seconds": 30.0, "heartbeat_seconds": 10.0},
            {"event": "task", "task_id": "a", "name": "t.add", "attempt": 1, "held": 1},
            {"event": "progress", "task_id": "a", "percent": 50.0},
            {"event": "reported", "task_id": "a", "kind": "complete"},
            {"event": "completed", "task_id": "a", "state": "TASK_STATE_SUCCEEDED", "held": 0},
            {"event": "failed", "task_id": "b", "state": "TASK_STATE_CANCELLED", "held": 0},
            {"event": "aborted", "task_id": "c", "kind": "complete", "message": "lease lapsed", "held": 0},
            {"event": "reply_error", "task_id": "d", "kind": "fail", "code": 3, "message": "too large", "held": 0},
            {"event": "cancel", "task_id": "b", "reason": "by request"},
            {"event": "soft_time_limit", "task_id": "e"},
            {"event": "revoked", "task_id": "e", "reason": "hard time limit reached", "held": 0},
            {"event": "disconnected", "error": "UNAVAILABLE: gone"},
        ])

    def test_quiet_names_print_only_errors(self) -> None:
        E = WorkerEvent
        got = self.lines([
            E("task", "n", {"name": "noop", "attempt": 1, "held": 1}),
            E("reported", "n", {"outcome": "complete"}),
            E("accepted", "n", {"outcome": "complete", "state": "TASK_STATE_SUCCEEDED", "held": 0}),
            E("task", "m", {"name": "noop", "attempt": 1, "held": 1}),
            E("refused", "m", {"outcome": "complete", "code": 10, "message": "lapsed", "held": 0}),
            E("task", "o", {"name": "other", "attempt": 1, "held": 1}),
        ], quiet={"noop"})
        self.assertEqual([(e["event"], e["task_id"]) for e in got], [("aborted", "m"), ("task", "o")])


# --------------------------------------------------------------------------
# worker.py as a process, against a scripted WorkerService
# --------------------------------------------------------------------------

_END = object()


class FakeKoo(worker_grpc.WorkerServiceServicer):
    """A scripted WorkerService: what the worker sends lands in `inbox`
    (except heartbeats, counted in `heartbeats`); what the test puts in
    `outbox` is sent to the worker (`_END` ends the current stream)."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.inbox: "queue.Queue[worker_pb2.WorkRequest]" = queue.Queue()
        self.outbox: "queue.Queue[Any]" = queue.Queue()
        self.heartbeats = 0
        self.streams = 0

    def Work(self, request_iterator, context):  # noqa: N802
        if self.token and (("authorization", f"Bearer {self.token}") not in context.invocation_metadata()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker token")
        self.streams += 1

        def read() -> None:
            try:
                for req in request_iterator:
                    if req.HasField("heartbeat"):
                        self.heartbeats += 1
                    else:
                        self.inbox.put(req)
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                item = self.outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is _END:
                return
            yield item

    # Test helpers.
    def push(self, **kwargs: Any) -> None:
        self.outbox.put(worker_pb2.WorkResponse(**kwargs))

    def expect(self, field: str, timeout: float = 5.0) -> Any:
        msg = self.inbox.get(timeout=timeout)
        assert msg.HasField(field), f"expected {field}, got {msg}"
        return getattr(msg, field)

    def welcome(self, heartbeat: float = 0.1) -> None:
        interval = duration_pb2.Duration()
        interval.FromTimedelta(__import__("datetime").timedelta(seconds=heartbeat))
        lease = duration_pb2.Duration(seconds=30)
        self.push(welcome=worker_pb2.Welcome(worker_id="w-1", lease=lease, heartbeat_interval=interval))


class CliTest(unittest.TestCase):
    def setUp(self) -> None:
        self.koo = FakeKoo(token="secret")
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        worker_grpc.add_WorkerServiceServicer_to_server(self.koo, self.grpc_server)
        self.port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.grpc_server.start()
        self.addCleanup(self.grpc_server.stop, None)

    def test_cli_exit_statuses(self) -> None:
        cmd = [sys.executable, str(HERE / "worker.py"), "--target", f"127.0.0.1:{self.port}", "--serve", "noop"]
        bad = subprocess.run(cmd + ["--token", "wrong"], capture_output=True, text=True, timeout=20)
        self.assertEqual(bad.returncode, 2, bad.stderr)
        self.assertIn("UNAUTHENTICATED", bad.stderr)

        proc = subprocess.Popen(cmd + ["--token", "secret"], stdout=subprocess.PIPE, text=True)
        try:
            self.koo.expect("hello", timeout=20)
            self.koo.welcome()
            self.assertEqual(json.loads(proc.stdout.readline())["event"], "welcome")
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=10), 0)
        finally:
            proc.kill()
            proc.stdout.close()



if __name__ == "__main__":
    unittest.main()
