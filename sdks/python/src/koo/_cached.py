"""`@cached`: memoise a function's result in koo's cache.

The key of a call is::

    {key_prefix}:{module}.{qualname}:{sha256(canonical arguments)}

where the canonical arguments are the JSON text of `[args, kwargs]` with
sorted keys, no spaces, and non-ASCII kept (`json.dumps(..., sort_keys=True,
separators=(",", ":"), ensure_ascii=False)`), UTF-8 encoded, hashed with
SHA-256 (hex). It is the same in every process and Python version. `args`
and `kwargs` are the call as the function sees it (`inspect.Signature.bind`
with the defaults applied): every parameter that can be passed by position
is in `args`, in order, whether the caller named it or left it to its
default (a default JSON cannot hold, such as a client object, is left
out), and `kwargs` holds the keyword-only ones (and `**kwargs`). So
`f(1)`, `f(x=1)` and, where `x` defaults to 1, `f()` share one entry.
Arguments must be JSON-able (a `TypeError` says which is not); pass
`key_builder` to build the argument part yourself (e.g. to leave out `self`
or a session).

One computation per key runs at a time across every process and koo
instance: a call reads with koo's `GetOrLock`; of the callers of a cold key,
the one that gets the lock token computes and stores the result with `Fill`,
and the others wait for it (in one process they also share one in-flight
call). A computation that raises gives the lock up (so that a waiter takes
over at once) and re-raises; one that never finishes (the process died)
loses the key after `lock_ttl`. With `soft_ttl`, an entry past it is served
stale to every caller (in this process too) while the one caller that gets
the token computes a fresh value (that caller waits for it). If koo cannot
be reached, or nobody filled within `lock_ttl`, the function runs uncached
(logged, not raised). A caller that is cancelled (a timeout around it)
cancels only itself: another caller of the key in this process takes over.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload

from koo._cache import CacheLevel, KooCache
from koo._connection import KooError
from koo._values import Seconds

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")
T = TypeVar("T")

log = logging.getLogger("koo.cached")

KeyBuilder = Callable[..., str]


class _Sentinel:
    """A marker value of its own type, never a function's result."""


# What an in-flight call's future holds when its leader was cancelled: its
# followers start over (one of them leads).
_RETRY = _Sentinel()
# No stale value came with the token.
_NO_STALE = _Sentinel()


def canonical_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The canonical JSON text of a call's arguments (see the module doc).
    An argument JSON cannot hold is a TypeError naming it."""
    try:
        return json.dumps([list(args), kwargs], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument {k!r}", v) for k, v in kwargs.items()]
        for name, value in named:
            try:
                json.dumps(value, ensure_ascii=False)
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"@cached: {name} ({type(value).__name__}) cannot make a cache key: {e}; "
                    "convert it (a str, a number...) or give the decorator a key_builder"
                ) from None
        raise


def signature_of(func: Callable[..., Any]) -> inspect.Signature | None:
    """`func`'s signature, or None for a callable Python cannot describe
    (some builtins): its calls are then keyed as they are written."""
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def call_arguments(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call as the function sees it (see the module doc): `f(x=1)` is
    `f(1)`, and a parameter left out has its default, unless JSON cannot
    hold that default (`db=default_session`: it is then left out of the key,
    as before). A call that does not fit the signature is keyed as written:
    the function raises its own `TypeError` when it runs."""
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    for name, param in signature.parameters.items():
        if name in bound.arguments or param.default is inspect.Parameter.empty:
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        try:
            json.dumps(param.default, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):
            # a default JSON cannot hold (a client, a session) is the same
            # object in every call that leaves it out: not part of the key
            continue
        bound.arguments[name] = param.default
    return bound.args, bound.kwargs


