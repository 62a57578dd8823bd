"""Tells a pushed task that waited unread for a long time from a fresh one.

A worker that is stopped (SIGSTOP, a suspended VM, a laptop asleep) reads
nothing from its stream. koo pushes it tasks for two heartbeat intervals
of silence, then nothing more, and a whole lease after its last heartbeat
it revokes them and leases them to other workers. When the worker resumes
it reads the pushes first and the revokes right behind them. A push
started at once would run a second time beside its new worker, and koo
would refuse its outcome.

koo stamps each push with its clock (`push_time`), and its welcome with the
same clock (`time`). Reading koo's time now as the welcome's time plus what
a local clock measured since (one that counts a suspended machine's sleep,
where there is one), the worker knows how long a push waited, whatever the
offset between the two hosts' clocks and however this host's wall clock is
stepped meanwhile. Every push that a revoke follows waited at least a third
of a lease; a push that waited past a quarter of a lease is held back for
`hold()` seconds, so that a revoke already on its way arrives first. A task
that is not revoked by then starts as usual: a false alarm (koo's or the
worker's loop stalled without the lease lapsing) costs that, never the
task. Against a koo that stamps neither, nothing is held.
"""

from __future__ import annotations

import time

from koo.worker.v1 import worker_service_pb2 as wpb

# The longest a late push waits for a revoke (seconds). koo sent the revoke
# while the worker was stopped, so it is already in the stream behind the
# push; this covers the reads between them.
MAX_HOLD = 1.0


def _elapsed_clock() -> float:
    """Seconds on a clock that never steps and, on Linux, counts suspend."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        return time.clock_gettime(boottime)
    return time.monotonic()


class PushClock:
    """koo's clock as seen from here, and the lease."""

    def __init__(self) -> None:
        # koo's time at the welcome and this host's elapsed clock then
        self._koo_at_welcome: float | None = None
        self._here_at_welcome = 0.0
        self._lease = 0.0

    def welcome(self, w: wpb.Welcome) -> None:
        """Reads the lease and koo's clock from the welcome."""
        self._lease = w.lease.ToTimedelta().total_seconds()
        if w.HasField("time"):
            self._koo_at_welcome = w.time.ToNanoseconds() / 1e9
            self._here_at_welcome = _elapsed_clock()

    def waited(self, a: wpb.TaskAssignment) -> float:
        """How long this push waited between koo's send and now (seconds;
        0 when koo stamps no time)."""
        if self._koo_at_welcome is None or not a.HasField("push_time"):
            return 0.0
        koo_now = self._koo_at_welcome + (_elapsed_clock() - self._here_at_welcome)
        return max(0.0, koo_now - a.push_time.ToNanoseconds() / 1e9)

    def late(self, a: wpb.TaskAssignment) -> float | None:
        """The push's wait when it is past a quarter of a lease, else None."""
        waited = self.waited(a)
        return waited if self._lease > 0 and waited > self._lease / 4 else None

    def hold(self) -> float:
        """How long to hold a late push: a quarter of a lease, at most `MAX_HOLD`."""
        return min(MAX_HOLD, self._lease / 4)
