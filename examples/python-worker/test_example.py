"""Tests of the example worker that need no koo.

    cd examples/python-worker && ./setup.sh && .venv/bin/python -m unittest -v

- The handlers, called directly: PDF extraction on testdata/sample.pdf, the AI
  handler against fake_openai (in-process, free port), the no-endpoint
  failure, 4xx vs 5xx retryability, and the chaos suite's ledger.
- koo_worker.Worker against a scripted in-process WorkerService (a fake koo):
  hello/welcome, heartbeats, progress, complete, cancel, revoke, reconnect,
  and rejection; and worker.py as a process (exit status 2 on a bad token,
  0 on SIGTERM).
"""

from __future__ import annotations

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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fake_openai  # noqa: E402
import koo_worker  # noqa: E402
import worker  # noqa: E402
from koo_worker import TaskContext, TaskFailed, tasks_pb2, worker_grpc, worker_pb2  # noqa: E402

SAMPLE_PDF = HERE / "testdata" / "sample.pdf"
PAGE_TEXTS = [
    "Page one: the cerebral cortex.",
    "Page two: the hippocampus and memory.",
    "Page three: the cerebellum and motion.",
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


class _RecordingRun:
    """Stands in for the worker's per-task state: records progress reports."""

    def __init__(self) -> None:
        self.progress: list[tuple[float, str, dict | None]] = []

    def report_progress(self, percent: float, message: str, metadata: Any) -> None:
        self.progress.append((percent, message, metadata))


def make_ctx(name: str, args: list, kwargs: dict | None = None) -> tuple[TaskContext, _RecordingRun]:
    """A real TaskContext over a real Task message (so Value conversion is
    exercised too)."""
    task = tasks_pb2.Task(id="task-1", name=name, attempts=1)
    task.args.extend(koo_worker.python_to_value(a) for a in args)
    if kwargs:
        task.kwargs.CopyFrom(koo_worker.python_to_struct(kwargs))
    run = _RecordingRun()
    return TaskContext(run, task, lease_token=1), run  # type: ignore[arg-type]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------


class ConversionTest(unittest.TestCase):
    def test_values_round_trip_with_ints(self) -> None:
        ctx, _ = make_ctx("x", [3, 2.5, "s", None, True, [1, {"a": 2}]], {"n": 4, "f": 0.5})
        self.assertEqual(ctx.args, [3, 2.5, "s", None, True, [1, {"a": 2}]])
        self.assertIsInstance(ctx.args[0], int)
        self.assertEqual(ctx.kwargs, {"n": 4, "f": 0.5})
        self.assertEqual(ctx.attempt, 1)

    def test_non_json_result_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            koo_worker.python_to_value({1, 2})
        with self.assertRaises(ValueError):
            koo_worker.python_to_value(float("nan"))
        self.assertEqual(
            koo_worker.python_to_value((1, 2)).list_value.values[1].number_value, 2
        )


# --------------------------------------------------------------------------
# PDF handler
# --------------------------------------------------------------------------


class PdfHandlerTest(unittest.TestCase):
    def test_extracts_every_page_with_progress(self) -> None:
        ctx, run = make_ctx(worker.PDF_TASK, [str(SAMPLE_PDF), "doc_1"])
        result = worker.process_document(ctx)
        self.assertEqual(result["document_id"], "doc_1")
        self.assertEqual(result["pages"], 3)
        self.assertEqual(result["characters"], sum(len(t) for t in PAGE_TEXTS))
        self.assertTrue(result["text_preview"].startswith(PAGE_TEXTS[0]))
        for text in PAGE_TEXTS:
            self.assertIn(text, result["text_preview"])
        self.assertEqual([p[1] for p in run.progress], ["page 1 of 3", "page 2 of 3", "page 3 of 3"])
        self.assertAlmostEqual(run.progress[0][0], 100 / 3)
        self.assertEqual(run.progress[-1][0], 100.0)
        self.assertEqual(run.progress[0][2], {"page": 1, "pages": 3, "chars": len(PAGE_TEXTS[0])})
        koo_worker.python_to_value(result)  # the result is JSON-able

    def test_missing_file_is_not_retryable(self) -> None:
        ctx, _ = make_ctx(worker.PDF_TASK, ["/path/to/document.pdf", "doc_123"])
        with self.assertRaises(TaskFailed) as caught:
            worker.process_document(ctx)
        self.assertFalse(caught.exception.retryable)
        self.assertIn("does not exist", caught.exception.message)

    def test_not_a_pdf_is_not_retryable(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".pdf", delete=False) as f:
            f.write("hello, I am not a PDF\n")
        self.addCleanup(os.unlink, f.name)
        ctx, _ = make_ctx(worker.PDF_TASK, [f.name, "doc_2"])
        with self.assertRaises(TaskFailed) as caught:
            worker.process_document(ctx)
        self.assertFalse(caught.exception.retryable)
        self.assertIn("not a readable PDF", caught.exception.message)

    def test_bad_page_delay_is_refused(self) -> None:
        ctx, _ = make_ctx(worker.PDF_TASK, [str(SAMPLE_PDF), "d"], {"page_delay_seconds": 61})
        with self.assertRaises(TaskFailed):
            worker.process_document(ctx)

    def test_stops_mid_document_when_cancelled(self) -> None:
        # 0.5 s before each page; cancelled during the wait before page 2.
        ctx, run = make_ctx(worker.PDF_TASK, [str(SAMPLE_PDF), "d"], {"page_delay_seconds": 0.5})
        timer = threading.Timer(0.75, ctx._signal, args=("cancelled",))
        started = time.monotonic()
        timer.start()
        self.addCleanup(timer.cancel)
        with self.assertRaises(TaskFailed) as caught:
            worker.process_document(ctx)
        self.assertLess(time.monotonic() - started, 1.4)  # the sleep was interrupted
        self.assertRegex(caught.exception.message, r"^stopped at page [23] of 3: cancelled$")
        self.assertFalse(caught.exception.retryable)
        self.assertLess(len(run.progress), 3)


# --------------------------------------------------------------------------
# AI handler against fake_openai
# --------------------------------------------------------------------------


class LedgerHandlerTest(unittest.TestCase):
    def test_appends_one_line_per_execution(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "ledger.jsonl")
            handler = worker.make_ledger_handler(path)
            ctx, _ = make_ctx(worker.LEDGER_TASK, [], {"ms": 1})
            first = handler(ctx)
            handler(ctx)
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
        ctx, run = make_ctx(
            worker.AI_TASK,
            ["openai", "what is the hippocampus?"],
            {"model": "fake-large", "temperature": 0.2, "system": "be brief"},
        )
        result = self.handler()(ctx)
        self.assertEqual(result["provider"], "openai")
        self.assertEqual(result["model"], "fake-large")
        self.assertEqual(result["answer"], "echo: what is the hippocampus?")
        self.assertEqual(result["finish_reason"], "stop")
        self.assertEqual(result["usage"]["completion_tokens"], 5)
        self.assertEqual([(p[0], p[1]) for p in run.progress], [(10, "calling fake-large"), (100, "done")])
        sent = self.server.requests[-1]
        self.assertEqual(sent["messages"][0], {"role": "system", "content": "be brief"})
        self.assertEqual(sent["temperature"], 0.2)

    def test_default_model_and_max_tokens(self) -> None:
        ctx, _ = make_ctx(worker.AI_TASK, ["claude", "one two three four"], {"max_tokens": 2})
        result = self.handler()(ctx)
        self.assertEqual(result["model"], "gpt-4o-mini")
        self.assertEqual(result["answer"], "echo: one")
        self.assertEqual(result["finish_reason"], "length")

    def test_no_endpoint(self) -> None:
        ctx, _ = make_ctx(worker.AI_TASK, ["openai", "hi"])
        handler = worker.make_ai_handler(None, None, "gpt-4o-mini")
        with self.assertRaises(TaskFailed) as caught:
            handler(ctx)
        self.assertEqual(
            caught.exception.message,
            "no AI endpoint configured: set OPENAI_BASE_URL or --ai-base-url",
        )
        self.assertFalse(caught.exception.retryable)

    def assert_fails(self, prompt: str, retryable: bool, api_key: str | None = "sk-test",
                     base_url: str | None = None) -> TaskFailed:
        ctx, _ = make_ctx(worker.AI_TASK, ["openai", prompt])
        with self.assertRaises(TaskFailed) as caught:
            self.handler(api_key, base_url)(ctx)
        self.assertEqual(caught.exception.retryable, retryable, caught.exception.message)
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
# Worker against a scripted fake koo
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

    def task(self, task_id: str, name: str, args: list, token: int, kwargs: dict | None = None) -> None:
        task = tasks_pb2.Task(id=task_id, name=name, attempts=1)
        task.args.extend(koo_worker.python_to_value(a) for a in args)
        if kwargs:
            task.kwargs.CopyFrom(koo_worker.python_to_struct(kwargs))
        secret = f"secret-{task_id}"
        self.push(task=worker_pb2.TaskAssignment(task=task, lease_token=token, lease_secret=secret))


class WorkerProtocolTest(unittest.TestCase):
    def setUp(self) -> None:
        self.koo = FakeKoo(token="secret")
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        worker_grpc.add_WorkerServiceServicer_to_server(self.koo, self.grpc_server)
        self.port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.grpc_server.start()
        self.addCleanup(self.grpc_server.stop, None)
        self.events: list[dict] = []

    def start_worker(self, handlers: dict, token: str = "secret", concurrency: int = 2) -> koo_worker.Worker:
        w = koo_worker.Worker(
            f"127.0.0.1:{self.port}", "test-worker", handlers, concurrency=concurrency,
            token=token, events=self.events.append,
        )
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                w.run()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def stop() -> None:
            w.stop()
            thread.join(5)
            self.assertFalse(thread.is_alive(), "worker did not stop")

        self.addCleanup(stop)
        self.worker_thread = thread
        return w

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def test_task_progress_complete(self) -> None:
        def add(ctx: TaskContext) -> dict:
            ctx.progress(50, "adding", {"step": 1})
            return {"sum": ctx.args[0] + ctx.args[1]}

        self.start_worker({"t.add": add})
        hello = self.koo.expect("hello")
        self.assertEqual((hello.name, list(hello.task_names), hello.concurrency), ("test-worker", ["t.add"], 2))
        self.koo.welcome()
        self.koo.task("a", "t.add", [2, 3], token=7)
        progress = self.koo.expect("progress")
        self.assertEqual((progress.task_id, progress.lease_token, progress.percent), ("a", 7, 50))
        # the lease secret is echoed in every report
        self.assertEqual(progress.lease_secret, "secret-a")
        self.assertEqual(progress.metadata["step"], 1)
        complete = self.koo.expect("complete")
        self.assertEqual((complete.task_id, complete.lease_token, complete.lease_secret), ("a", 7, "secret-a"))
        self.assertEqual(koo_worker.value_to_python(complete.result), {"sum": 5})
        self.koo.push(reply=worker_pb2.Reply(
            task_id="a", kind=worker_pb2.REPLY_KIND_COMPLETE, code=0, state=tasks_pb2.TASK_STATE_SUCCEEDED))
        self.assertTrue(wait_until(lambda: self.events_of("completed")))
        self.assertTrue(wait_until(lambda: self.koo.heartbeats >= 2), "no heartbeats")
        self.assertEqual(self.events_of("welcome")[0]["worker_id"], "w-1")
        self.assertEqual(self.events_of("task")[0],
                         {"event": "task", "task_id": "a", "name": "t.add", "attempt": 1, "held": 1})
        self.assertEqual(self.events_of("progress")[0], {"event": "progress", "task_id": "a", "percent": 50.0})
        self.assertEqual(self.events_of("completed")[0],
                         {"event": "completed", "task_id": "a", "state": "TASK_STATE_SUCCEEDED", "held": 0})

    def test_failures_cancel_and_revoke(self) -> None:
        def handler(ctx: TaskContext) -> Any:
            if ctx.args[0] == "fail":
                raise TaskFailed("bad input", retryable=False, details={"field": "x"})
            if ctx.args[0] == "crash":
                raise RuntimeError("boom")
            ctx.sleep(10)  # until cancelled or revoked
            return {"done": True}

        self.start_worker({"t.h": handler}, concurrency=4)
        self.koo.expect("hello")
        self.koo.welcome()

        self.koo.task("f", "t.h", ["fail"], token=1)
        fail = self.koo.expect("fail")
        self.assertEqual((fail.task_id, fail.message, fail.retryable), ("f", "bad input", False))
        self.assertEqual(fail.details["field"], "x")

        self.koo.task("c", "t.h", ["crash"], token=2)
        fail = self.koo.expect("fail")
        self.assertEqual((fail.task_id, fail.message, fail.retryable), ("c", "RuntimeError: boom", True))

        self.koo.task("k", "t.h", ["wait"], token=3)
        self.assertTrue(wait_until(lambda: any(e["task_id"] == "k" for e in self.events_of("task"))))
        self.koo.push(cancel=worker_pb2.CancelRequested(task_id="k", reason="by request"))
        fail = self.koo.expect("fail")
        self.assertEqual((fail.task_id, fail.lease_token, fail.message, fail.retryable), ("k", 3, "cancelled", False))
        self.assertEqual(fail.lease_secret, "secret-k")
        self.koo.push(reply=worker_pb2.Reply(
            task_id="k", kind=worker_pb2.REPLY_KIND_FAIL, code=0, state=tasks_pb2.TASK_STATE_CANCELLED))
        self.assertTrue(wait_until(lambda: self.events_of("failed")))
        self.assertEqual(self.events_of("failed")[0]["state"], "TASK_STATE_CANCELLED")

        self.koo.task("r", "t.h", ["wait"], token=4)
        self.assertTrue(wait_until(lambda: any(e["task_id"] == "r" for e in self.events_of("task"))))
        self.koo.push(revoked=worker_pb2.LeaseRevoked(task_id="r", reason="hard time limit reached"))
        with self.assertRaises(queue.Empty):
            self.koo.inbox.get(timeout=0.5)  # nothing reported
        self.assertEqual(self.events_of("revoked")[0]["reason"], "hard time limit reached")

        self.koo.push(reply=worker_pb2.Reply(
            task_id="x", kind=worker_pb2.REPLY_KIND_COMPLETE, code=10, message="lease lapsed"))
        self.assertTrue(wait_until(lambda: self.events_of("aborted")))
        self.assertEqual(self.events_of("aborted")[0]["message"], "lease lapsed")

    def test_reconnects_and_abandons_running_tasks(self) -> None:
        release = threading.Event()

        def slow(ctx: TaskContext) -> dict:
            release.wait(5)
            return {"late": True}

        self.start_worker({"t.slow": slow})
        self.koo.expect("hello")
        self.koo.welcome()
        self.koo.task("s", "t.slow", [], token=1)
        self.assertTrue(wait_until(lambda: self.events_of("task")))
        self.koo.outbox.put(_END)  # koo ends the stream
        hello = self.koo.expect("hello")  # the worker reconnects
        self.assertEqual(hello.name, "test-worker")
        self.assertEqual(len(self.events_of("disconnected")), 1)
        release.set()  # the abandoned task finishes: nothing is reported
        with self.assertRaises(queue.Empty):
            self.koo.inbox.get(timeout=0.3)

    def test_wrong_token_is_fatal(self) -> None:
        self.start_worker({"t.x": lambda ctx: None}, token="wrong")
        self.worker_thread.join(5)
        self.assertEqual(len(self.errors), 1)
        self.assertIsInstance(self.errors[0], koo_worker.ConnectRejected)
        self.assertEqual(self.errors[0].code, grpc.StatusCode.UNAUTHENTICATED)

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
