"""Flow control from Python, against a real koo: rate limits and concurrency
caps set, read, listed and deleted through `TaskManager`; tasks submitted
with keys; and a handler's `RateLimited` backing off its task's key for
every task with the key, as koo reports it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from koo import (
    ConcurrencyPolicy,
    KooError,
    RateLimited,
    TaskCategory,
    TaskContext,
    TaskManager,
    TaskState,
    Worker,
)
from tests.test_worker import running


def test_limits_round_trip(target: str, ns: str) -> None:
    """Set, get, list and delete a rate limit and a cap; the replies carry what was set and
    where it came from; an unknown name is an error naming it."""

    async def scenario() -> None:
        tm = TaskManager(target)
        key = f"keys/{ns}"
        rl = await tm.set_rate_limit(key, 50, per=timedelta(seconds=1), burst=5)
        assert (rl.name, rl.limit, rl.period, rl.burst, rl.source) == (key, 50, timedelta(seconds=1), 5, "api")
        assert (await tm.get_rate_limit(key)).limit == 50
        assert key in [r.name for r in await tm.list_rate_limits()]
        cap = await tm.set_concurrency_limit(key, 2, ConcurrencyPolicy.CANCEL_OLDEST)
        assert (cap.max_running, cap.policy, cap.running) == (2, ConcurrencyPolicy.CANCEL_OLDEST, 0)
        assert key in [c.name for c in await tm.list_concurrency_limits()]
        await tm.delete_rate_limit(key)
        await tm.delete_concurrency_limit(key)
        with pytest.raises(KooError, match=key):
            await tm.get_rate_limit(key)
        with pytest.raises(KooError, match="rate_limit.name"):
            await tm.set_rate_limit("openai", 1, per=1)

    asyncio.run(scenario())


def test_rate_limited_backs_off_the_key(target: str, ns: str) -> None:
    """A handler that raises `RateLimited(retry_after=...)` on a task with a rate-limit key backs
    the key off in koo (shown by `get_rate_limit`), and the task is retried after it; the task's
    keys read back from `get_task_status`."""
    w = Worker(target)
    attempts: list[int] = []

    @w.task(f"sdk.{ns}.call")
    async def call(*, ctx: TaskContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            # the key waits 0.5 s; this task's own retry too (not its backoff)
            raise RateLimited(0.5, "429 Too Many Requests", countdown=0.5)
        return "done"

    async def scenario() -> None:
        tm = TaskManager(target)
        key = f"{ns}-provider"
        await tm.set_rate_limit(f"keys/{key}", 100, per=1)
        t = await tm.submit_task(
            f"sdk.{ns}.call", TaskCategory.RESEARCH, max_retries=3, rate_limit_key=key, concurrency_key=ns
        )
        info = await tm.get_task_status(t)
        assert (info.rate_limit_key, info.concurrency_key) == (key, ns)
        async for info in tm.watch(t):
            if info.state is TaskState.SCHEDULED:
                break
        limit = await tm.get_rate_limit(f"keys/{key}")
        assert limit.backoff_until is not None
        assert limit.backoff_until > datetime.now(timezone.utc) - timedelta(seconds=1)
        assert await tm.result(t, timeout=15) == "done"
        assert attempts == [1, 2]

    with running(w):
        asyncio.run(scenario())
