"""The cache client: `KooCache` (asyncio) and `SyncKooCache` (its facade)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

from koo._compute import Computed, Locked, compute_request, computed, fill_request, lock_request, locked
from koo._connection import Client, reopening, rpc, shared_loop
from koo._values import Seconds, from_cache_value, from_duration, strings, to_cache_value, to_duration
from koo.cache.v1 import cache_service_pb2 as pb
from koo.cache.v1 import cache_service_pb2_grpc as pb_grpc

# The deadline of the calls koo bounds by KOO_BULK_TIMEOUT, its default
# (seconds).
BULK_TIMEOUT = 300.0


class CacheLevel(str, Enum):
    """The seed's four cache levels; each is a separate namespace in koo."""

    APPLICATION = "app"
    DATABASE = "db"
    API = "api"
    SESSION = "session"

    @property
    def proto(self) -> pb.CacheLevel.ValueType:
        """The level as koo's protobuf enum."""
        return _LEVELS[self]


_LEVELS: dict[CacheLevel, pb.CacheLevel.ValueType] = {
    CacheLevel.APPLICATION: pb.CACHE_LEVEL_APP,
    CacheLevel.DATABASE: pb.CACHE_LEVEL_DB,
    CacheLevel.API: pb.CACHE_LEVEL_API,
    CacheLevel.SESSION: pb.CACHE_LEVEL_SESSION,
}
# CacheLevel of koo's enum value (the reverse of `CacheLevel.proto`).
LEVEL_OF_PROTO: dict[int, CacheLevel] = {proto: level for level, proto in _LEVELS.items()}


@dataclass(frozen=True)
class CacheHit:
    """A found entry: its value, the time it has left, its sizes, its tags,
    and whether it is past its soft TTL (`stale`: still served, due for a
    refresh; `soft_ttl`: the time left before that, when it has one)."""

    value: Any
    ttl: timedelta
    size_bytes: int
    stored_size_bytes: int
    compressed: bool
    tags: tuple[str, ...] = ()
    stale: bool = False
    soft_ttl: timedelta | None = None


def _hit(r: pb.GetResponse) -> CacheHit | None:
    if not r.found:
        return None
    return CacheHit(
        value=from_cache_value(r.value),
        ttl=from_duration(r.ttl),
        size_bytes=r.size_bytes,
        stored_size_bytes=r.stored_size_bytes,
        compressed=r.compressed,
        tags=tuple(r.tags),
        stale=r.stale,
        soft_ttl=from_duration(r.soft_ttl) if r.HasField("soft_ttl") else None,
    )


def _extras(e: pb.SetRequest | pb.CacheEntry, tags: Iterable[str] | None, soft_ttl: Seconds | None) -> None:
    """Puts tags and a soft TTL on a write."""
    if tags is not None:
        e.tags.extend(strings("tags", tags))
    if soft_ttl is not None:
        e.soft_ttl.CopyFrom(to_duration(soft_ttl))


