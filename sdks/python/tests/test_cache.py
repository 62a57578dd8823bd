"""The cache client against a real koo, once on the embedded store and once on Redis."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from koo import CacheLevel, KooCache, KooError
from koo.cache.v1 import cache_service_pb2 as pb

ROUND_TRIPS: list[Any] = [
    "text, with ünïcode",
    "",
    b"\x00\xffraw bytes",
    {"user": "ada", "langs": ["en", "fr"], "age": 36, "score": 9.5, "admin": False, "note": None},
    [1, "two", 3.25, [4], {"five": 5}],
    42,
    -1.5,
    True,
    None,
]


@pytest.mark.parametrize("value", ROUND_TRIPS, ids=lambda v: type(v).__name__)
def test_values_round_trip_in_their_own_type(cache_target: str, ns: str, value: Any) -> None:
    """str comes back as str, bytes as bytes, JSON-able values as equal JSON values."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        assert await cache.set(f"{ns}:v", value)
        hit = await cache.get_entry(f"{ns}:v")
        assert hit is not None
        assert hit.value == value
        assert type(hit.value) is type(value)
        await cache.close()

    asyncio.run(scenario())


def test_kinds_on_the_wire(cache_target: str, ns: str) -> None:
    """The kind koo stores is the one the type calls for (text, raw, json)."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        await cache.set(f"{ns}:s", "x")
        await cache.set(f"{ns}:b", b"x")
        await cache.set(f"{ns}:j", {"x": 1})
        stub = cache._stub()
        kinds = []
        for k in ("s", "b", "j"):
            r = await stub.Get(pb.GetRequest(level=pb.CACHE_LEVEL_APP, key=f"{ns}:{k}"))
            kinds.append(r.value.WhichOneof("kind"))
        assert kinds == ["text", "raw", "json"]

    asyncio.run(scenario())


def test_get_set_delete_with_levels_and_ttl(cache_target: str, ns: str) -> None:
    """Levels are separate namespaces; ttl is applied; delete says whether the key existed."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        await cache.set(f"{ns}:k", "db", ttl=120, level=CacheLevel.DATABASE)
        await cache.set(f"{ns}:k", "session", ttl=timedelta(minutes=5), level=CacheLevel.SESSION)
        assert await cache.get(f"{ns}:k", CacheLevel.DATABASE) == "db"
        assert await cache.get(f"{ns}:k", CacheLevel.SESSION) == "session"
        assert await cache.get(f"{ns}:k") is None
        assert await cache.get(f"{ns}:k", default="fallback") == "fallback"
        hit = await cache.get_entry(f"{ns}:k", CacheLevel.DATABASE)
        assert hit is not None and timedelta(seconds=100) < hit.ttl <= timedelta(seconds=120)
        assert await cache.exists(f"{ns}:k", CacheLevel.SESSION)
        assert await cache.delete(f"{ns}:k", CacheLevel.DATABASE) is True
        assert await cache.delete(f"{ns}:k", CacheLevel.DATABASE) is False
        assert await cache.get(f"{ns}:k", CacheLevel.DATABASE) is None
        assert await cache.get(f"{ns}:k", CacheLevel.SESSION) == "session"

    asyncio.run(scenario())


def test_short_ttl_expires(cache_target: str, ns: str) -> None:
    """An entry set with a 50 ms TTL is gone once that has passed."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        await cache.set(f"{ns}:short", "x", ttl=0.05)
        for _ in range(100):
            if await cache.get(f"{ns}:short") is None:
                return
            await asyncio.sleep(0.02)
        pytest.fail("the entry outlived its TTL")

    asyncio.run(scenario())


def test_batch_calls(cache_target: str, ns: str) -> None:
    """set_many writes all, get_many returns the found ones, delete_many counts."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        items = {f"{ns}:a": "A", f"{ns}:b": b"B", f"{ns}:c": {"c": [1]}}
        assert await cache.set_many(items, ttl=60, level=CacheLevel.API) == 3
        got = await cache.get_many([*items, f"{ns}:missing"], CacheLevel.API)
        assert got == items
        assert await cache.delete_many([f"{ns}:a", f"{ns}:b", f"{ns}:missing"], CacheLevel.API) == 2
        assert await cache.get_many(items, CacheLevel.API) == {f"{ns}:c": {"c": [1]}}

    asyncio.run(scenario())


