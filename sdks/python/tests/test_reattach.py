"""A koo restart restarts none of the tasks a worker runs: the worker keeps
them running when its stream ends and re-attaches them to the next koo
(`koo._carry`), with `kill -9` of koo and with its graceful stop."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import grpc
import grpc.aio
import pytest

from koo import TaskCategory, TaskContext, TaskManager, TaskState, Worker, WorkerEvent
from koo._carry import MAX_CLAIMS, Carried, carry_for
from koo._worker import _Run
from koo.worker.v1 import worker_service_pb2 as wpb

from .conftest import KooServer, RedisServer
from .test_worker import running, wait_for


@pytest.mark.parametrize(("store", "stop"), [("redis", "kill"), ("redis", "term"), ("data_dir", "term")])
def test_a_koo_restart_restarts_no_running_task(store: str, stop: str, tmp_path: Path) -> None:
    """A task with no retry left runs once through a restart of koo. After
    a `kill -9` it ends while koo is down, and its outcome waits for the
    next stream; after a SIGTERM it ends once re-attached (on Redis, and on
    the embedded store with a data directory)."""
    redis = RedisServer() if store == "redis" else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    env = {"KOO_LISTEN": addr, "KOO_WORKER_CONCURRENCY": "0"}
    env.update({"REDIS_URL": redis.url} if redis else {"KOO_DATA_DIR": str(tmp_path / "data")})
    server = KooServer(env)
    began, go = threading.Event(), threading.Event()
    runs: list[int] = []
    events: list[WorkerEvent] = []
    w = Worker(addr, concurrency=2, on_event=events.append)

    @w.task("sdk.reattach.slow")
    def slow(n: int, *, ctx: TaskContext) -> int:
        runs.append(n)
        began.set()
        assert go.wait(30)
        # from this thread, after the re-attach: quotes the new lease
        ctx.progress(50, "after the restart")
        return n * 2

    def reattached() -> list[int]:
        return [e.fields["reattached"] for e in events if e.kind == "welcome"]

    try:
        with running(w):
            tm = TaskManager(addr).sync
            tid = tm.submit_task("sdk.reattach.slow", TaskCategory.RESEARCH, args=(21,), max_retries=0)
            assert began.wait(15), "the task did not start"
            if stop == "kill":
                server.proc.kill()
                server.proc.wait()
            else:
                server.stop()
            wait_for(lambda: not w.connected.is_set(), 10, "the worker to see koo gone")
            if stop == "kill":
                go.set()
                wait_for(lambda: any(e.kind == "reported" for e in events), 10, "the outcome while koo is down")
            server = KooServer(env)
            wait_for(lambda: reattached() == [0, 1], 15, "the worker to re-attach its task")
            go.set()
            assert tm.result(tid, timeout=15) == 42
            assert tm.get_task_status(tid).attempts == 1
            assert runs == [21]
            assert not [e for e in events if e.kind == "refused"], events
    finally:
        server.stop()
        if redis:
            redis.stop()


def test_how_long_a_lost_streams_tasks_are_carried() -> None:
    """A lease when koo said it kept the leases; a heartbeat interval when
    the connection failed with no word from koo; not at all when koo ended
    the stream or refused it (it ended the leases)."""

    def ended(code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), "ended")

    assert carry_for(ended(grpc.StatusCode.UNAVAILABLE, (("koo-leases-kept", "2"),)), 30.0) == 30.0
    assert carry_for(ended(grpc.StatusCode.UNAVAILABLE), 30.0) == 10.0
    assert carry_for(ended(grpc.StatusCode.INTERNAL), 30.0) == 10.0
    for code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED):
        assert carry_for(ended(code), 30.0) is None


def test_what_a_hello_names() -> None:
    """Outcomes and runs, a run never started named as such, a task without
    a lease secret left out, and no more than koo reads."""

    def run(tid: str, secret: str = "s") -> _Run:
        a = wpb.TaskAssignment(lease_token=1, lease_secret=secret)
        a.task.id = tid
        return cast(_Run, SimpleNamespace(assignment=a, task_id=tid))

    carried = Carried()
    began, pushed, blind = run("began"), run("pushed"), run("blind", secret="")
    carried.runs = {"began": began, "pushed": pushed, "blind": blind}
    done = wpb.Complete(task_id="done", lease_token=2, lease_secret="d")
    carried.outcomes = {"done": wpb.WorkRequest(complete=done)}
    claims = {c.task_id: c for c in carried.claims(lambda r: r is began)}
    assert set(claims) == {"done", "began", "pushed"}
    assert (claims["done"].lease_token, claims["done"].lease_secret) == (2, "d")
    assert not claims["began"].not_started and claims["pushed"].not_started
    carried.runs = {f"t{i}": run(f"t{i}") for i in range(MAX_CLAIMS + 5)}
    assert len(carried.claims(lambda r: True)) == MAX_CLAIMS


def test_a_stopping_worker_has_koo_hand_its_tasks_back() -> None:
    """A worker that is stopping (its grace running) tells koo so: koo
    stopping meanwhile hands its task back, the attempt given back, rather
    than keep the lease for a re-attach the worker will not make."""
    redis = RedisServer()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    env = {"REDIS_URL": redis.url, "KOO_LISTEN": addr, "KOO_WORKER_CONCURRENCY": "0"}
    server = KooServer(env)
    began, go = threading.Event(), threading.Event()
    w = Worker(addr, grace=30)

    @w.task("sdk.reattach.draining")
    def slow() -> str:
        began.set()
        go.wait(30)
        return "done"

    try:
        with running(w):
            tm = TaskManager(addr).sync
            tid = tm.submit_task("sdk.reattach.draining", TaskCategory.RESEARCH, max_retries=0)
            assert began.wait(15), "the task did not start"
            w.stop()
            wait_for(lambda: any("external worker stopping" in line for line in server.log), 10, "koo to read it")
            server.stop()
            server = KooServer(env)
            info = tm.get_task_status(tid)
            assert (info.state, info.attempts) == (TaskState.QUEUED, 0), info
            go.set()
    finally:
        go.set()
        server.stop()
        redis.stop()
