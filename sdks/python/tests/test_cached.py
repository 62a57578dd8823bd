"""`@cached` against a real koo: keys, single-flight, None, bypass, invalidate."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from koo import CacheLevel, KooCache, cache_key, cached
from koo.redis_cache import redis_cache


def test_the_key_is_the_documented_one(ns: str) -> None:
    """prefix:module.qualname:sha256 of the canonical JSON of [args, kwargs]."""

    @cached(key_prefix=ns)
    def lookup(query: str, limit: int = 10, *, tags: list[str] | None = None) -> str:
        return query

    canonical = '[["brain ü",5],{"tags":["a","b"]}]'
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    name = f"{__name__}.test_the_key_is_the_documented_one.<locals>.lookup"
    assert lookup.cache_key("brain ü", 5, tags=["a", "b"]) == f"{ns}:{name}:{digest}"
    # kwargs order does not matter; the key is the same in another interpreter.
    assert cache_key(lookup.__wrapped__, ns, ("x",), {"b": 1, "a": 2}) == cache_key(
        lookup.__wrapped__, ns, ("x",), {"a": 2, "b": 1}
    )
    code = (
        "import hashlib, json;"
        "print(hashlib.sha256(json.dumps([['brain ü',5],{'tags':['a','b']}],"
        "sort_keys=True,separators=(',',':'),ensure_ascii=False).encode()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == digest


def test_calls_that_mean_the_same_share_a_key(ns: str) -> None:
    """A parameter named or passed by position, or left to its default, is
    the same call: one key (the arguments as the function sees them)."""

    @cached(key_prefix=ns)
    def lookup(query: str, limit: int = 10, *args: int, tags: list[str] | None = None, **extra: str) -> str:
        return query

    key = lookup.cache_key("q", 10)
    assert lookup.cache_key(query="q", limit=10) == key
    assert lookup.cache_key("q", limit=10) == key
    assert lookup.cache_key("q") == key
    assert lookup.cache_key("q", tags=None) == key
    assert lookup.cache_key("q", 11) != key
    assert lookup.cache_key("q", 10, 1) != key  # *args count
    assert lookup.cache_key("q", tags=["a"]) != key
    assert lookup.cache_key("q", more="x") == lookup.cache_key(more="x", query="q")
    canonical = '[["q",10],{"tags":null}]'
    assert key.endswith(hashlib.sha256(canonical.encode()).hexdigest())
    # a default JSON cannot hold (a client) stays out of the key, as before

    @cached(key_prefix=ns)
    def fetch(query: str, db: object = object(), limit: int = 5) -> str:
        return query

    assert fetch.cache_key("q") == fetch.cache_key(query="q", limit=5)

    # one whose keys cannot be sorted, too (JSON holds it, the key's sorted form cannot)
    @cached(key_prefix=ns)
    def odd(query: str, opts: dict[Any, str] = {1: "a", "b": "c"}) -> str:  # noqa: B006
        return query

    assert odd.cache_key("q") == odd.cache_key(query="q")
    shape = '[["q"],{"limit":5}]'
    assert fetch.cache_key("q").endswith(hashlib.sha256(shape.encode()).hexdigest())
    # a call that does not fit is keyed as written (the function, when it
    # runs, raises its own TypeError)
    written = '[["q"],{"query":"q"}]'
    misfit = lookup.cache_key("q", query="q")  # type: ignore[misc]
    assert misfit.endswith(hashlib.sha256(written.encode()).hexdigest())


def test_twenty_concurrent_async_callers_compute_once(cache_target: str, ns: str) -> None:
    """20 callers of one cold key in one process: one computation, one value for all."""
    cache = KooCache(cache_target)
    calls = 0

    @cached(ttl=60, level=CacheLevel.DATABASE, key_prefix=ns, cache=cache)
    async def research(query: str) -> dict[str, object]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return {"query": query, "hits": [1, 2, 3]}

    async def scenario() -> None:
        results = await asyncio.gather(*(research("neurosurgery") for _ in range(20)))
        assert all(r == {"query": "neurosurgery", "hits": [1, 2, 3]} for r in results)
        assert calls == 1
        assert await research("neurosurgery") == results[0]
        assert calls == 1
        key = research.cache_key("neurosurgery")
        assert await cache.get(key, CacheLevel.DATABASE) == results[0]

    asyncio.run(scenario())


def test_a_function_slower_than_its_lock_ttl_is_still_cached(cache_target: str, ns: str) -> None:
    """A computation that outlasts `lock_ttl`, with nobody taking the key
    over meanwhile, stores its result (koo used to refuse the late Fill)."""
    cache = KooCache(cache_target)
    calls = 0

    @cached(ttl=60, key_prefix=ns, cache=cache, lock_ttl=0.1)
    def slow(x: int) -> int:
        nonlocal calls
        calls += 1
        time.sleep(0.3)  # the function's own work, longer than its lock
        return x * 2

    assert slow(21) == 42
    assert slow(21) == 42 and calls == 1, calls


def test_twenty_concurrent_threads_compute_once(cache_target: str, ns: str) -> None:
    """A plain function called from 20 threads at once is computed once."""
    calls = 0
    guard = threading.Lock()

    @cached(ttl=60, key_prefix=ns, cache=KooCache(cache_target))
    def report(n: int) -> list[int]:
        nonlocal calls
        with guard:
            calls += 1
        time.sleep(0.2)
        return list(range(n))

    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(report(3))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[0, 1, 2]] * 20
    assert calls == 1
    assert report._locks == {}


def test_two_processes_compute_at_most_once_each(target: str, ns: str) -> None:
    """Across processes koo 1.x has only Get/Set (no set-if-absent), so two
    processes that miss a cold key together may each compute it once, never more."""
    child = Path(__file__).with_name("cached_child.py")
    start_at = time.time() + 1.0
    procs = [
        subprocess.Popen([sys.executable, str(child), target, ns, str(start_at)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    counts = []
    for p in procs:
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0
        counts.append(int(out.strip()))
    assert all(c <= 1 for c in counts), counts
    assert 1 <= sum(counts) <= 2, counts


def test_none_is_cached_only_when_asked(target: str, ns: str) -> None:
    """cache_none=False recomputes a None result; cache_none=True keeps it."""
    cache = KooCache(target)
    calls = {"skip": 0, "keep": 0}

    @cached(key_prefix=ns, cache=cache)
    async def skip() -> str | None:
        calls["skip"] += 1
        return None

    @cached(key_prefix=ns, cache=cache, cache_none=True)
    async def keep() -> str | None:
        calls["keep"] += 1
        return None

    async def scenario() -> None:
        for _ in range(2):
            assert await skip() is None
            assert await keep() is None
        assert calls == {"skip": 2, "keep": 1}

    asyncio.run(scenario())


def test_bypass_and_invalidate(target: str, ns: str) -> None:
    """bypass calls the function without the cache; invalidate drops one call's entry."""
    cache = KooCache(target)
    calls = 0

    @cached(key_prefix=ns, cache=cache)
    async def value(x: int) -> int:
        nonlocal calls
        calls += 1
        return x + calls

    @cached(key_prefix=ns, cache=cache)
    def plain(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    async def scenario() -> None:
        assert await value(10) == 11
        assert await value(10) == 11
        assert await value.bypass(10) == 12
        assert await value(10) == 11
        assert await value.invalidate(10) is True
        assert await value(10) == 13

    asyncio.run(scenario())
    assert plain(1) == 1 and plain(1) == 1
    before = calls
    assert plain.invalidate(1) is True
    assert plain(1) == 1 and calls == before + 1
    if TYPE_CHECKING:  # what mypy --strict reads (an Any would fail here)
        from collections.abc import Coroutine

        from typing_extensions import assert_type

        assert_type(plain.invalidate(1), bool)
        _ = assert_type(value.invalidate(1), Coroutine[Any, Any, bool])


def test_failures_reach_every_waiter_and_are_not_cached(target: str, ns: str) -> None:
    """An exception goes to all concurrent callers; the next call computes again."""
    calls = 0

    @cached(key_prefix=ns, cache=KooCache(target))
    async def flaky() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        if calls == 1:
            raise RuntimeError("boom")
        return "ok"

    async def scenario() -> None:
        results = await asyncio.gather(*(flaky() for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await flaky() == "ok"
        assert calls == 2

    asyncio.run(scenario())


def test_unreachable_cache_computes_uncached(caplog: pytest.LogCaptureFixture) -> None:
    """With koo down the function still answers, and the failure is logged."""

    @cached(cache=KooCache("127.0.0.1:1"))
    async def f(x: int) -> int:
        return x * 2

    assert asyncio.run(f(4)) == 8
    assert "computing uncached" in caplog.text


def test_default_client_follows_configure(default_clients: str, ns: str) -> None:
    """@cached without cache= uses koo.redis_cache.redis_cache, wherever configure points it."""

    @cached(ttl=30, level=CacheLevel.API, key_prefix=ns)
    async def f() -> str:
        return "v"

    async def scenario() -> None:
        assert await f() == "v"
        assert await redis_cache.get(f.cache_key(), CacheLevel.API) == "v"

    asyncio.run(scenario())


def test_key_builder_for_methods(target: str, ns: str) -> None:
    """A method's `self` is not JSON-able: without key_builder the call says so; with one it caches."""
    cache = KooCache(target)

    class Repo:
        calls = 0

        @cached(key_prefix=ns, cache=cache)
        async def plain(self, q: str) -> str:
            return q

        @cached(key_prefix=ns, cache=cache, key_builder=lambda self, q: q)
        async def find(self, q: str) -> str:
            Repo.calls += 1
            return q.upper()

    async def scenario() -> None:
        with pytest.raises(TypeError, match=r"argument 0 \(Repo\) cannot make a cache key.*key_builder"):
            await Repo().plain("x")
        assert await Repo().find("x") == "X"
        assert await Repo().find("x") == "X"
        assert Repo.calls == 1
        digest = hashlib.sha256(b"x").hexdigest()
        assert Repo.find.cache_key(Repo(), "x").endswith(f".Repo.find:{digest}")
        assert Repo().find.cache_key("x") == Repo.find.cache_key(Repo(), "x")
        assert await Repo().find.bypass("y") == "Y" and Repo.calls == 2
        assert await Repo().find.invalidate("x") is True

    asyncio.run(scenario())
    if TYPE_CHECKING:  # a method keeps its signature, without `self` (it was Any)
        from collections.abc import Coroutine

        from typing_extensions import assert_type

        _ = assert_type(Repo().find("x"), Coroutine[Any, Any, str])
        _ = assert_type(Repo().find.invalidate("x"), Coroutine[Any, Any, bool])
        assert_type(Repo().find.cache_key("x"), str)
        _ = Repo().find(1)  # type: ignore[arg-type]


def test_a_cancelled_caller_cancels_only_itself(target: str, ns: str) -> None:
    """The first caller of a key times out: the others, never cancelled, are
    not cancelled with it; one of them computes (the lock was given up)."""
    calls = 0

    @cached(key_prefix=ns, cache=KooCache(target))
    async def slow() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)
        return calls

    async def scenario() -> None:
        leader = asyncio.ensure_future(asyncio.wait_for(slow(), timeout=0.1))
        await asyncio.sleep(0)  # the leader's call is in flight
        followers = [asyncio.ensure_future(slow()) for _ in range(3)]
        with pytest.raises(asyncio.TimeoutError):
            await leader
        results = await asyncio.gather(*followers)
        assert results == [2, 2, 2]
        assert calls == 2

    asyncio.run(scenario())


def test_a_stale_entry_is_served_in_this_process_while_one_refreshes(target: str, ns: str) -> None:
    """Past the soft TTL, the caller that gets the token refreshes (and waits
    for it); this process's other callers get the stale value, async or in
    threads, instead of waiting for the refresh."""
    calls = 0

    def next_value() -> int:
        nonlocal calls
        calls += 1
        return calls

    @cached(key_prefix=ns, ttl=60, soft_ttl=0.3, cache=KooCache(target))
    async def report() -> int:
        value = next_value()
        if value > 1:
            await asyncio.sleep(0.5)  # a refresh takes a while
        return value

    async def scenario() -> None:
        assert await report() == 1
        await asyncio.sleep(0.35)  # past the soft TTL
        results = await asyncio.gather(*(report() for _ in range(6)))
        assert results == [2, 1, 1, 1, 1, 1], results

    asyncio.run(scenario())

    @cached(key_prefix=f"{ns}:sync", ttl=60, soft_ttl=0.3, cache=KooCache(target))
    def sync_report() -> int:
        value = next_value()
        if value > 3:
            refreshing.set()
            time.sleep(0.5)
        return value

    refreshing = threading.Event()
    assert sync_report() == 3
    time.sleep(0.35)
    results: list[int] = []
    leader = threading.Thread(target=lambda: results.append(sync_report()))
    leader.start()
    assert refreshing.wait(10)
    others = [sync_report() for _ in range(3)]
    leader.join()
    assert others == [3, 3, 3] and results == [4], (others, results)
