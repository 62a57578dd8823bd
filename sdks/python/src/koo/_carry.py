"""Tasks a worker carries from a lost stream to its next one.

When a worker's stream ends while tasks run (koo was restarted, killed, or
stopped for a deploy), the tasks run on: the worker names them in the
`held` of its next hello, to this koo or another, and koo adopts each one
whose lease is still current (its lease secret proves the claim). Outcomes
that could not be sent, or whose reply never came, are sent again on the
new stream once their tasks are adopted. koo revokes what it cannot adopt
(the lease lapsed, the task ended): those handlers are told to stop, as
for any revoke.

A koo whose welcome does not say `adopts_held` (a release before it) would
neither adopt nor keep the leases, so the worker carries nothing from it,
and drops what it carries on reaching one. Nor does it carry past a lease
after the stream was lost: by then the leases have lapsed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from koo.worker.v1 import worker_service_pb2 as wpb

if TYPE_CHECKING:
    from koo._session import _Session
    from koo._worker import _Run

log = logging.getLogger("koo.worker")


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

    def keep(self, session: _Session, now: float) -> None:
        """Takes what the lost `session` held: its runs and its outcomes
        without a reply, until a lease from `now`."""
        for tid, run in session.held.items():
            self.runs[tid] = run
        for tid, (msg, _sends) in session.unacked.items():
            self.outcomes[tid] = msg
        session.held.clear()
        session.unacked.clear()
        if self:
            self.until = now + session.lease
            log.warning(
                "stream lost with %d tasks running or unreported: they run on, and are re-attached to the next koo reached within %.0f s",
                len(self),
                session.lease,
            )

    def owns(self, run: _Run) -> bool:
        return self.runs.get(run.task_id) is run

    def ended(self, run: _Run, outcome: wpb.WorkRequest) -> None:
        """A carried run ended: its outcome waits for the next stream."""
        del self.runs[run.task_id]
        self.outcomes[run.task_id] = outcome

    def claims(self) -> list[wpb.HeldTask]:
        """What the next hello names."""
        out = [
            wpb.HeldTask(task_id=tid, lease_token=r.assignment.lease_token, lease_secret=r.assignment.lease_secret)
            for tid, r in self.runs.items()
        ]
        for tid, msg in self.outcomes.items():
            o = msg.complete if msg.HasField("complete") else msg.fail
            out.append(wpb.HeldTask(task_id=tid, lease_token=o.lease_token, lease_secret=o.lease_secret))
        return out

    def drop(self, reason: str) -> None:
        """Gives up everything carried: the handlers are told to stop."""
        if self:
            log.warning("dropping %d carried tasks: %s", len(self), reason)
        for run in self.runs.values():
            run.ctx._abandon(reason)
        self.runs.clear()
        self.outcomes.clear()

    def expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drops what was carried for longer than a lease."""
        if self and loop.time() > self.until:
            self.drop("koo was unreachable for longer than a lease: the leases lapsed")

    def take(self) -> tuple[dict[str, _Run], dict[str, wpb.WorkRequest]]:
        runs, outcomes = self.runs, self.outcomes
        self.runs, self.outcomes = {}, {}
        return runs, outcomes