class KooCache(Client):
    """koo's cache, asyncio-first, with the seed's method names.

    `KooCache()` (no target) follows `koo.configure(...)` / `KOO_TARGET`.
    Values keep their type: see `koo._values`. A `ttl` is seconds or a
    `timedelta`; None means the level's default (koo's `CACHE_DEFAULT_TTL`,
    `CACHE_API_DEFAULT_TTL` for the API level). Failed calls raise `KooError`.
    """

    _sync: SyncKooCache | None = None

    def _stub(self) -> pb_grpc.CacheServiceAsyncStub:
        return pb_grpc.CacheServiceStub(self._conn.channel())

    @property
    def sync(self) -> SyncKooCache:
        """The same client with blocking methods (for code without a loop)."""
        if self._sync is None:
            self._sync = SyncKooCache(self)
        return self._sync

    def call_timeout(self) -> float | None:
        """The deadline (seconds) a call of this client gets when it sets
        none (see `Settings.timeout`); None: no deadline."""
        return self._conn.call_timeout()

    async def get(self, key: str, level: CacheLevel = CacheLevel.APPLICATION, default: Any = None) -> Any:
        """The value under `key`, or `default` on a miss."""
        hit = await self.get_entry(key, level)
        return default if hit is None else hit.value

    async def get_entry(self, key: str, level: CacheLevel = CacheLevel.APPLICATION) -> CacheHit | None:
        """The entry under `key` with its TTL and sizes, or None on a miss.

        Tells a stored `None` (JSON null) from a miss.
        """
        r = await rpc(self._stub().Get(pb.GetRequest(level=level.proto, key=key), metadata=self._conn.metadata()))
        return _hit(r)

    async def set(
        self,
        key: str,
        value: Any,
        ttl: Seconds | None = None,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        tags: Iterable[str] | None = None,
        soft_ttl: Seconds | None = None,
    ) -> bool:
        """Writes `value` under `key`; True once stored (errors raise).

        `tags` (at most 32) let `invalidate_tags` drop the entry; after
        `soft_ttl` (shorter than `ttl`) reads mark it `stale`.
        """
        req = pb.SetRequest(level=level.proto, key=key, value=to_cache_value(value))
        if ttl is not None:
            req.ttl.CopyFrom(to_duration(ttl))
        _extras(req, tags, soft_ttl)
        await rpc(self._stub().Set(req, metadata=self._conn.metadata()))
        return True

    async def delete(self, key: str, level: CacheLevel = CacheLevel.APPLICATION) -> bool:
        """Removes `key`; True when it existed."""
        r = await rpc(self._stub().Delete(pb.DeleteRequest(level=level.proto, key=key), metadata=self._conn.metadata()))
        return r.deleted

    async def exists(self, key: str, level: CacheLevel = CacheLevel.APPLICATION) -> bool:
        """Whether `key` holds a value now."""
        return await self.get_entry(key, level) is not None

    async def get_many(self, keys: Iterable[str], level: CacheLevel = CacheLevel.APPLICATION) -> dict[str, Any]:
        """The found keys and their values (up to 1000 keys per call)."""
        req = pb.GetManyRequest(level=level.proto, keys=strings("keys", keys))
        r = await rpc(self._stub().GetMany(req, metadata=self._conn.metadata()))
        return {x.key: from_cache_value(x.entry.value) for x in r.results if x.entry.found}

    async def set_many(
        self,
        items: Mapping[str, Any],
        ttl: Seconds | None = None,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        tags: Iterable[str] | None = None,
        soft_ttl: Seconds | None = None,
    ) -> int:
        """Writes every entry, all or nothing; returns how many. `tags` and
        `soft_ttl` apply to every entry."""
        tag_list = None if tags is None else strings("tags", tags)
        entries = []
        for key, value in items.items():
            e = pb.CacheEntry(level=level.proto, key=key, value=to_cache_value(value))
            if ttl is not None:
                e.ttl.CopyFrom(to_duration(ttl))
            _extras(e, tag_list, soft_ttl)
            entries.append(e)
        r = await rpc(self._stub().SetMany(pb.SetManyRequest(entries=entries), metadata=self._conn.metadata()))
        return len(r.results)

    async def delete_many(self, keys: Iterable[str], level: CacheLevel = CacheLevel.APPLICATION) -> int:
        """Removes the keys; returns how many existed."""
        req = pb.DeleteManyRequest(level=level.proto, keys=strings("keys", keys))
        r = await rpc(self._stub().DeleteMany(req, metadata=self._conn.metadata()))
        return r.deleted_count

    async def invalidate_tags(self, tags: Iterable[str], level: CacheLevel | None = None) -> int:
        """Makes every entry carrying any of `tags` miss from now on, on every
        koo instance, in `level` or (None) every level; returns how many
        (level, tag) pairs had entries."""
        req = pb.InvalidateTagsRequest(
            level=pb.CACHE_LEVEL_UNSPECIFIED if level is None else level.proto, tags=strings("tags", tags)
        )
        r = await rpc(self._stub().InvalidateTags(req, metadata=self._conn.metadata()))
        return r.known_count

    async def iter_keys(
        self, pattern: str = "*", level: CacheLevel = CacheLevel.APPLICATION, page_size: int = 1000
    ) -> AsyncIterator[str]:
        """Every key of `level` matching the glob `pattern`, page by page.

        SCAN semantics: a key present throughout is listed at least once.
        """
        token = ""
        while True:
            req = pb.ListKeysRequest(level=level.proto, pattern=pattern, page_size=page_size, page_token=token)
            r = await rpc(self._stub().ListKeys(req, metadata=self._conn.metadata()))
            for key in r.keys:
                yield key
            token = r.next_page_token
            if not token:
                return

    async def list_keys(self, pattern: str = "*", level: CacheLevel = CacheLevel.APPLICATION) -> list[str]:
        """The keys of `level` matching `pattern`, sorted and without repeats."""
        return sorted({k async for k in self.iter_keys(pattern, level)})

    async def clear_level(self, level: CacheLevel) -> int:
        """Removes every key of `level`; returns how many."""
        req = pb.ClearLevelRequest(level=level.proto)
        # koo's own bound for it is KOO_BULK_TIMEOUT (300 s): a short default
        # deadline sent along would cut a large level's clear short
        r = await rpc(self._stub().ClearLevel(req, metadata=self._conn.metadata(), timeout=BULK_TIMEOUT))
        return r.deleted_count

    async def get_metrics(self) -> pb.CacheMetrics:
        """Hit/miss, latency, compression and memory figures (all instances)."""
        req = pb.GetMetricsRequest()
        r = await rpc(self._stub().GetMetrics(req, metadata=self._conn.metadata()))
        return r.metrics

    async def health_check(self) -> pb.GetHealthResponse:
        """Whether the backend answers, its kind, latency and breaker state."""
        req = pb.GetHealthRequest()
        return await rpc(self._stub().GetHealth(req, metadata=self._conn.metadata()))

    async def watch_metrics(self, interval: Seconds = 1.0) -> AsyncIterator[pb.CacheMetrics]:
        """A metrics snapshot every `interval` (100 ms to 1 h) until you stop
        iterating. A koo restart or outage is watched through (the stream is
        opened again, with backoff, and snapshots resume); any other refusal
        raises `KooError`."""
        req = pb.WatchMetricsRequest(interval=to_duration(interval))
        stream = reopening(lambda: self._stub().WatchMetrics(req, metadata=self._conn.metadata()))
        async with contextlib.aclosing(stream) as snapshots:
            async for r in snapshots:
                yield r.metrics

    async def start_maintenance(self, wait: bool = False, timeout: float = 60) -> pb.StartMaintenanceResponse:
        """Runs koo's maintenance task (cleanup, memory use, largest keys).

        Returns its task id, and with `wait` its report (within `timeout` s).
        """
        req = pb.StartMaintenanceRequest(wait=wait)
        return await rpc(self._stub().StartMaintenance(req, metadata=self._conn.metadata(), timeout=timeout))

    async def warm(
        self,
        entries: Mapping[str, Any] | None = None,
        level: CacheLevel = CacheLevel.APPLICATION,
        ttl: Seconds | None = None,
        *,
        skip_file: bool = False,
        wait: bool = False,
        timeout: float = 60,
    ) -> pb.WarmResponse:
        """Runs koo's warm task with these entries (and koo's warm file unless `skip_file`)."""
        req = pb.WarmRequest(skip_file=skip_file, wait=wait)
        for key, value in (entries or {}).items():
            e = req.entries.add(level=level.proto, key=key, value=to_cache_value(value))
            if ttl is not None:
                e.ttl.CopyFrom(to_duration(ttl))
        return await rpc(self._stub().Warm(req, metadata=self._conn.metadata(), timeout=timeout))

    async def cleanup(self, wait: bool = False, timeout: float = 60) -> pb.CleanupResponse:
        """Runs koo's cleanup task (what the backend does not expire itself)."""
        req = pb.CleanupRequest(wait=wait)
        return await rpc(self._stub().Cleanup(req, metadata=self._conn.metadata(), timeout=timeout))

    async def cache_api_response(self, key: str, data: Any, ttl: Seconds | None = 300) -> bool:
        """The seed's helper: caches an API response at the API level."""
        return await self.set(key, data, ttl=ttl, level=CacheLevel.API)

    async def get_cached_api_response(self, key: str) -> Any:
        """The seed's helper: a cached API response, or None."""
        return await self.get(key, CacheLevel.API)

    # ----- compute on miss, once (see `koo._compute`) ---------------------

    async def get_or_lock(
        self,
        key: str,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        lock_ttl: Seconds | None = None,
        wait: Seconds | None = None,
        timeout: float | None = None,
    ) -> Locked:
        """The value, or a token to compute it (see `Locked`).

        `lock_ttl` (default 30 s) is how long the token holds the key before a
        waiter takes over; `wait` how long to wait for another caller's value
        (default: `timeout`, the call's deadline).
        """
        req = lock_request(key, level.proto, lock_ttl, wait)
        return locked(await rpc(self._stub().GetOrLock(req, metadata=self._conn.metadata(), timeout=timeout)))

    async def fill(
        self,
        key: str,
        token: str,
        value: Any,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        ttl: Seconds | None = None,
        soft_ttl: Seconds | None = None,
        tags: Iterable[str] = (),
    ) -> bool:
        """Stores the value computed under `token` and wakes the waiters.

        Raises `KooError` (FAILED_PRECONDITION) when the lock was lost.
        """
        req = fill_request(key, level.proto, token, value=value, ttl=ttl, soft_ttl=soft_ttl, tags=tags)
        await rpc(self._stub().Fill(req, metadata=self._conn.metadata()))
        return True

    async def give_up(self, key: str, token: str, level: CacheLevel = CacheLevel.APPLICATION) -> None:
        """Gives the lock of `token` up without a value: a waiter takes over at once."""
        req = fill_request(key, level.proto, token, store=False)
        await rpc(self._stub().Fill(req, metadata=self._conn.metadata()))

    async def get_or_compute(
        self,
        key: str,
        task: str,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str = "",
        ttl: Seconds | None = None,
        soft_ttl: Seconds | None = None,
        tags: Iterable[str] = (),
        lock_ttl: Seconds | None = None,
        timeout: float | None = None,
    ) -> Computed:
        """The value; on a miss, koo runs `task` once (for every caller) and caches its result."""
        req = compute_request(
            key,
            level.proto,
            task,
            args=args,
            kwargs=kwargs,
            queue=queue,
            ttl=ttl,
            soft_ttl=soft_ttl,
            tags=tags,
            lock_ttl=lock_ttl,
        )
        return computed(await rpc(self._stub().GetOrCompute(req, metadata=self._conn.metadata(), timeout=timeout)))


