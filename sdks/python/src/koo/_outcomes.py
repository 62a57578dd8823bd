"""What a handler raises to end its attempt (`Retry`, `RateLimited`,
`Fatal`), what a worker refused for good raises (`WorkerRejected`), and how
an outcome's texts are bounded for koo (`cut`, a failure's traceback)."""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

MAX_FAIL_MESSAGE_BYTES = 4096
# A failure's traceback kept in its details (koo takes up to 64 KiB of them)
MAX_TRACEBACK_BYTES = 16 * 1024
MAX_RETRY_COUNTDOWN = 24 * 3600.0


class Retry(Exception):
    """Raise to fail this attempt retryably (koo retries while retries last).

    `countdown` (seconds, 0 to 24 h, like Celery's `self.retry(countdown=...)`)
    is how long koo waits before the next attempt, instead of the task's
    backoff: e.g. a rate limit's `Retry-After`. It is ignored when no retry
    remains (the task then ends FAILED). A countdown outside 0 to 24 h is a
    `ValueError` here, where the handler raises it, rather than a report koo
    refuses later.
    """

    def __init__(
        self, message: str = "retry", details: Mapping[str, Any] | None = None, *, countdown: float | None = None
    ) -> None:
        super().__init__(message)
        if countdown is not None and not 0 <= countdown <= MAX_RETRY_COUNTDOWN:
            raise ValueError(f"Retry countdown must be 0 to {MAX_RETRY_COUNTDOWN:g} seconds, got {countdown!r}")
        self.message = message
        self.details = dict(details) if details else None
        self.countdown = countdown


class RateLimited(Retry):
    """Raise when the provider said "too many requests" (an HTTP 429): every task
    with this task's `rate_limit_key`, in every queue and on every worker, waits
    `retry_after` (seconds or a timedelta, 0 to 24 h: the response's
    `Retry-After`) before it starts, and this attempt fails retryably, as
    `Retry` (its own `countdown`, if given; else the backoff, and its retry
    waits with the rest of the key).

    On a task submitted without a `rate_limit_key` there is no key to back
    off: the task alone waits `retry_after` (as `Retry(countdown=...)`), and a
    warning is logged.
    """

    def __init__(
        self,
        retry_after: float | timedelta,
        message: str = "rate limited",
        details: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
    ) -> None:
        seconds = retry_after.total_seconds() if isinstance(retry_after, timedelta) else float(retry_after)
        if not 0 <= seconds <= MAX_RETRY_COUNTDOWN:
            raise ValueError(
                f"RateLimited retry_after must be 0 to {MAX_RETRY_COUNTDOWN:g} seconds, got {retry_after!r}"
            )
        super().__init__(message, details, countdown=countdown)
        self.retry_after = seconds


class Fatal(Exception):
    """Raise to fail the task for good (no retry), with optional details."""

    def __init__(self, message: str = "failed", details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details) if details else None


class WorkerRejected(Exception):
    """koo refused the worker for good (bad key, scope or hello)."""


def _traceback_of(e: BaseException) -> str:
    """`e`'s traceback as Python prints it, kept with the task's error
    (`TaskInfo.traceback`, Celery's `AsyncResult.traceback`), at most
    `MAX_TRACEBACK_BYTES` as JSON (koo bounds the details as JSON, where a
    control character takes six bytes): a part longer than
    `MAX_FAIL_MESSAGE_BYTES` (a huge exception message) is cut, and past the
    bound the outermost frames are left out, since the innermost ones and
    the exception are at the end."""
    parts = []
    for part in traceback.format_exception(type(e), e, e.__traceback__):
        short = _cut(part, MAX_FAIL_MESSAGE_BYTES)
        cut = len(part.encode("utf-8", "backslashreplace")) - len(short.encode())
        parts.append(f"{short} [{cut} bytes cut]\n" if cut else short)
    sizes = [len(json.dumps(p, ensure_ascii=False).encode()) for p in parts]
    size = sum(sizes)
    first = 0
    while size > MAX_TRACEBACK_BYTES and first < len(parts) - 1:
        size -= sizes[first]
        first += 1
    kept = "".join(parts[first:])
    return kept if first == 0 else f"[{first} parts of the traceback's start left out]\n{kept}"


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` bytes of UTF-8, which it can always carry:
    a lone surrogate (an exception naming a file read as bytes) is escaped,
    not left to fail the report that carries it."""
    data = text.encode("utf-8", "backslashreplace")
    return data[:limit].decode("utf-8", errors="ignore")
