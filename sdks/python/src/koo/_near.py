"""`NearCache`: an in-process L1 in front of `KooCache`, kept fresh by koo's
`WatchInvalidations` stream.

The L1 caches only while its stream is READY: every change made after READY
on any koo instance reaches it, so an entry is never stale for longer than
the stream's delay (about a millisecond on one host; see the README). It
drops a key on SET/DELETE/EXPIRED, a level on CLEAR_LEVEL, the entries
carrying a tag on TAGS (it keeps each entry's tags from `Get`), and
everything on RESET (koo lost changes, or this client fell behind) or when
the stream breaks (it then reconnects, and caches again at the next READY).
koo sends a heartbeat every `heartbeat` seconds of quiet: a stream silent
for three of them is taken as stalled (a koo that hangs, a network path that
drops without a reset), and the L1 drops everything and reconnects, so an
entry is never stale for longer than that either. Entries also never outlive
their TTL, nor their soft TTL (past it, reads go to koo, which elects one
caller to refresh), and at most `max_entries` are kept (least recently used
first out); an entry served from the L1 reports the TTL it has left.

A `Get` that raced a change is not kept: the L1 counts the changes it
applied, and keeps a value only if none arrived while it was being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio

from koo._cache import LEVEL_OF_PROTO, CacheHit, CacheLevel, KooCache, _hit
from koo._connection import rpc
from koo._values import Seconds, strings, to_duration
from koo.cache.v1 import cache_service_pb2 as pb
from koo.cache.v1 import cache_service_pb2_grpc as pb_grpc

# Heartbeat intervals of silence after which the stream is taken as stalled.
STALL_INTERVALS = 3

log = logging.getLogger("koo.near")


@dataclass
class NearCacheStats:
    """What the L1 did since it started."""

    hits: int = 0
    misses: int = 0
    invalidations: int = 0
    resets: int = 0
    reconnects: int = 0
    # streams given up for silence (no change and no heartbeat for three
    # heartbeat intervals)
    stalls: int = 0


@dataclass
class _Entry:
    hit: CacheHit
    # when it was read from koo, and when the L1 stops serving it (its TTL
    # or its soft TTL, whichever ends first), by time.monotonic()
    read_at: float
    expires: float
    tags: frozenset[str] = field(default_factory=frozenset)

    def served(self, now: float) -> CacheHit:
        """The hit as it stands at `now`: the time it has left, not the
        time it had when it was read."""
        gone = timedelta(seconds=now - self.read_at)
        soft = self.hit.soft_ttl
        return dataclasses.replace(self.hit, ttl=self.hit.ttl - gone, soft_ttl=None if soft is None else soft - gone)


def _entry(hit: CacheHit, r: pb.GetResponse) -> _Entry | None:
    """The L1's entry for a hit just read, or None for one past its soft TTL
    (each read of it must reach koo, which elects the refresher)."""
    if hit.stale:
        return None
    now = time.monotonic()
    life = hit.ttl if hit.soft_ttl is None else min(hit.ttl, hit.soft_ttl)
    return _Entry(hit, now, now + life.total_seconds(), frozenset(r.tags))


class NearCache:
    """An L1 in front of `cache` (use `async with`, or `start()` / `close()`).

    `levels` and `key_prefix` say what the L1 keeps (and what the stream
    sends); everything else is read from koo every time. `heartbeat`: how
    often (seconds) koo says the stream is live when nothing changes; three
    of them without a word and the L1 drops everything and reconnects.
    """

    def __init__(
        self,
        cache: KooCache,
        *,
        max_entries: int = 10_000,
        levels: Iterable[CacheLevel] | None = None,
        key_prefix: str = "",
        heartbeat: float = 1.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 0.1 <= heartbeat <= 3600:
            raise ValueError(f"heartbeat must be 0.1 to 3600 seconds, not {heartbeat!r}")
        self.heartbeat = heartbeat
        self.cache = cache
        self.max_entries = max_entries
        self.levels = frozenset(levels) if levels is not None else frozenset(CacheLevel)
        self.key_prefix = key_prefix
        self.stats = NearCacheStats()
        self._entries: OrderedDict[tuple[CacheLevel, str], _Entry] = OrderedDict()
        self._ready = False
        self._applied = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NearCache:  # noqa: PYI034 (typing.Self needs 3.11; the class is final in spirit)
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Starts following the stream (the L1 caches from its READY on)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow())

    async def close(self) -> None:
        """Stops following the stream and drops everything."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._drop_all(ready=False)

    @property
    def ready(self) -> bool:
        """Whether the L1 caches now (its stream is READY)."""
        return self._ready

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: tuple[CacheLevel, str]) -> bool:
        return item in self._entries

    async def wait(self, predicate: Any, timeout: float = 10) -> None:
        """Waits (at most `timeout` s) until `predicate(self)` holds after a
        message of the stream; for tests and start-up (`lambda n: n.ready`)."""

        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(predicate(self)))

        await asyncio.wait_for(until(), timeout)

    async def get(self, key: str, level: CacheLevel = CacheLevel.APPLICATION, default: Any = None) -> Any:
        """The value under `key` (from the L1 when it has it), or `default`."""
        hit = await self.get_entry(key, level)
        return default if hit is None else hit.value

    async def get_entry(self, key: str, level: CacheLevel = CacheLevel.APPLICATION) -> CacheHit | None:
        """The entry under `key`, from the L1 when it has it, else from koo."""
        k = (level, key)
        e = self._entries.get(k)
        if e is not None:
            now = time.monotonic()
            if e.expires > now:
                self._entries.move_to_end(k)
                self.stats.hits += 1
                return e.served(now)
            del self._entries[k]
        self.stats.misses += 1
        seen = self._applied
        conn = self.cache._conn
        stub = pb_grpc.CacheServiceStub(conn.channel())
        r = await rpc(stub.Get(pb.GetRequest(level=level.proto, key=key), metadata=conn.metadata()))
        hit = _hit(r)
        if hit is not None and self._ready and self._applied == seen and self._keeps(level, key):
            entry = _entry(hit, r)
            if entry is not None:
                self._entries[k] = entry
                if len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return hit

    def _keeps(self, level: CacheLevel, key: str) -> bool:
        return level in self.levels and key.startswith(self.key_prefix)

    # Writes go to koo; the L1 forgets the key at once (the stream would
    # tell it too, a moment later).

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
        """See `KooCache.set`."""
        self._forget(level, key)
        return await self.cache.set(key, value, ttl, level, tags=tags, soft_ttl=soft_ttl)

    async def delete(self, key: str, level: CacheLevel = CacheLevel.APPLICATION) -> bool:
        """See `KooCache.delete`."""
        self._forget(level, key)
        return await self.cache.delete(key, level)

    async def set_many(
        self,
        items: Mapping[str, Any],
        ttl: Seconds | None = None,
        level: CacheLevel = CacheLevel.APPLICATION,
        *,
        tags: Iterable[str] | None = None,
        soft_ttl: Seconds | None = None,
    ) -> int:
        """See `KooCache.set_many`."""
        for key in items:
            self._forget(level, key)
        return await self.cache.set_many(items, ttl, level, tags=tags, soft_ttl=soft_ttl)

    async def invalidate_tags(self, tags: Iterable[str], level: CacheLevel | None = None) -> int:
        """See `KooCache.invalidate_tags`. The entries held here that carry
        any of `tags` are dropped at once (not only when the stream says)."""
        tags = strings("tags", tags)
        self._drop_tagged(frozenset(tags), level)
        return await self.cache.invalidate_tags(tags, level)

    async def delete_many(self, keys: Iterable[str], level: CacheLevel = CacheLevel.APPLICATION) -> int:
        """See `KooCache.delete_many`."""
        keys = strings("keys", keys)
        for key in keys:
            self._forget(level, key)
        return await self.cache.delete_many(keys, level)

    async def clear_level(self, level: CacheLevel) -> int:
        """See `KooCache.clear_level`."""
        self._drop_level(level)
        return await self.cache.clear_level(level)

    def _forget(self, level: CacheLevel, key: str) -> None:
        self._applied += 1
        self._entries.pop((level, key), None)

    def _drop_tagged(self, tags: frozenset[str], level: CacheLevel | None) -> None:
        self._applied += 1
        for k in [k for k, e in self._entries.items() if (level is None or k[0] is level) and e.tags & tags]:
            del self._entries[k]

    def _drop_level(self, level: CacheLevel) -> None:
        self._applied += 1
        for k in [k for k in self._entries if k[0] is level]:
            del self._entries[k]

    def _drop_all(self, *, ready: bool) -> None:
        self._applied += 1
        self._entries.clear()
        self._ready = ready

    async def _follow(self) -> None:
        """Follows the stream for as long as the L1 runs, reconnecting."""
        pause = 0.1
        while True:
            conn = self.cache._conn
            stub = pb_grpc.CacheServiceStub(conn.channel())
            req = pb.WatchInvalidationsRequest(
                levels=[lv.proto for lv in self.levels],
                key_prefix=self.key_prefix,
                heartbeat_interval=to_duration(self.heartbeat),
            )
            call = stub.WatchInvalidations(req, metadata=conn.metadata())
            try:
                if await self._read(call):
                    pause = 0.1
            finally:
                call.cancel()
            # The stream broke: whatever changed meanwhile is unknown.
            self._drop_all(ready=False)
            self.stats.reconnects += 1
            async with self._changed:
                self._changed.notify_all()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)

    async def _read(self, call: Any) -> bool:
        """Applies the stream's messages until it ends, breaks, or stalls (a
        stream that promised heartbeats, as koo says on READY, silent for
        STALL_INTERVALS of them; older koo releases send none); whether it
        said anything (a stream that worked is reopened at once)."""
        silence: float | None = None
        heard = False
        while True:
            read = call.read()
            try:
                m = await (read if silence is None else asyncio.wait_for(read, silence))
            except grpc.aio.AioRpcError:
                return heard
            except asyncio.TimeoutError:
                self.stats.stalls += 1
                log.warning(
                    "the invalidation stream said nothing for %.1f s, not even a heartbeat: "
                    "koo or the network stalled; the near cache is dropped until it reconnects",
                    silence,
                )
                return heard
            if m is grpc.aio.EOF:
                return heard
            heard = True
            if m.kind == pb.INVALIDATION_KIND_READY and m.HasField("heartbeat_interval"):
                # read as a float: a server's absurd interval must not raise
                # OverflowError here and stop the follower with the L1 ready
                d = m.heartbeat_interval
                silence = min(max(d.seconds + d.nanos / 1e9, 0.1), 3600.0) * STALL_INTERVALS
            await self._apply(m)

    async def _apply(self, m: pb.WatchInvalidationsResponse) -> None:
        kind = m.kind
        level = LEVEL_OF_PROTO.get(m.level)
        if kind == pb.INVALIDATION_KIND_HEARTBEAT:
            return
        if kind == pb.INVALIDATION_KIND_READY:
            self._ready = True
        elif kind == pb.INVALIDATION_KIND_RESET:
            self.stats.resets += 1
            self._drop_all(ready=False)
        elif kind in (pb.INVALIDATION_KIND_SET, pb.INVALIDATION_KIND_DELETE, pb.INVALIDATION_KIND_EXPIRED):
            self.stats.invalidations += 1
            if level is not None:
                for key in m.keys:
                    self._forget(level, key)
        elif kind == pb.INVALIDATION_KIND_CLEAR_LEVEL:
            self.stats.invalidations += 1
            if level is not None:
                self._drop_level(level)
        elif kind == pb.INVALIDATION_KIND_TAGS:
            self.stats.invalidations += 1
            self._drop_tagged(frozenset(m.tags), level)
        async with self._changed:
            self._changed.notify_all()