class SyncKooCache:
    """Blocking twins of `KooCache`'s methods, for code without an event loop.

    Calls run on a private loop thread; don't call them from a coroutine
    (use the async client there).
    """

    def __init__(self, cache: KooCache | None = None) -> None:
        self._cache = cache if cache is not None else KooCache()

    @property
    def aio(self) -> KooCache:
        """The async client behind this facade."""
        return self._cache

    def get(self, key: str, level: CacheLevel = CacheLevel.APPLICATION, default: Any = None) -> Any:
        """See `KooCache.get`."""
        return shared_loop().run(self._cache.get(key, level, default))

    def get_entry(self, key: str, level: CacheLevel = CacheLevel.APPLICATION) -> CacheHit | None:
        """See `KooCache.get_entry`."""
        return shared_loop().run(self._cache.get_entry(key, level))

    def set(
        self,
        key: str,
        value: Any,
        ttl: Seconds | None = None,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        tags: Iterable[str] | None = None,
        soft_ttl: Seconds | None = None,
    ) -> bool:
        """See `KooCache.set`."""
        return shared_loop().run(self._cache.set(key, value, ttl, level, tags=tags, soft_ttl=soft_ttl))

    def delete(self, key: str, level: CacheLevel = CacheLevel.APPLICATION) -> bool:
        """See `KooCache.delete`."""
        return shared_loop().run(self._cache.delete(key, level))

    def exists(self, key: str, level: CacheLevel = CacheLevel.APPLICATION) -> bool:
        """See `KooCache.exists`."""
        return shared_loop().run(self._cache.exists(key, level))

    def get_many(self, keys: Iterable[str], level: CacheLevel = CacheLevel.APPLICATION) -> dict[str, Any]:
        """See `KooCache.get_many`."""
        return shared_loop().run(self._cache.get_many(keys, level))

    def set_many(
        self,
        items: Mapping[str, Any],
        ttl: Seconds | None = None,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        tags: Iterable[str] | None = None,
        soft_ttl: Seconds | None = None,
    ) -> int:
        """See `KooCache.set_many`."""
        return shared_loop().run(self._cache.set_many(items, ttl, level, tags=tags, soft_ttl=soft_ttl))

    def delete_many(self, keys: Iterable[str], level: CacheLevel = CacheLevel.APPLICATION) -> int:
        """See `KooCache.delete_many`."""
        return shared_loop().run(self._cache.delete_many(keys, level))

    def invalidate_tags(self, tags: Iterable[str], level: CacheLevel | None = None) -> int:
        """See `KooCache.invalidate_tags`."""
        return shared_loop().run(self._cache.invalidate_tags(tags, level))

    def list_keys(self, pattern: str = "*", level: CacheLevel = CacheLevel.APPLICATION) -> list[str]:
        """See `KooCache.list_keys`."""
        return shared_loop().run(self._cache.list_keys(pattern, level))

    def clear_level(self, level: CacheLevel) -> int:
        """See `KooCache.clear_level`."""
        return shared_loop().run(self._cache.clear_level(level))

    def get_metrics(self) -> pb.CacheMetrics:
        """See `KooCache.get_metrics`."""
        return shared_loop().run(self._cache.get_metrics())

    def health_check(self) -> pb.GetHealthResponse:
        """See `KooCache.health_check`."""
        return shared_loop().run(self._cache.health_check())

    def start_maintenance(self, wait: bool = False, timeout: float = 60) -> pb.StartMaintenanceResponse:
        """See `KooCache.start_maintenance`."""
        return shared_loop().run(self._cache.start_maintenance(wait, timeout))

    def warm(
        self,
        entries: Mapping[str, Any] | None = None,
        level: CacheLevel = CacheLevel.APPLICATION,
        ttl: Seconds | None = None,
        *,
        skip_file: bool = False,
        wait: bool = False,
        timeout: float = 60,
    ) -> pb.WarmResponse:
        """See `KooCache.warm`."""
        return shared_loop().run(self._cache.warm(entries, level, ttl, skip_file=skip_file, wait=wait, timeout=timeout))

    def cleanup(self, wait: bool = False, timeout: float = 60) -> pb.CleanupResponse:
        """See `KooCache.cleanup`."""
        return shared_loop().run(self._cache.cleanup(wait, timeout))

    def cache_api_response(self, key: str, data: Any, ttl: Seconds | None = 300) -> bool:
        """See `KooCache.cache_api_response`."""
        return shared_loop().run(self._cache.cache_api_response(key, data, ttl))

    def get_cached_api_response(self, key: str) -> Any:
        """See `KooCache.get_cached_api_response`."""
        return shared_loop().run(self._cache.get_cached_api_response(key))

    def get_or_lock(
        self,
        key: str,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        lock_ttl: Seconds | None = None,
        wait: Seconds | None = None,
        timeout: float | None = None,
    ) -> Locked:
        """See `KooCache.get_or_lock`."""
        return shared_loop().run(self._cache.get_or_lock(key, level, lock_ttl=lock_ttl, wait=wait, timeout=timeout))

    def fill(
        self,
        key: str,
        token: str,
        value: Any,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        ttl: Seconds | None = None,
        soft_ttl: Seconds | None = None,
        tags: Iterable[str] = (),
    ) -> bool:
        """See `KooCache.fill`."""
        return shared_loop().run(self._cache.fill(key, token, value, level, ttl=ttl, soft_ttl=soft_ttl, tags=tags))

    def give_up(self, key: str, token: str, level: CacheLevel = CacheLevel.APPLICATION) -> None:
        """See `KooCache.give_up`."""
        shared_loop().run(self._cache.give_up(key, token, level))

    def get_or_compute(
        self,
        key: str,
        task: str,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        queue: str = "",
        ttl: Seconds | None = None,
        soft_ttl: Seconds | None = None,
        tags: Iterable[str] = (),
        lock_ttl: Seconds | None = None,
        timeout: float | None = None,
    ) -> Computed:
        """See `KooCache.get_or_compute`."""
        return shared_loop().run(
            self._cache.get_or_compute(
                key,
                task,
                level,
                args=args,
                kwargs=kwargs,
                queue=queue,
                ttl=ttl,
                soft_ttl=soft_ttl,
                tags=tags,
                lock_ttl=lock_ttl,
                timeout=timeout,
            )
        )
