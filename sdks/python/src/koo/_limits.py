"""Flow control's limits as the SDK shows them: `RateLimitInfo`,
`ConcurrencyLimitInfo` and `ConcurrencyPolicy` (`TaskManager.set_rate_limit`
and the rest).

A limit's name is its scope: `queues/<queue>`, `tasks/<task name>`,
`keys/<key>` or `keys/*` (every key without a limit of its own); a
concurrency cap's is a key's only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from koo._enums import OpenEnum
from koo._values import from_timestamp
from koo.tasks.v1 import task_service_pb2 as pb


class ConcurrencyPolicy(OpenEnum):
    """What a task does when its concurrency key is at its cap."""

    WAIT = pb.CONCURRENCY_POLICY_WAIT
    """It stays QUEUED until one of the key's running tasks ends."""
    CANCEL_NEWEST = pb.CONCURRENCY_POLICY_CANCEL_NEWEST
    """It ends CANCELLED instead of starting."""
    CANCEL_OLDEST = pb.CONCURRENCY_POLICY_CANCEL_OLDEST
    """The key's oldest running task is asked to cancel; this one starts when it has ended."""


def _source(raw: int) -> str:
    return "config" if raw == pb.LIMIT_SOURCE_CONFIG else "api"


@dataclass(frozen=True)
class RateLimitInfo:
    """A global rate limit and its state (`TaskManager.get_rate_limit`)."""

    name: str
    limit: int
    """Starts per period."""
    period: timedelta
    burst: int
    """Starts at once after a quiet spell (1: evenly spaced)."""
    source: str
    """"config" (KOO_RATE_LIMITS, set again at every start) or "api"."""
    next_free_time: datetime | None
    """When its next task may start (now or earlier when a token is free)."""
    backoff_until: datetime | None
    """For a key: until when a worker's `RateLimited` back-off holds it (None: none)."""

    @classmethod
    def from_proto(cls, r: pb.RateLimit) -> RateLimitInfo:
        """Converts koo's `RateLimit` message."""
        return cls(
            name=r.name,
            limit=r.limit,
            period=r.period.ToTimedelta(),
            burst=r.burst,
            source=_source(r.source),
            next_free_time=from_timestamp(r.next_free_time),
            backoff_until=from_timestamp(r.backoff_until),
        )


@dataclass(frozen=True)
class ConcurrencyLimitInfo:
    """A cap on the running tasks of one concurrency key (`TaskManager.get_concurrency_limit`)."""

    name: str
    max_running: int
    policy: ConcurrencyPolicy
    source: str
    """"config" (KOO_CONCURRENCY_LIMITS) or "api"."""
    running: int
    """How many of the key's tasks run now (for `keys/*`: 0)."""

    @classmethod
    def from_proto(cls, c: pb.ConcurrencyLimit) -> ConcurrencyLimitInfo:
        """Converts koo's `ConcurrencyLimit` message."""
        return cls(
            name=c.name,
            max_running=c.max_running,
            policy=ConcurrencyPolicy(c.policy or pb.CONCURRENCY_POLICY_WAIT),
            source=_source(c.source),
            running=c.running,
        )
