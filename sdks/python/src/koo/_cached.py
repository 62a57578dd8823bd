"""`@cached`: memoise a function's result in koo's cache.

The key of a call is::

    {key_prefix}:{module}.{qualname}:{sha256(canonical arguments)}

where the canonical arguments are the JSON text of `[args, kwargs]` with
sorted keys, no spaces, and non-ASCII kept (`json.dumps(..., sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`), UTF-8 encoded, hashed with
SHA-256 (hex). It is the same in every process and Python version. Arguments
must be JSON-able (a `TypeError` says which is not); pass `key_builder` to
build the argument part yourself (e.g. to leave out `self` or a session).

Only one computation per key runs at a time *in one process*: concurrent
callers of a cold key wait for the first one's result. Across processes, koo
1.x offers plain `Get`/`Set` only (no set-if-absent, no lock), so every
process that misses a cold key at the same time computes it once; server-side
single-flight comes with koo's cache issue 19. If koo cannot be reached, the
function runs uncached (the error is logged, not raised).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from koo._cache import CacheLevel, KooCache
from koo._connection import KooError
from koo._values import Seconds

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("koo.cached")

KeyBuilder = Callable[..., str]


def canonical_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The canonical JSON text of a call's arguments (see the module doc)."""
    return json.dumps([list(args), kwargs], sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(func: Callable[..., Any], key_prefix: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The cache key of `func(*args, **kwargs)` under `key_prefix`."""
    digest = hashlib.sha256(canonical_arguments(args, kwargs).encode()).hexdigest()
    return f"{key_prefix}:{func.__module__}.{func.__qualname__}:{digest}"


class _Cached(Generic[P, R]):
    """What `@cached` returns: the function plus cache helpers."""

    def __init__(
        self,
        func: Callable[P, Any],
        *,
        ttl: Seconds | None,
        level: CacheLevel,
        key_prefix: str,
        cache_none: bool,
        key_builder: KeyBuilder | None,
        cache: Callable[[], KooCache],
    ) -> None:
        self.__wrapped__ = func
        functools.update_wrapper(self, func)
        self.ttl = ttl
        self.level = level
        self.key_prefix = key_prefix
        self.cache_none = cache_none
        self._key_builder = key_builder
        self._cache = cache
        self._is_async = inspect.iscoroutinefunction(func)
        # In-process single-flight: one in-flight computation per key. Async
        # callers share a future per (loop, key); sync callers a lock per key.
        self._inflight: dict[tuple[int, str], asyncio.Future[Any]] = {}
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # lock, its users
        self._locks_guard = threading.Lock()

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The key this call's result is cached under."""
        if self._key_builder is not None:
            digest = hashlib.sha256(self._key_builder(*args, **kwargs).encode()).hexdigest()
            return f"{self.key_prefix}:{self.__wrapped__.__module__}.{self.__wrapped__.__qualname__}:{digest}"
        return cache_key(self.__wrapped__, self.key_prefix, args, kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._is_async:
            return cast(R, self._call_async(args, kwargs))
        return self._call_sync(args, kwargs)

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        """On an instance, a method: `self` is passed on (and is part of the key)."""
        if obj is None:
            return self
        return _Bound(self, obj)

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Calls the function itself: no read, no write."""
        return cast(R, self.__wrapped__(*args, **kwargs))

    # ----- async functions -------------------------------------------------

    async def _read(self, key: str) -> tuple[bool, Any]:
        try:
            hit = await self._cache().get_entry(key, self.level)
        except KooError as e:
            log.warning("cache read of %s failed, computing uncached: %s", key, e)
            return False, None
        if hit is None or (hit.value is None and not self.cache_none):
            return False, None
        return True, hit.value

    async def _write(self, key: str, value: Any) -> None:
        if value is None and not self.cache_none:
            return
        try:
            await self._cache().set(key, value, ttl=self.ttl, level=self.level)
        except (KooError, TypeError, ValueError) as e:
            log.warning("cache write of %s failed: %s", key, e)

    async def _call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.cache_key(*args, **kwargs)
        loop = asyncio.get_running_loop()
        slot = (id(loop), key)
        # The first caller of a key in this process leads (reads, computes,
        # writes); the others wait for its future, so no read is even repeated.
        waiting = self._inflight.get(slot)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future[Any] = loop.create_future()
        self._inflight[slot] = fut
        try:
            found, value = await self._read(key)
            if not found:
                func = cast(Callable[..., Awaitable[Any]], self.__wrapped__)
                value = await func(*args, **kwargs)
                await self._write(key, value)
            fut.set_result(value)
            return value
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # a failure nobody waited for is not "never retrieved"
            raise
        finally:
            del self._inflight[slot]

    async def invalidate_async(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Removes this call's cached result; True when there was one."""
        return await self._cache().delete(self.cache_key(*args, **kwargs), self.level)

    # ----- sync functions --------------------------------------------------

    def _call_sync(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        key = self.cache_key(*args, **kwargs)
        found, value = sync_run(self._read(key))
        if found:
            return cast(R, value)
        with self._locks_guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                found, value = sync_run(self._read(key))
                if not found:
                    value = self.__wrapped__(*args, **kwargs)
                    sync_run(self._write(key, value))
                return cast(R, value)
        finally:
            with self._locks_guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Removes this call's cached result.

        For a sync function: returns True when there was one. For an async
        function: returns an awaitable of that.
        """
        if self._is_async:
            return self.invalidate_async(*args, **kwargs)
        return sync_run(self.invalidate_async(*args, **kwargs))


class _Bound:
    """A `@cached` method bound to its instance."""

    def __init__(self, cached: _Cached[Any, Any], obj: object) -> None:
        self._cached = cached
        self._obj = obj
        functools.update_wrapper(self, cached.__wrapped__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached(self._obj, *args, **kwargs)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        """See `_Cached.cache_key`."""
        return self._cached.cache_key(self._obj, *args, **kwargs)

    def bypass(self, *args: Any, **kwargs: Any) -> Any:
        """See `_Cached.bypass`."""
        return self._cached.bypass(self._obj, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        """See `_Cached.invalidate`."""
        return self._cached.invalidate(self._obj, *args, **kwargs)


def sync_run(coro: Any) -> Any:
    """Runs a coroutine on the sync facade's loop thread."""
    from koo._connection import shared_loop

    return shared_loop().run(coro)


@overload
def cached(func: Callable[P, R], /) -> _Cached[P, R]: ...


@overload
def cached(
    *,
    ttl: Seconds | None = ...,
    level: CacheLevel = ...,
    key_prefix: str = ...,
    cache_none: bool = ...,
    key_builder: KeyBuilder | None = ...,
    cache: KooCache | None = ...,
) -> Callable[[Callable[P, R]], _Cached[P, R]]: ...


def cached(
    func: Callable[P, R] | None = None,
    /,
    *,
    ttl: Seconds | None = None,
    level: CacheLevel = CacheLevel.APPLICATION,
    key_prefix: str = "cached",
    cache_none: bool = False,
    key_builder: KeyBuilder | None = None,
    cache: KooCache | None = None,
) -> _Cached[P, R] | Callable[[Callable[P, R]], _Cached[P, R]]:
    """Caches a function's results in koo (async and plain functions alike).

    `ttl` None means the level's default. `cache_none=False` (the default)
    leaves `None` results uncached. `cache` defaults to
    `koo.redis_cache.redis_cache`. The decorated function gains
    `cache_key(...)`, `bypass(...)` (call without the cache) and
    `invalidate(...)` (drop one call's entry; awaitable for async functions).
    """

    def default_cache() -> KooCache:
        if cache is not None:
            return cache
        from koo.redis_cache import redis_cache

        return redis_cache

    def wrap(f: Callable[P, R]) -> _Cached[P, R]:
        return _Cached(
            f,
            ttl=ttl,
            level=level,
            key_prefix=key_prefix,
            cache_none=cache_none,
            key_builder=key_builder,
            cache=default_cache,
        )

    if func is not None:
        return wrap(func)
    return wrap
