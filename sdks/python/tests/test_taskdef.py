"""`TaskDef`: a task's name and submit defaults, shared by the code that
submits it and the worker that runs it (Celery's `@app.task(...)` options),
against a real koo."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from koo import SyncTaskManager, TaskCategory, TaskDef, TaskManager, TaskPriority, Worker

from .test_worker import running


def test_submits_take_the_definitions_options_unless_the_call_says_otherwise(default_clients: str, ns: str) -> None:
    target = default_clients
    resize = TaskDef(
        f"sdk.{ns}.resize",
        TaskCategory.RESEARCH,
        priority=TaskPriority.HIGH,
        max_retries=5,
        soft_time_limit=20,
        time_limit=timedelta(seconds=30),
        result_ttl=600,
    )
    w = Worker(target)

    @w.task(resize)
    def run(path: str, width: int = 1024) -> str:
        return f"{path}@{width}"

    async def scenario() -> None:
        tm = TaskManager(target)
        first = await resize.apply_async(("a.png",), {"width": 640}, manager=tm)
        assert (first.name, first.max_retries, first.priority) == (resize.name, 5, TaskPriority.HIGH), first
        assert (first.soft_time_limit, first.time_limit) == (timedelta(seconds=20), timedelta(seconds=30))
        assert await tm.result(first.id, timeout=15) == "a.png@640"
        # the call's options win
        low = await resize.apply_async(("b",), manager=tm, max_retries=0, priority=TaskPriority.LOW, time_limit=25)
        assert (low.max_retries, low.priority, low.time_limit) == (0, TaskPriority.LOW, timedelta(seconds=25))
        # Celery's delay, through the default client
        later = await resize.delay("c.png", width=2)
        assert later.max_retries == 5 and await tm.result(later.id, timeout=15) == "c.png@2"
        # a group: submit_many of the definition's submissions
        group = await tm.submit_many([resize.submission((f"{i}.png",)) for i in range(3)])
        assert [t.max_retries for t in group] == [5, 5, 5]
        assert [await tm.result(t.id, timeout=15) for t in group] == ["0.png@1024", "1.png@1024", "2.png@1024"]

    with running(w):
        asyncio.run(scenario())
        # the blocking twins, through the default client and a blocking one
        done = resize.sync.delay("d.png")
        assert done.max_retries == 5
        sync = SyncTaskManager(TaskManager(target))
        other = resize.sync.apply_async(("e.png",), manager=sync, max_retries=2)
        assert other.max_retries == 2
        assert sync.result(done.id, timeout=15) == "d.png@1024"
        assert sync.result(other.id, timeout=15) == "e.png@1024"


def test_a_worker_serves_the_definitions_queue_and_bad_definitions_are_refused() -> None:
    w = Worker("127.0.0.1:1")
    queued = TaskDef("sdk.queued", TaskCategory.RESEARCH, queue="reports")

    @w.task(queued)
    def run() -> None:
        return None

    assert w.handlers["sdk.queued"].queue == "reports"
    # without a queue: its category's, so that a worker of named queues serves it
    plain = TaskDef("sdk.plain", TaskCategory.PDF_PROCESSING)
    w.task(plain)(run)
    assert w.handlers["sdk.plain"].queue == "pdf_processing"
    s = plain.submission(("x",), queue="other", time_limit=5, max_retries=0)
    assert (s.queue, s.time_limit, s.max_retries) == ("other", 5, 0)
    with pytest.raises(ValueError, match="name"):
        TaskDef("", TaskCategory.RESEARCH)
    with pytest.raises(TypeError, match="category"):
        TaskDef("x", "research")  # type: ignore[arg-type]
