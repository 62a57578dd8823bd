"""Tells a pushed task that waited unread for a long time from a fresh one.

A worker that is stopped (SIGSTOP, a suspended VM, a laptop asleep) reads
nothing from its stream. koo keeps pushing it tasks until a whole lease has
passed without a heartbeat; then it revokes them and leases them to other
workers. When the worker resumes it reads the pushes first and the revokes
right behind them. A push started at once would run a second time beside
its new worker, and koo would refuse its outcome.

A task's `start_time` is when it was leased, by the store's clock, and the
welcome carries koo's clock, so the worker can measure how long a push
waited between koo's lease and its own read, whatever the offset between
the clocks (the offset is taken as the smallest seen, which also takes out
the delivery time). A push that waited past half a lease is held back for
`HOLD` seconds, so that a revoke already on its way arrives first. A task
that is not revoked by then starts as usual: a false alarm (a clock
stepped, a loop blocked without the lease lapsing) costs `HOLD`, never
the task.
"""

from __future__ import annotations

import time

from koo.tasks.v1 import task_service_pb2 as tasks_pb
from koo.worker.v1 import worker_service_pb2 as wpb

# How long a late push waits for a revoke (seconds). koo sent the revoke
# while the worker was stopped, so it is already in the stream behind the
# push; this covers the reads between them.
HOLD = 1.0


class PushClock:
    """The offset between this host's clock and the store's, and the lease."""

    def __init__(self) -> None:
        # this clock minus the store's, plus the quickest delivery seen
        self._offset: float | None = None
        self._lease = 0.0

    def welcome(self, w: wpb.Welcome) -> None:
        """Reads the lease and koo's clock from the welcome."""
        self._lease = w.lease.ToTimedelta().total_seconds()
        if w.HasField("time"):
            self._offset = time.time() - w.time.ToNanoseconds() / 1e9

    def waited(self, task: tasks_pb.Task) -> float:
        """How long this push waited beyond the quickest one (seconds)."""
        if not task.HasField("start_time"):
            return 0.0
        age = time.time() - task.start_time.ToNanoseconds() / 1e9
        if self._offset is None or age < self._offset:
            self._offset = age
        return age - self._offset

    def late(self, task: tasks_pb.Task) -> float | None:
        """The push's wait when it is past half a lease, else None."""
        waited = self.waited(task)
        return waited if self._lease > 0 and waited > self._lease / 2 else None