def test_list_keys_and_clear_level(cache_target: str, ns: str) -> None:
    """list_keys pages through a pattern; clear_level empties one level only."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        keys = {f"{ns}:user:{i}": i for i in range(25)}
        await cache.set_many(keys, level=CacheLevel.SESSION)
        await cache.set(f"{ns}:other", 1, level=CacheLevel.SESSION)
        await cache.set(f"{ns}:keep", 1, level=CacheLevel.APPLICATION)
        assert await cache.list_keys(f"{ns}:user:*", CacheLevel.SESSION) == sorted(keys)
        paged = [k async for k in cache.iter_keys(f"{ns}:user:*", CacheLevel.SESSION, page_size=7)]
        assert sorted(set(paged)) == sorted(keys)
        assert await cache.clear_level(CacheLevel.SESSION) >= 26
        assert await cache.list_keys(f"{ns}:*", CacheLevel.SESSION) == []
        assert await cache.get(f"{ns}:keep") == 1

    asyncio.run(scenario())


def test_metrics_and_health(cache_target: str, ns: str, request: pytest.FixtureRequest) -> None:
    """Metrics count this test's hits and misses; health names the backend."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        before = (await cache.get_metrics()).total
        await cache.set(f"{ns}:m", 1)
        await cache.get(f"{ns}:m")
        await cache.get(f"{ns}:nothing")
        after = (await cache.get_metrics()).total
        assert after.hits >= before.hits + 1
        assert after.misses >= before.misses + 1
        assert after.sets >= before.sets + 1
        health = await cache.health_check()
        assert health.healthy
        redis = "redis" in request.node.callspec.id
        assert health.backend == (pb.BACKEND_KIND_REDIS if redis else pb.BACKEND_KIND_MEMORY)

    asyncio.run(scenario())


def test_api_response_helpers(cache_target: str, ns: str) -> None:
    """cache_api_response writes at the API level with a 300 s TTL."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        await cache.cache_api_response(f"{ns}:search", {"results": [1, 2]})
        assert await cache.get_cached_api_response(f"{ns}:search") == {"results": [1, 2]}
        hit = await cache.get_entry(f"{ns}:search", CacheLevel.API)
        assert hit is not None and hit.ttl <= timedelta(seconds=300)
        assert await cache.get(f"{ns}:search") is None

    asyncio.run(scenario())


def test_sync_facade(cache_target: str, ns: str) -> None:
    """Every blocking twin works without an event loop of the caller's."""
    cache = KooCache(cache_target).sync
    assert cache.set(f"{ns}:s", {"a": 1}, 60, CacheLevel.DATABASE)
    assert cache.get(f"{ns}:s", CacheLevel.DATABASE) == {"a": 1}
    entry = cache.get_entry(f"{ns}:s", CacheLevel.DATABASE)
    assert entry is not None and entry.value == {"a": 1}
    assert cache.exists(f"{ns}:s", CacheLevel.DATABASE)
    assert cache.set_many({f"{ns}:x": "x", f"{ns}:y": b"y"}) == 2
    assert cache.get_many([f"{ns}:x", f"{ns}:y"]) == {f"{ns}:x": "x", f"{ns}:y": b"y"}
    assert cache.list_keys(f"{ns}:*") == [f"{ns}:x", f"{ns}:y"]
    assert cache.delete_many([f"{ns}:x", f"{ns}:y"]) == 2
    assert cache.delete(f"{ns}:s", CacheLevel.DATABASE)
    assert cache.cache_api_response(f"{ns}:api", [1])
    assert cache.get_cached_api_response(f"{ns}:api") == [1]
    assert cache.get_metrics().total.sets > 0
    assert cache.health_check().healthy
    assert cache.clear_level(CacheLevel.API) >= 1
    assert cache.warm({f"{ns}:w": 1}, wait=True).report.loaded >= 1
    assert cache.cleanup().task_id
    assert cache.start_maintenance().task_id


