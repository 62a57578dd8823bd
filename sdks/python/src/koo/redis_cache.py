"""The seed's `core.redis_cache`, served by koo.

Change `from core.redis_cache import ...` to `from koo.redis_cache import ...`
and the seed's calls run as written::

    await redis_cache.set("user_preferences", user_data, ttl=3600, level=CacheLevel.APPLICATION)
    user_data = await redis_cache.get("user_preferences", CacheLevel.APPLICATION)

`redis_cache` connects lazily to `koo.configure(...)`'s target, else
`KOO_TARGET`, else `127.0.0.1:50051`.
"""

from __future__ import annotations

from typing import Any

from koo._cache import CacheHit, CacheLevel, KooCache, SyncKooCache
from koo._cached import cache_key, cached
from koo._values import Seconds

__all__ = [
    "CacheHit",
    "CacheLevel",
    "KooCache",
    "SyncKooCache",
    "cache_api_response",
    "cache_key",
    "cached",
    "get_cached_api_response",
    "redis_cache",
]

redis_cache = KooCache()
"""The default cache client (lazy; see the module doc)."""


async def cache_api_response(key: str, data: Any, ttl: Seconds | None = 300) -> bool:
    """Caches an API response at the API level (default TTL 300 s)."""
    return await redis_cache.cache_api_response(key, data, ttl)


async def get_cached_api_response(key: str) -> Any:
    """A cached API response, or None."""
    return await redis_cache.get_cached_api_response(key)