def cache_key(func: Callable[..., Any], key_prefix: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The cache key of `func(*args, **kwargs)` under `key_prefix`."""
    return _key(func, signature_of(func), key_prefix, args, kwargs)


def _key(
    func: Callable[..., Any],
    signature: inspect.Signature | None,
    key_prefix: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> str:
    args, kwargs = call_arguments(signature, args, kwargs)
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
        soft_ttl: Seconds | None = None,
        tags: Iterable[str] = (),
        lock_ttl: float = 30.0,
    ) -> None:
        self.__wrapped__ = func
        functools.update_wrapper(self, func)
        self.ttl = ttl
        self.soft_ttl = soft_ttl
        self.tags = tuple(tags)
        self.lock_ttl = lock_ttl
        self.level = level
        self.key_prefix = key_prefix
        self.cache_none = cache_none
        self._key_builder = key_builder
        self._cache = cache
        self._is_async = inspect.iscoroutinefunction(func)
        self._signature = signature_of(func)
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
        return _key(self.__wrapped__, self._signature, self.key_prefix, args, kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._is_async:
            return cast(R, self._call_async(args, kwargs))
        return self._call_sync(args, kwargs)

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _Cached[P, R]: ...

    @overload
    def __get__(self: _Cached[Concatenate[S, P2], R], obj: S, objtype: type | None = None) -> _Bound[P2, R]: ...

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        """On an instance, a method: `self` is passed on (and is part of the
        key). Typed: the bound method keeps the signature without `self`."""
        if obj is None:
            return self
        return _Bound(self, obj)

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Calls the function itself: no read, no write."""
        return cast(R, self.__wrapped__(*args, **kwargs))

    # ----- async functions -------------------------------------------------

    async def _read(self, key: str) -> tuple[bool, Any, str, Any]:
        """(found, value, token, stale): a fresh value, or the token to
        compute it (with the stale value, when the entry is past its soft
        TTL, else `_NO_STALE`).

        No token and no value (koo unreachable, or nobody filled within
        `lock_ttl`) means: compute uncached.
        """
        # long enough to wait out another caller's computation, but never
        # past the client's own deadline (a koo that hangs must not hold
        # every call lock_ttl long when the client asked for less)
        cache = self._cache()
        timeout = self.lock_ttl + 5
        configured = cache.call_timeout()
        if configured is not None:
            timeout = min(timeout, configured)
        # koo's wait for another caller's fill ends inside the deadline, so
        # that a slow computation is its clean "nobody filled", not a
        # DEADLINE_EXCEEDED
        wait = min(self.lock_ttl, timeout - min(5.0, timeout / 2))
        try:
            r = await cache.get_or_lock(key, self.level, lock_ttl=self.lock_ttl, wait=wait, timeout=timeout)
        except KooError as e:
            log.warning("cache read of %s failed, computing uncached: %s", key, e)
            return False, None, "", _NO_STALE
        if r.token:
            stale = r.value if r.found and (r.value is not None or self.cache_none) else _NO_STALE
            return False, None, r.token, stale
        if not r.found:
            log.warning("nobody filled %s within %s s, computing uncached", key, wait)
            return False, None, "", _NO_STALE
        if r.value is None and not self.cache_none:
            return False, None, "", _NO_STALE
        return True, r.value, "", _NO_STALE

    async def _write(self, key: str, token: str, value: Any) -> None:
        """Stores `value` under the lock of `token` (or gives the lock up for an uncached None)."""
        if not token:
            return
        try:
            if value is None and not self.cache_none:
                await self._cache().give_up(key, token, self.level)
            else:
                await self._cache().fill(
                    key, token, value, self.level, ttl=self.ttl, soft_ttl=self.soft_ttl, tags=self.tags
                )
        except (KooError, TypeError, ValueError) as e:
            log.warning("cache write of %s failed: %s", key, e)

    async def _give_up(self, key: str, token: str) -> None:
        """After a failed computation: a waiter takes over at once."""
        if not token:
            return
        try:
            await self._cache().give_up(key, token, self.level)
        except KooError as e:
            log.warning("giving up the lock of %s failed (it lapses after lock_ttl): %s", key, e)

    async def _call_async(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.cache_key(*args, **kwargs)
        loop = asyncio.get_running_loop()
        slot = (id(loop), key)
        # The first caller of a key in this process leads (reads, computes,
        # writes); the others wait for its future, so no read is even repeated.
        waiting = self._inflight.get(slot)
        if waiting is not None:
            value = await asyncio.shield(waiting)
            if value is _RETRY:
                return await self._call_async(args, kwargs)
            return value
        fut: asyncio.Future[Any] = loop.create_future()
        self._inflight[slot] = fut
        try:
            found, value, token, stale = await self._read(key)
            if not found:
                if stale is not _NO_STALE:
                    # the others (and those who come while this refreshes)
                    # are served the stale value now
                    fut.set_result(stale)
                func = cast(Callable[..., Awaitable[Any]], self.__wrapped__)
                try:
                    value = await func(*args, **kwargs)
                except BaseException:
                    await self._give_up(key, token)
                    raise
                await self._write(key, token, value)
            if not fut.done():
                fut.set_result(value)
            return value
        except asyncio.CancelledError:
            # this caller was cancelled, not the others: one of them leads
            if not fut.done():
                fut.set_result(_RETRY)
            raise
        except BaseException as e:
            if not fut.done():
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
        with self._locks_guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                found, value, token, stale = sync_run(self._read(key))
                if found:
                    return cast(R, value)
                if stale is _NO_STALE:
                    return self._compute_sync(key, token, args, kwargs)
            # A stale entry is refreshed outside the lock, so that this
            # process's other callers read it meanwhile (koo answers them
            # the stale value, the token being held here).
            return self._compute_sync(key, token, args, kwargs)
        finally:
            with self._locks_guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def _compute_sync(self, key: str, token: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        """Runs the function and stores its result under `token`."""
        try:
            value = self.__wrapped__(*args, **kwargs)
        except BaseException:
            sync_run(self._give_up(key, token))
            raise
        sync_run(self._write(key, token, value))
        return cast(R, value)

    # A type checker picks the first for a coroutine function, whose
    # invalidate must be awaited, and the second for any other.
    @overload
    def invalidate(  # type: ignore[overload-overlap]
        self: _Cached[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, bool]: ...

    @overload
    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool: ...

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        """Removes this call's cached result.

        For a sync function: returns True when there was one. For an async
        function: returns an awaitable of that.
        """
        if self._is_async:
            return self.invalidate_async(*args, **kwargs)
        return sync_run(self.invalidate_async(*args, **kwargs))


class _Bound(Generic[P2, R]):
    """A `@cached` method bound to its instance: the function's parameters
    after `self` (`P2`), its result `R`."""

    def __init__(self, cached: _Cached[Any, R], obj: object) -> None:
        self._cached = cached
        self._obj = obj
        functools.update_wrapper(self, cached.__wrapped__)

    def __call__(self, *args: P2.args, **kwargs: P2.kwargs) -> R:
        return self._cached(self._obj, *args, **kwargs)

    def cache_key(self, *args: P2.args, **kwargs: P2.kwargs) -> str:
        """See `_Cached.cache_key`."""
        return self._cached.cache_key(self._obj, *args, **kwargs)

    def bypass(self, *args: P2.args, **kwargs: P2.kwargs) -> R:
        """See `_Cached.bypass`."""
        return self._cached.bypass(self._obj, *args, **kwargs)

    @overload
    def invalidate(  # type: ignore[overload-overlap]
        self: _Bound[P2, Coroutine[Any, Any, T]], *args: P2.args, **kwargs: P2.kwargs
    ) -> Coroutine[Any, Any, bool]: ...

    @overload
    def invalidate(self, *args: P2.args, **kwargs: P2.kwargs) -> bool: ...

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
    soft_ttl: Seconds | None = ...,
    tags: Iterable[str] = ...,
    lock_ttl: float = ...,
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
    soft_ttl: Seconds | None = None,
    tags: Iterable[str] = (),
    lock_ttl: float = 30.0,
) -> _Cached[P, R] | Callable[[Callable[P, R]], _Cached[P, R]]:
    """Caches a function's results in koo (async and plain functions alike).

    `ttl` None means the level's default. `cache_none=False` (the default)
    leaves `None` results uncached. `cache` defaults to
    `koo.redis_cache.redis_cache`. `soft_ttl` (shorter than `ttl`) serves
    a stale value while one caller refreshes it; `tags` are the entries'
    tags (for `InvalidateTags`); `lock_ttl` (seconds) is how long one
    computation holds the key. The decorated function gains
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
            soft_ttl=soft_ttl,
            tags=tags,
            lock_ttl=lock_ttl,
        )

    if func is not None:
        return wrap(func)
    return wrap