def test_errors_carry_the_status(cache_target: str) -> None:
    """koo's refusal (an empty key) is a KooError with INVALID_ARGUMENT; bad values fail before the call."""
    cache = KooCache(cache_target).sync
    with pytest.raises(KooError) as err:
        cache.set("", "x")
    assert err.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(TypeError):
        cache.set("k", object())
    with pytest.raises(ValueError):
        cache.set("k", float("nan"))


def test_unreachable_koo_is_unavailable() -> None:
    """A client pointed at a closed port fails with UNAVAILABLE, not a hang."""
    cache = KooCache("127.0.0.1:1").sync
    with pytest.raises(KooError) as err:
        cache.get("k")
    assert err.value.code.name == "UNAVAILABLE"


def test_maintenance_warm_cleanup_and_watch_metrics(cache_target: str, ns: str) -> None:
    """The maintenance tasks report back with wait; warm loads its entries; metrics stream."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        warm = await cache.warm({f"{ns}:w1": "one", f"{ns}:w2": [2]}, CacheLevel.DATABASE, ttl=60, wait=True)
        assert warm.task_id and warm.report.loaded >= 2
        assert await cache.get_many([f"{ns}:w1", f"{ns}:w2"], CacheLevel.DATABASE) == {
            f"{ns}:w1": "one",
            f"{ns}:w2": [2],
        }
        cleanup = await cache.cleanup(wait=True)
        assert cleanup.task_id and cleanup.HasField("report")
        maintenance = await cache.start_maintenance(wait=True)
        assert maintenance.task_id and maintenance.report.used_memory_bytes > 0
        snapshots = []
        async for m in cache.watch_metrics(interval=0.1):
            snapshots.append(m)
            if len(snapshots) == 2:
                break
        assert all(s.HasField("sample_time") for s in snapshots)

    asyncio.run(scenario())


def test_one_str_where_a_list_is_meant_is_refused(cache_target: str, ns: str) -> None:
    """A str is itself a list of strings to Python (and mypy): `tags="user:42"`
    would tag the entry `u`, `s`, `e`... and `args="abc"` pass three
    arguments. Both are refused, naming the parameter and the fix."""
    from koo import NearCache, TaskCategory, TaskManager, Worker

    async def scenario() -> None:
        c = KooCache(cache_target)
        with pytest.raises(TypeError, match=r"tags: a list of strings, not one str \(pass \['user:42'\]\)"):
            await c.set(f"{ns}:k", "v", 60, tags="user:42")
        with pytest.raises(TypeError, match="keys"):
            await c.get_many(f"{ns}:k")
        with pytest.raises(TypeError, match="keys"):
            await c.delete_many(f"{ns}:k")
        with pytest.raises(TypeError, match="tags"):
            await c.invalidate_tags("user:42")
        with pytest.raises(TypeError, match="tags"):
            await c.set_many({f"{ns}:k": "v"}, 60, tags="user:42")
        near = NearCache(c)
        with pytest.raises(TypeError, match="keys"):
            await near.delete_many(f"{ns}:k")
        with pytest.raises(TypeError, match="tags"):
            await near.invalidate_tags("user:42")
        tm = TaskManager(cache_target)
        for args in ("abc", b"abc", {"a": 1}):
            with pytest.raises(TypeError, match="args"):
                await tm.submit_task("koo.diagnostics.echo", TaskCategory.RESEARCH, args=args)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="depends_on"):
            await tm.submit_task("koo.diagnostics.echo", TaskCategory.RESEARCH, depends_on="research~01")
        with pytest.raises(TypeError, match="queues"):
            Worker(cache_target, queues="research")
        assert await c.get(f"{ns}:k") is None, "nothing was written"

    asyncio.run(scenario())
