"""The threads plain handlers run on (`koo._threads`): reused, never held
by a handler that does not return, and no more than `keep` kept idle."""

from __future__ import annotations

import asyncio
import threading

import pytest

from koo._threads import Threads


def test_threads_are_reused_for_the_next_task() -> None:
    threads = Threads(keep=4)

    async def run_all() -> set[int]:
        seen: set[int] = set()
        for _ in range(50):
            seen.add(await threads.run(threading.get_ident))
        return seen

    assert len(asyncio.run(run_all())) == 1


def test_a_handler_that_never_returns_holds_no_thread_of_the_others() -> None:
    threads = Threads(keep=1)
    stuck = threading.Event()
    release = threading.Event()

    def hang() -> bool:
        stuck.set()
        return release.wait(30)

    async def scenario() -> str:
        blocked = threads.run(hang)
        assert await asyncio.to_thread(stuck.wait, 10)
        # the only kept thread is stuck: the next task gets a new one
        result = await asyncio.wait_for(threads.run(lambda: "next"), 10)
        release.set()
        await blocked
        return result

    assert asyncio.run(scenario()) == "next"


def test_exceptions_reach_the_awaiting_coroutine() -> None:
    threads = Threads(keep=1)

    def boom() -> None:
        raise KeyError("x")

    async def scenario() -> None:
        with pytest.raises(KeyError):
            await threads.run(boom)

    asyncio.run(scenario())


def test_idle_threads_beyond_keep_end() -> None:
    threads = Threads(keep=1)
    gate = threading.Barrier(4)
    idents: list[int] = []

    def job() -> int:
        gate.wait(10)  # four at once: four threads
        return threading.get_ident()

    async def scenario() -> None:
        idents.extend(await asyncio.gather(*(threads.run(job) for _ in range(4))))

    asyncio.run(scenario())
    assert len(set(idents)) == 4
    # three of the four end once idle; wait for it with a deadline
    deadline = threading.Event()
    for _ in range(500):
        alive = [t for t in threading.enumerate() if t.ident in idents]
        if len(alive) <= 1:
            break
        deadline.wait(0.01)
    assert len([t for t in threading.enumerate() if t.ident in idents]) <= 1
