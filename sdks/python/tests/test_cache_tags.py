"""Tags, invalidate_tags and soft TTLs through the SDK, on both stores."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from koo import CacheLevel, KooCache, KooError


def test_tags_invalidate_and_report(cache_target: str, ns: str) -> None:
    """Tagged entries report their tags and miss once a tag is invalidated;
    untagged entries and other levels stay."""

    async def scenario() -> None:
        cache = KooCache(cache_target)
        await cache.set(f"{ns}:a", 1, tags=[f"{ns}:t", f"{ns}:u"])
        await cache.set(f"{ns}:b", 2)
        await cache.set(f"{ns}:c", 3, level=CacheLevel.DATABASE, tags=[f"{ns}:t"])
        await cache.set_many({f"{ns}:m1": "x", f"{ns}:m2": "y"}, tags=[f"{ns}:m"])
        hit = await cache.get_entry(f"{ns}:a")
        assert hit is not None and hit.tags == (f"{ns}:t", f"{ns}:u") and not hit.stale
        assert await cache.invalidate_tags([f"{ns}:t"], CacheLevel.APPLICATION) == 1
        assert await cache.get(f"{ns}:a") is None
        assert await cache.get(f"{ns}:b") == 2
        assert await cache.get(f"{ns}:c", CacheLevel.DATABASE) == 3
        assert await cache.invalidate_tags([f"{ns}:t", f"{ns}:m"]) == 3
        assert await cache.get(f"{ns}:c", CacheLevel.DATABASE) is None
        assert await cache.get_many([f"{ns}:m1", f"{ns}:m2"]) == {}
        with pytest.raises(KooError) as bad:
            await cache.set(f"{ns}:d", 4, tags=["x" * 257])
        assert "tags[0]" in str(bad.value)
        await cache.close()

    asyncio.run(scenario())


def test_soft_ttl_marks_stale_with_the_sync_client(cache_target: str, ns: str) -> None:
    """Past its soft TTL an entry is still served, marked stale."""
    cache = KooCache(cache_target).sync
    cache.set(f"{ns}:s", "v", ttl=30, soft_ttl=timedelta(milliseconds=200), tags=["s"])
    hit = cache.get_entry(f"{ns}:s")
    assert hit is not None and not hit.stale and hit.soft_ttl is not None
    assert timedelta(0) < hit.soft_ttl <= timedelta(milliseconds=200)
    time.sleep(hit.soft_ttl.total_seconds() + 0.02)
    hit = cache.get_entry(f"{ns}:s")
    assert hit is not None and hit.stale and hit.soft_ttl is None and hit.value == "v"
    assert cache.invalidate_tags(["s"]) >= 1
    assert cache.get(f"{ns}:s") is None
