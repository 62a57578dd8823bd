"""Batch messages: what the worker's stream sends, and a busy worker against
a real koo.

The stream's request generator is tested on its own (what it yields for a
given outbox, with and without koo's `accepts_batches`); the end-to-end
test runs many tasks through a worker of concurrency 8 and checks that its
outcomes went out in batches of at most half its concurrency.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from koo import TaskCategory, TaskManager, Worker
from koo import _session as session_module
from koo.worker.v1 import worker_service_pb2 as wpb
from tests.test_worker import running

HELLO = wpb.WorkRequest(hello=wpb.Hello(name="t", task_names=["x"], concurrency=4))


def complete(i: int, size: int = 0) -> wpb.WorkRequest:
    c = wpb.Complete(task_id=f"t{i}", lease_token=1)
    c.result.string_value = "x" * size
    return wpb.WorkRequest(complete=c)


async def sent(
    batches: bool, batch_size: int, queued: list[wpb.WorkRequest], batch_bytes: int = session_module.BATCH_BYTES
) -> list[wpb.WorkRequest]:
    """What the stream sends for `queued` (then the end of the outbox)."""
    session = session_module._Session(asyncio.get_running_loop())
    session.batches = batches
    session.batch_size = batch_size
    session.batch_bytes = batch_bytes
    for m in queued:
        session.send(m)
    session.outbox.put_nowait(None)
    return [m async for m in session.requests(HELLO)]


def shape(msgs: list[wpb.WorkRequest]) -> list[Any]:
    """Each message as its kind, a batch as the task ids it holds."""
    out: list[Any] = []
    for m in msgs:
        kind = m.WhichOneof("message")
        if kind == "batch":
            out.append([r.complete.task_id for r in m.batch.requests])
        elif kind == "complete":
            out.append(m.complete.task_id)
        else:
            out.append(kind)
    return out


def test_no_batches_unless_koo_reads_them() -> None:
    msgs = asyncio.run(sent(False, 4, [complete(i) for i in range(3)]))
    assert shape(msgs) == ["hello", "t0", "t1", "t2"]


def test_ready_messages_go_out_in_batches_of_the_batch_size() -> None:
    msgs = asyncio.run(sent(True, 2, [complete(i) for i in range(5)]))
    assert shape(msgs) == ["hello", ["t0", "t1"], ["t2", "t3"], "t4"]


def test_a_batch_stays_under_its_byte_bound() -> None:
    # four results of 100 KiB: a batch holds two (the third would pass
    # 256 KiB and waits for the next one)
    msgs = asyncio.run(sent(True, 100, [complete(i, 100 * 1024) for i in range(4)]))
    assert shape(msgs) == ["hello", ["t0", "t1"], ["t2", "t3"]]
    assert all(m.ByteSize() <= session_module.BATCH_BYTES for m in msgs)


def test_a_smaller_koo_message_limit_makes_smaller_batches() -> None:
    # koo told 64 KiB: batches stay under half of it
    msgs = asyncio.run(sent(True, 100, [complete(i, 20 * 1024) for i in range(4)], batch_bytes=32 * 1024))
    assert shape(msgs) == ["hello", "t0", "t1", "t2", "t3"]


def test_struct_values_count_the_struct_as_a_level() -> None:
    """koo counts a Struct (details, metadata) as the first of 32 levels."""
    from koo._values import to_struct

    def nested(levels: int) -> object:
        v: object = "bottom"
        for _ in range(levels):
            v = [v]
        return v

    to_struct({"a": nested(31)})
    with pytest.raises(ValueError, match="nests deeper than 32"):
        to_struct({"a": nested(32)})


def test_a_busy_worker_sends_batches_of_half_its_concurrency(
    target: str, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 no-op tasks through a worker of concurrency 8 all succeed; its
    outcomes left in batches (of at most 4 messages)."""
    sizes: list[int] = []
    original = session_module._Session.requests

    async def counted(self: Any, hello: wpb.WorkRequest) -> Any:
        async for m in original(self, hello):
            if m.WhichOneof("message") == "batch":
                sizes.append(len(m.batch.requests))
            yield m

    monkeypatch.setattr(session_module._Session, "requests", counted)
    w = Worker(target, concurrency=8)
    name = f"sdk.{ns}.noop"

    @w.task(name)
    async def noop(i: int) -> int:
        return i

    async def submit() -> list[str]:
        tm = TaskManager(target)
        return [await tm.submit_task(name, TaskCategory.RESEARCH, args=[i]) for i in range(200)]

    async def results(ids: list[str]) -> list[Any]:
        tm = TaskManager(target)
        return [await tm.result(t, timeout=30) for t in ids]

    # queued before the worker connects, so that its first leases come
    # together and their outcomes are ready together: submitted one by one
    # to a worker that keeps up, they would never meet in a batch
    ids = asyncio.run(submit())
    with running(w):
        assert asyncio.run(asyncio.wait_for(results(ids), 60)) == list(range(200))
    assert sizes, "no batch was sent"
    assert max(sizes) <= 4, sizes
