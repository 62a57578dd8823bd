"""GetOrLock / Fill and `@cached` on them, against a real koo (both stores)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from koo import CacheLevel, KooCache, KooError, cached


def test_one_of_ten_concurrent_callers_gets_the_token(cache_target: str, ns: str) -> None:
    """Ten cold callers: exactly one token; after its fill the others get the value."""
    cache = KooCache(cache_target)
    key = f"{ns}:cold"

    async def scenario() -> None:
        async def caller() -> object:
            r = await cache.get_or_lock(key, lock_ttl=10, wait=10)
            if r.token:
                await asyncio.sleep(0.2)  # the computation
                await cache.fill(key, r.token, {"v": 1}, ttl=60)
                return "computed"
            assert r.found, r
            return r.value

        results = await asyncio.gather(*(caller() for _ in range(10)))
        assert results.count("computed") == 1
        assert [r for r in results if r != "computed"] == [{"v": 1}] * 9
        # the token is spent: a second fill is refused
        again = await cache.get_or_lock(key)
        assert again.found and not again.token
        with pytest.raises(KooError) as e:
            await cache.fill(key, "0" * 32, 2)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(scenario())


def make(ns: str, cache: KooCache, calls: list[int], fail_first: bool = False) -> Callable[[str], str]:
    """A `@cached` function; two made here share their cache keys (same qualname)."""

    @cached(ttl=60, level=CacheLevel.DATABASE, key_prefix=ns, cache=cache, lock_ttl=20)
    def lookup(q: str) -> str:
        calls.append(1)
        if fail_first and len(calls) == 1:
            raise RuntimeError("database down")
        time.sleep(0.3)
        return q.upper()

    return lookup


def test_cached_computes_once_across_two_decorated_copies(cache_target: str, ns: str) -> None:
    """Two independent `@cached` copies (no shared in-process state), called at
    once from two threads: one computation, the same value for both."""
    calls: list[int] = []
    first = make(ns, KooCache(cache_target).sync.aio, calls)
    second = make(ns, KooCache(cache_target).sync.aio, calls)
    out: list[str] = []
    threads = [threading.Thread(target=lambda f=f: out.append(f("brain"))) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == ["BRAIN", "BRAIN"]
    assert len(calls) == 1


def test_a_failed_computation_gives_the_key_up_and_reraises(cache_target: str, ns: str) -> None:
    """The first computation raises: the error reaches its caller and the
    lock is given up, so the next call computes at once (not after lock_ttl)."""
    calls: list[int] = []
    lookup = make(ns, KooCache(cache_target), calls, fail_first=True)
    with pytest.raises(RuntimeError, match="database down"):
        lookup("x")
    started = time.monotonic()
    assert lookup("x") == "X"
    assert time.monotonic() - started < 5
    assert len(calls) == 2


def test_get_or_compute_names_a_missing_task(cache_target: str, ns: str) -> None:
    """A bad GetOrCompute is INVALID_ARGUMENT naming the field."""
    cache = KooCache(cache_target).sync
    with pytest.raises(KooError) as e:
        cache.get_or_compute(f"{ns}:k", "")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "task.name" in e.value.message
