"""The near cache (L1) against two real koo instances on one Redis."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from koo import CacheLevel, KooCache, NearCache

from .conftest import KooServer, RedisServer


@pytest.fixture(scope="module")
def two_koos() -> Iterator[tuple[KooServer, KooServer, RedisServer]]:
    """Two koo processes on one fresh redis-server."""
    redis = RedisServer()
    a = KooServer({"REDIS_URL": redis.url})
    b = KooServer({"REDIS_URL": redis.url})
    try:
        yield a, b, redis
    finally:
        a.stop()
        b.stop()
        redis.stop()


def test_l1_serves_hits_and_is_invalidated_by_another_instance(
    two_koos: tuple[KooServer, KooServer, RedisServer], ns: str
) -> None:
    """A hit is served from the L1; a Set through the other koo drops it;
    a RESET (koo lost its subscription) drops everything, and the L1 caches
    again after the next READY."""
    a, b, redis = two_koos

    async def scenario() -> None:
        other = KooCache(b.target)
        key = f"{ns}:k"
        await other.set(key, "v1", level=CacheLevel.DATABASE)
        async with NearCache(KooCache(a.target)) as near:
            await near.wait(lambda n: n.ready)
            assert await near.get(key, CacheLevel.DATABASE) == "v1"
            assert await near.get(key, CacheLevel.DATABASE) == "v1"
            assert (near.stats.hits, near.stats.misses) == (1, 1)
            assert (CacheLevel.DATABASE, key) in near

            await other.set(key, "v2", level=CacheLevel.DATABASE)
            await near.wait(lambda n: (CacheLevel.DATABASE, key) not in n)
            assert await near.get(key, CacheLevel.DATABASE) == "v2"
            assert await near.get(key, CacheLevel.DATABASE) == "v2"
            assert near.stats.hits == 2

            # koo's subscription is cut: every stream is told RESET.
            cli = await asyncio.create_subprocess_exec(
                "redis-cli", "-p", str(redis.port), "CLIENT", "KILL", "TYPE", "pubsub", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await cli.communicate()
            assert int(out.strip()) >= 1
            await near.wait(lambda n: n.stats.resets >= 1)
            assert len(near) == 0
            await near.wait(lambda n: n.ready)
            assert await near.get(key, CacheLevel.DATABASE) == "v2"
            assert await near.get(key, CacheLevel.DATABASE) == "v2"
            assert near.stats.hits == 3
        await other.close()

    asyncio.run(scenario())


async def settled_set(near: NearCache, key: str, value: object, ttl: float | None = None) -> None:
    """Sets through koo and waits until the L1 has heard of it (so that the
    message cannot drop what a later read keeps)."""
    heard = near.stats.invalidations
    await near.set(key, value, ttl)
    await near.wait(lambda n: n.stats.invalidations > heard)


def test_l1_never_keeps_an_entry_past_its_ttl(two_koos: tuple[KooServer, KooServer, RedisServer], ns: str) -> None:
    """An entry leaves the L1 when its TTL ends, even without a message."""
    a, _, _ = two_koos

    async def scenario() -> None:
        async with NearCache(KooCache(a.target), max_entries=2) as near:
            await near.wait(lambda n: n.ready)
            await settled_set(near, f"{ns}:short", "x", ttl=0.3)
            assert await near.get(f"{ns}:short") == "x"
            assert await near.get(f"{ns}:short") == "x"
            assert near.stats.hits == 1
            await asyncio.sleep(0.4)  # the TTL passing is what is tested
            assert await near.get(f"{ns}:short") is None
            # bounded: the least recently used entry leaves first
            for i in range(3):
                await settled_set(near, f"{ns}:{i}", i)
                await near.get(f"{ns}:{i}")
            assert len(near) == 2
            assert (CacheLevel.APPLICATION, f"{ns}:0") not in near

    asyncio.run(scenario())


def test_l1_writes_carry_tags_and_invalidate_tags_drops_them(
    two_koos: tuple[KooServer, KooServer, RedisServer], ns: str
) -> None:
    """`set`/`set_many` take `tags` and `soft_ttl` as `KooCache`'s do; the
    near cache's own `invalidate_tags` drops its tagged entries at once, and
    the entries miss in koo too."""
    a, _, _ = two_koos

    async def scenario() -> None:
        async with NearCache(KooCache(a.target)) as near:
            await near.wait(lambda n: n.ready)
            heard = near.stats.invalidations
            assert await near.set(f"{ns}:t1", "x", 60, tags=["t"], soft_ttl=30)
            assert await near.set_many({f"{ns}:t2": "y", f"{ns}:u": "z"}, 60, tags=["t", "u"])
            await near.set(f"{ns}:plain", "p", 60)
            # the three writes' messages heard (they cannot drop what is read next)
            await near.wait(lambda n: n.stats.invalidations >= heard + 3)
            for key in (f"{ns}:t1", f"{ns}:t2", f"{ns}:u", f"{ns}:plain"):
                await near.get(key)
                assert (CacheLevel.APPLICATION, key) in near
            hit = await near.cache.get_entry(f"{ns}:t1")
            assert hit is not None and set(hit.tags) == {"t"} and hit.soft_ttl is not None
            assert await near.invalidate_tags(["t"]) >= 1
            assert (CacheLevel.APPLICATION, f"{ns}:t1") not in near
            assert (CacheLevel.APPLICATION, f"{ns}:t2") not in near
            assert await near.get(f"{ns}:t1") is None
            assert await near.get(f"{ns}:u") is None
            assert await near.get(f"{ns}:plain") == "p"

    asyncio.run(scenario())


def test_a_stalled_stream_drops_the_l1(two_koos: tuple[KooServer, KooServer, RedisServer], ns: str) -> None:
    """koo stops answering without closing the connection (SIGSTOP: no
    reset, as a hung process or a broken network path): three heartbeats
    missed and the L1 drops everything, so a change made meanwhile through
    another koo is not served stale for ever; once koo runs again, the L1
    caches again and reads the change."""
    _, b, redis = two_koos
    c = KooServer({"REDIS_URL": redis.url})

    async def scenario() -> None:
        other = KooCache(b.target)
        key = f"{ns}:stall"
        await other.set(key, "old")
        async with NearCache(KooCache(c.target), heartbeat=0.2) as near:
            await near.wait(lambda n: n.ready)
            assert await near.get(key) == "old"
            assert await near.get(key) == "old"
            assert near.stats.hits == 1
            os.kill(c.proc.pid, signal.SIGSTOP)
            try:
                await other.set(key, "new")
                await near.wait(lambda n: n.stats.stalls >= 1)
                assert (CacheLevel.APPLICATION, key) not in near
                assert not near.ready
            finally:
                os.kill(c.proc.pid, signal.SIGCONT)
            await near.wait(lambda n: n.ready, timeout=30)
            assert await near.get(key) == "new"
        await other.close()

    try:
        asyncio.run(scenario())
    finally:
        c.stop()


def test_l1_reports_the_ttl_left_and_leaves_at_the_soft_ttl(
    two_koos: tuple[KooServer, KooServer, RedisServer], ns: str
) -> None:
    """A hit served from the L1 says the TTL and soft TTL it has left (not
    those it had when read); past its soft TTL it is no longer served from
    the L1, so the read reaches koo, which reports it stale (and elects one
    caller to refresh it)."""
    a, _, _ = two_koos

    async def scenario() -> None:
        key = f"{ns}:soft"
        async with NearCache(KooCache(a.target)) as near:
            await near.wait(lambda n: n.ready)
            heard = near.stats.invalidations
            await near.set(key, "x", 60, soft_ttl=0.3)
            await near.wait(lambda n: n.stats.invalidations > heard)
            first = await near.get_entry(key)
            second = await near.get_entry(key)
            assert near.stats.hits == 1
            assert first is not None and second is not None
            assert first.soft_ttl is not None and second.soft_ttl is not None
            assert second.ttl < first.ttl and second.soft_ttl < first.soft_ttl
            await asyncio.sleep(0.4)  # the soft TTL passing is what is tested
            third = await near.get_entry(key)
            assert third is not None and third.stale
            assert near.stats.hits == 1
            assert (CacheLevel.APPLICATION, key) not in near

    asyncio.run(scenario())
