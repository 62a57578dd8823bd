"""A worker's `Work` stream as the worker keeps it: the outbox of messages
to koo (sent in batches when koo reads them), the tasks the stream holds,
the hand-backs awaiting koo's reply, and what koo's welcome said it reads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from koo._pushes import PushClock
from koo.worker.v1 import worker_service_pb2 as wpb

if TYPE_CHECKING:
    from koo._worker import _Run

log = logging.getLogger("koo.worker")

# A batch of messages to koo: at most this many, and about this many bytes
# (a message that would pass the bound waits for the next batch), far below
# koo's receive limit whatever the results' sizes.
MAX_BATCH = 4096
BATCH_BYTES = 256 * 1024
# How long begun tasks wait to be told to koo together (seconds): a task
# that kills its worker sooner is taken for never started (its attempt
# given back, at most four times).
STARTED_WINDOW = 0.01
# The largest message koo reads when its welcome does not say (its default).
MAX_MESSAGE = 4 * 1024 * 1024


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread is running `loop`."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _Session:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.outbox: asyncio.Queue[wpb.WorkRequest | None] = asyncio.Queue()
        self.held: dict[str, _Run] = {}
        self.unacked: dict[str, tuple[wpb.WorkRequest, int]] = {}
        self.closed = False
        # koo said (in its welcome) that it reads batch messages
        self.batches = False
        # Messages per batch: half the worker's concurrency (see `requests`).
        self.batch_size = MAX_BATCH
        # Bytes per batch: under half of koo's message limit, when told.
        self.batch_bytes = BATCH_BYTES
        # The largest message koo reads (its welcome's max_message_size)
        self.max_message = MAX_MESSAGE
        # koo said (in its welcome) that it reads `release` messages
        self.releases = False
        # tasks handed back whose reply has not come yet
        self.releasing: set[str] = set()
        # koo said (in its welcome) that it reads `started` messages
        self.starts = False
        # tasks begun and not yet told to koo
        self.begun: list[str] = []
        # how long pushes waited unread (see `koo._pushes`)
        self.clock = PushClock()
        # koo said (in its welcome) that it adopts the tasks a hello names
        # and keeps the leases of a re-attaching worker when it stops
        self.adopts = False
        # the lease koo's welcome gave (seconds)
        self.lease = 30.0

    def begin(self, task_id: str) -> None:
        """Tells koo that the task began, so that its attempt counts if
        this worker dies before reporting it (without it, koo takes a task
        it heard nothing about in the first heartbeat interval as never
        started, and a task that kills its worker at once would run five
        times). Tasks begun within `STARTED_WINDOW` go in one message, and
        one that ended meanwhile is left out: its outcome says it began. A
        message as each task begins would double what a busy worker sends,
        and each drives koo's session round once more (measured: no-op
        tasks at 16 at a time ran at half the rate)."""
        if not self.starts:
            return
        if not self.begun:
            self.loop.call_later(STARTED_WINDOW, self._tell_begun)
        self.begun.append(task_id)

    def _tell_begun(self) -> None:
        ids = [i for i in self.begun if i in self.held]
        self.begun = []
        if ids:
            self.send(wpb.WorkRequest(started=wpb.Started(task_ids=ids)))

    def release(self, run: _Run, reason: str) -> None:
        """Hands `run`'s task back to koo unfinished (the worker is
        stopping): it goes back to its queue, its attempt given back, and
        koo pushes this stream nothing more. The handler is told to stop."""
        log.info("handing back %s: %s", run.task_id, reason)
        self.held.pop(run.task_id, None)
        run.ctx._abandon(reason)
        self.releasing.add(run.task_id)
        a = run.assignment
        self.send(wpb.WorkRequest(release=wpb.Release(task_id=run.task_id, lease_token=a.lease_token, reason=reason)))

    def send(self, msg: wpb.WorkRequest) -> None:
        if not self.closed:
            self.outbox.put_nowait(msg)

    async def requests(self, hello: wpb.WorkRequest) -> AsyncIterator[wpb.WorkRequest]:
        """The stream's messages: the hello, then the outbox. Messages that
        are ready together (the outcomes of tasks that ended in the same
        turn of the loop) go out as one batch when koo reads batches.

        A batch holds at most half the worker's concurrency: koo answers a
        batch of outcomes with one batch of replies and next tasks, so the
        held tasks travel in groups, and two groups alternate, one running
        here while koo and its store end the other. Batches of every held
        task would stop and go instead (measured: 16 held tasks in batches
        of 8 ran 25% more no-op tasks per second than in batches of 16)."""
        yield hello
        waiting: wpb.WorkRequest | None = None
        while True:
            item = waiting if waiting is not None else await self.outbox.get()
            waiting = None
            if item is None:
                return
            if not self.batches or self.outbox.empty():
                yield item
                continue
            batch = [item]
            size = item.ByteSize()
            end = False
            while len(batch) < self.batch_size and not self.outbox.empty():
                nxt = self.outbox.get_nowait()
                if nxt is None:
                    end = True
                    break
                size += nxt.ByteSize()
                if size > self.batch_bytes:
                    waiting = nxt
                    break
                batch.append(nxt)
            yield batch[0] if len(batch) == 1 else wpb.WorkRequest(batch=wpb.WorkRequestBatch(requests=batch))
            if end:
                return
