"""Diagnoses a blocked event loop in a worker.

An async handler that runs blocking code (`time.sleep`, a synchronous HTTP
client, a long computation) stops the worker's event loop: its heartbeats,
its other async tasks and its reports all wait, and once the lease lapses
koo gives the task to another worker. Nothing in the worker would say why.
A thread of its own asks the loop to run a callback every half second; when
the loop has not run it within `after` seconds, it logs which async
handlers were running, and again when the loop runs again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("koo.worker")

# How often the loop is asked to answer (seconds).
PING_EVERY = 0.5


class LoopWatch:
    """Watches `loop` from a daemon thread until `stop()`; `running()`
    names the async handlers running now (read while the loop is stuck)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, running: Callable[[], list[str]], after: float) -> None:
        self._loop = loop
        self._running = running
        self._after = after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="koo-loop-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(PING_EVERY):
            answered = threading.Event()
            asked = time.monotonic()
            try:
                self._loop.call_soon_threadsafe(answered.set)
            except RuntimeError:
                return  # the loop is closed
            if answered.wait(self._after):
                continue
            try:
                running = ", ".join(self._running()) or "none"
            except RuntimeError:  # the set changed under us
                running = "unknown"
            log.warning(
                "the event loop has been blocked for %.1f s (async handlers running: %s): an async "
                "handler is running blocking code, so heartbeats and other tasks wait, and once the "
                "lease lapses koo gives the task to another worker; make a blocking handler a plain "
                "`def` (it runs on a thread) or await its I/O",
                time.monotonic() - asked,
                running,
            )
            while not answered.wait(PING_EVERY):
                if self._stop.is_set():
                    return
            log.warning("the event loop ran again after %.1f s blocked", time.monotonic() - asked)
