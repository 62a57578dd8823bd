"""Tasks a worker carries from a lost stream to its next one.

When a worker's stream ends while tasks run because koo stopped or died,
the tasks run on: the worker names them in the `held` of its next hello, to
this koo or another, and koo adopts each one whose lease is still current
(its lease secret proves the claim). Outcomes that could not be sent, or
whose reply never came, are sent on the new stream. koo revokes what it
cannot adopt (the lease lapsed, the task ended): those handlers are told to
stop, as for any revoke. A task pushed and never started is named as such:
koo hands it back to its queue rather than adopting it.

How the stream ended says how long to carry:
- koo said it kept the leases (it is stopping: UNAVAILABLE with the trailer
  `koo-leases-kept`): for a lease, the leases' own bound;
- the connection failed with no word from koo (koo killed, or a network
  failure, which the worker cannot tell apart): for one heartbeat interval
  (a third of the lease). If koo is alive it has already taken the tasks
  back, and runs them elsewhere: the first stream to a live koo revokes
  them, and the interval bounds how long they run twice when no koo is
  reachable;
- any other end (koo closed the stream, or refused it): koo ended the
  leases; nothing is carried, and the handlers are told to stop.

A koo whose welcome does not say `adopts_held` (a release before it)
neither adopts nor keeps leases: the worker carries nothing from it, stops
what it carries on reaching one, and sends it only the carried outcomes
(which it accepts with their lease secrets).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from koo.worker.v1 import worker_service_pb2 as wpb

if TYPE_CHECKING:
    from koo._session import _Session
    from koo._worker import _Run

log = logging.getLogger("koo.worker")

# The most tasks one hello may name (koo refuses the hello past it).
MAX_CLAIMS = 1024
# Ends of a stream with no word from koo: its connection failed (koo killed,
# or the network), so koo may not have taken the tasks back.
_NO_WORD = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# The trailer with which koo, stopping, says it kept a stream's leases.
LEASES_KEPT = "koo-leases-kept"


def carry_for(e: grpc.aio.AioRpcError, lease: float) -> float | None:
    """How long to carry a lost stream's tasks on, from how it ended (see
    `koo._carry`): a lease when koo said it kept the leases, a heartbeat
    interval when the connection failed with no word from koo, else not at
    all (koo ended the leases)."""
    if any(key == LEASES_KEPT for key, _ in e.trailing_metadata() or ()):
        return lease
    return lease / 3 if e.code() in _NO_WORD else None


class Carried:
    """The runs and unsent outcomes of a lost stream, until a stream adopts them."""

    def __init__(self) -> None:
        # tasks still running (or pushed and not started yet)
        self.runs: dict[str, _Run] = {}
        # outcomes of tasks that ended while no stream took them, or whose
        # reply never came
        self.outcomes: dict[str, wpb.WorkRequest] = {}
        # loop time after which the leases have lapsed
        self.until = 0.0

    def __len__(self) -> int:
        return len(self.runs) + len(self.outcomes)

    def keep(self, session: _Session, until: float) -> None:
        """Takes what the lost `session` held: its runs and its outcomes
        without a reply, until the loop time `until`."""
        for tid, run in session.held.items():
            self.runs[tid] = run
        for tid, (msg, _sends) in session.unacked.items():
            self.outcomes[tid] = msg
        session.held.clear()
        session.unacked.clear()
        if self:
            self.until = until
            session.loop.call_at(until, self.expire, session.loop)
            log.warning(
                "stream lost with %d tasks running or unreported: they run on, to be re-attached to the next koo reached in time",
                len(self),
            )

    def owns(self, run: _Run) -> bool:
        return self.runs.get(run.task_id) is run

    def ended(self, run: _Run, outcome: wpb.WorkRequest) -> None:
        """A carried run ended: its outcome waits for the next stream."""
        del self.runs[run.task_id]
        self.outcomes[run.task_id] = outcome

    def claims(self, started: Callable[[_Run], bool]) -> list[wpb.HeldTask]:
        """What the next hello names (at most `MAX_CLAIMS`: koo refuses more;
        a task without a lease secret cannot be claimed). `started` tells a
        run that began from one pushed and never started."""
        out = []
        for tid, msg in self.outcomes.items():
            o = msg.complete if msg.HasField("complete") else msg.fail
            out.append(wpb.HeldTask(task_id=tid, lease_token=o.lease_token, lease_secret=o.lease_secret))
        for tid, r in self.runs.items():
            a = r.assignment
            out.append(
                wpb.HeldTask(
                    task_id=tid, lease_token=a.lease_token, lease_secret=a.lease_secret, not_started=not started(r)
                )
            )
        return [c for c in out if c.lease_secret][:MAX_CLAIMS]

    def drop(self, reason: str) -> None:
        """Gives up everything carried: the handlers are told to stop."""
        if self:
            log.warning("dropping %d carried tasks: %s", len(self), reason)
        for run in self.runs.values():
            run.ctx._abandon(reason)
        self.runs.clear()
        self.outcomes.clear()

    def expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drops what was carried past its time (a timer at `until`, and
        before each hello): by then the leases lapsed, or a live koo gave the
        tasks to another worker."""
        if self and loop.time() >= self.until:
            self.drop("no koo reached in time: the leases lapsed, or koo gave the tasks to another worker")

    def take(self) -> tuple[dict[str, _Run], dict[str, wpb.WorkRequest]]:
        runs, outcomes = self.runs, self.outcomes
        self.runs, self.outcomes = {}, {}
        return runs, outcomes
