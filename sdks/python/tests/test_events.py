"""The worker's event hook against a real koo: every `WorkerEvent` kind is
observed where it happens, with its fields, and a raising hook does not stop
the worker.

(`refused` is observed with ABORTED, the answer to a late outcome after the
lease lapsed; the Rust suite's `worker_python::a_worker_that_outlives_its_lease_is_aborted`
sees the same through the example worker's event lines, after a partition.)
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from koo import Fatal, TaskCategory, TaskContext, TaskFailed, TaskManager, TaskState, Worker, WorkerEvent
from tests.test_worker import running, wait_for


class Events:
    """The events a hook saw (appended on the worker's loop, read by the test)."""

    def __init__(self) -> None:
        self.seen: list[WorkerEvent] = []

    def __call__(self, ev: WorkerEvent) -> None:
        self.seen.append(ev)

    def of(self, task_id: str, kind: str | None = None) -> list[WorkerEvent]:
        return [e for e in self.seen if e.task_id == task_id and kind in (None, e.kind)]

    def wait(self, task_id: str, kind: str) -> WorkerEvent:
        wait_for(lambda: bool(self.of(task_id, kind)), 10, f"{kind} of {task_id}")
        return self.of(task_id, kind)[0]


def test_every_kind_of_event_with_its_fields(target: str, ns: str) -> None:
    """A task's life (task, progress, reported, accepted), a fatal failure, a
    cancel, a soft then hard time limit; a hook that
    raises on every event is logged and the worker carries on."""
    events = Events()
    w = Worker(target, concurrency=4, on_event=events)
    release = threading.Event()

    @w.on_event
    def broken(ev: WorkerEvent) -> None:
        raise RuntimeError("a broken observer")

    @w.task(f"sdk.{ns}.ok")
    def ok(*, ctx: TaskContext) -> int:
        ctx.progress(50, "half")
        return 1

    @w.task(f"sdk.{ns}.fatal")
    async def fatal() -> None:
        raise Fatal("no")

    @w.task(f"sdk.{ns}.wait")
    async def wait(*, ctx: TaskContext) -> None:
        await ctx.wait_cancelled()

    @w.task(f"sdk.{ns}.stuck")
    def stuck() -> None:
        release.wait(30)  # ignores the soft limit: revoked at the hard one

    async def scenario() -> dict[str, str]:
        tm = TaskManager(target)
        ids: dict[str, str] = {}
        ids["ok"] = await tm.submit_task(f"sdk.{ns}.ok", TaskCategory.RESEARCH)
        assert await tm.result(ids["ok"], timeout=15) == 1
        ids["fatal"] = await tm.submit_task(f"sdk.{ns}.fatal", TaskCategory.RESEARCH)
        with pytest.raises(TaskFailed):
            await tm.result(ids["fatal"], timeout=15)
        ids["wait"] = await tm.submit_task(f"sdk.{ns}.wait", TaskCategory.RESEARCH)
        await asyncio.to_thread(events.wait, ids["wait"], "task")
        await tm.cancel(ids["wait"], reason="user gave up")
        with pytest.raises(TaskFailed):
            await tm.result(ids["wait"], timeout=15)
        ids["stuck"] = await tm.submit_task(
            f"sdk.{ns}.stuck", TaskCategory.RESEARCH, soft_time_limit=0.5, time_limit=1, max_retries=0
        )
        with pytest.raises(TaskFailed) as e:
            await tm.result(ids["stuck"], timeout=15)
        assert e.value.task.state is TaskState.TIMED_OUT
        return ids

    try:
        with running(w):
            ids = asyncio.run(scenario())
            for tid in ids.values():  # koo's reply may trail the state a client sees
                events.wait(tid, "accepted" if tid != ids["stuck"] else "revoked")
    finally:
        release.set()

    welcome = [e for e in events.seen if e.kind == "welcome"]
    assert len(welcome) == 1 and welcome[0].fields["worker_id"] == w.worker_id
    assert welcome[0].fields["lease_seconds"] > 0 and welcome[0].fields["heartbeat_seconds"] > 0

    life = [(e.kind, dict(e.fields)) for e in events.of(ids["ok"])]
    assert life == [
        ("task", {"name": f"sdk.{ns}.ok", "attempt": 1, "held": 1}),
        ("progress", {"percent": 50.0, "message": "half"}),
        ("reported", {"outcome": "complete"}),
        ("accepted", {"outcome": "complete", "state": "TASK_STATE_SUCCEEDED", "held": 0}),
    ]

    assert events.of(ids["fatal"], "reported")[0].fields == {"outcome": "fail", "message": "no", "retryable": False}
    assert events.of(ids["fatal"], "accepted")[0].fields["state"] == "TASK_STATE_FAILED"

    assert events.of(ids["wait"], "cancel")[0].fields["reason"]
    assert events.of(ids["wait"], "accepted")[0].fields["state"] == "TASK_STATE_CANCELLED"

    kinds = [e.kind for e in events.of(ids["stuck"])]
    assert kinds[:3] == ["task", "soft_time_limit", "revoked"], kinds
    assert "reported" not in kinds  # a revoked task reports nothing
    assert events.of(ids["stuck"], "revoked")[0].fields["reason"]


def test_refused_when_the_lease_lapsed() -> None:
    """A handler that blocks the worker's loop past a 1 s lease (no heartbeat
    goes out): its late completion is `refused` with ABORTED (10)."""
    from tests.conftest import KooServer

    server = KooServer({"KOO_TASK_LEASE": "1s", "KOO_TASK_SWEEP_INTERVAL": "100ms"})
    events = Events()
    w = Worker(server.target, on_event=events)

    @w.task("sdk.events.hog")
    async def hog() -> str:
        time.sleep(2.5)  # noqa: ASYNC251 (the point: the loop sends no heartbeat)
        return "late"

    try:
        with running(w):
            tm = TaskManager(server.target).sync
            tid = tm.submit_task("sdk.events.hog", TaskCategory.RESEARCH, max_retries=0)
            refused = events.wait(tid, "refused").fields
    finally:
        server.stop()
    assert (refused["outcome"], refused["code"]) == ("complete", 10), refused
    assert refused["message"], refused
    assert not events.of(tid, "accepted")


def test_disconnected_when_koo_goes_away() -> None:
    """koo stopped under a connected worker: one `disconnected` with the error."""
    from tests.conftest import KooServer

    server = KooServer({})
    events = Events()
    w = Worker(server.target, on_event=events)

    @w.task("sdk.events.never")
    def never() -> None:
        pass

    try:
        with running(w):
            server.stop()
            wait_for(lambda: bool(events.of("", "disconnected")), 10, "disconnected")
    finally:
        server.stop()
    error = events.of("", "disconnected")[0].fields["error"]
    assert isinstance(error, str) and error, error
