"""Threads for plain (non-async) handlers.

A handler that never returns cannot be stopped in Python, so it must not
hold a slot of a fixed pool: a worker at its hard limit abandons it and
runs the next task. Starting a thread per task does that, but costs more
than a short handler. `Threads` keeps finished threads for the next task
instead: an idle thread takes the next job; when none is idle, a new one
starts. An abandoned thread is simply never idle again; idle threads
beyond `keep` end.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Threads:
    """Reusable daemon threads, at most `keep` of them idle at once."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        # a job runs its handler and returns what delivers the outcome
        self._jobs: queue.SimpleQueue[Callable[[], Callable[[], None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, job: Callable[[], Callable[[], None]]) -> None:
        """Runs `job` on an idle thread, or on a new one; then what it
        returned, once the thread counts as idle again (so that a task
        submitted on the outcome finds it)."""
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._serve, name="koo-task", daemon=True).start()

    def _serve(self) -> None:
        while True:
            deliver = self._jobs.get()()
            with self._lock:
                keep = self._idle < self._keep
                if keep:
                    self._idle += 1
            deliver()
            if not keep:
                return

    def run(self, fn: Callable[[], T]) -> Awaitable[T]:
        """`fn()` on one of the threads, awaited on the running loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def done_ok(v: T) -> None:
            if not fut.done():
                fut.set_result(v)

        def done_err(e: BaseException) -> None:
            if not fut.done():
                fut.set_exception(e)

        def deliver(how: Callable[[Any], None], what: Any) -> None:
            try:
                loop.call_soon_threadsafe(how, what)
            except RuntimeError:  # the worker's loop has ended: nobody waits
                pass

        def job() -> Callable[[], None]:
            try:
                v = fn()
            except BaseException as e:  # noqa: BLE001 (delivered to the awaiting coroutine)
                return functools.partial(deliver, done_err, e)
            return functools.partial(deliver, done_ok, v)

        self.submit(job)
        return fut
