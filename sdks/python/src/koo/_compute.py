"""Compute on miss, once: the messages of GetOrLock, Fill and GetOrCompute.

`KooCache.get_or_lock` answers a value, or a lock token to the one caller
(across every process and koo instance) that should compute it; that caller
stores it with `KooCache.fill` (or gives the key up with `KooCache.give_up`,
so that a waiter takes over at once). An entry past its soft TTL is answered
stale, and one caller also gets a token to refresh it. `KooCache.get_or_compute`
has koo run a task on a miss instead. `@cached` is built on the first two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from koo._values import (
    Seconds,
    arguments,
    from_cache_value,
    from_timestamp,
    strings,
    to_cache_value,
    to_duration,
    to_struct,
)
from koo.cache.v1 import cache_service_pb2 as pb


@dataclass(frozen=True)
class Locked:
    """What `get_or_lock` answers: a value, a token, both (stale), or neither.

    `found` says whether `value` holds the entry (possibly `stale`); a
    non-empty `token` means this caller must compute the value (or refresh
    the stale one) and `fill` it before `lock_expires`. Neither comes back
    when `wait` passed first.
    """

    found: bool
    value: Any
    stale: bool
    token: str
    lock_expires: datetime | None


@dataclass(frozen=True)
class Computed:
    """What `get_or_compute` answers: the value, and how it came."""

    value: Any
    computed: bool
    task_id: str


def lock_request(
    key: str, level: pb.CacheLevel.ValueType, lock_ttl: Seconds | None, wait: Seconds | None
) -> pb.GetOrLockRequest:
    """A GetOrLock request."""
    req = pb.GetOrLockRequest(level=level, key=key)
    if lock_ttl is not None:
        req.lock_ttl.CopyFrom(to_duration(lock_ttl))
    if wait is not None:
        req.wait.CopyFrom(to_duration(wait))
    return req


def locked(r: pb.GetOrLockResponse) -> Locked:
    """A GetOrLock reply as a `Locked`."""
    expires = from_timestamp(r.lock_expire_time) if r.HasField("lock_expire_time") else None
    return Locked(
        found=r.found,
        value=from_cache_value(r.entry.value) if r.found else None,
        stale=r.found and r.entry.stale,
        token=r.lock_token,
        lock_expires=expires,
    )


def fill_request(
    key: str,
    level: pb.CacheLevel.ValueType,
    token: str,
    *,
    value: Any = None,
    store: bool = True,
    ttl: Seconds | None = None,
    soft_ttl: Seconds | None = None,
    tags: Iterable[str] = (),
) -> pb.FillRequest:
    """A Fill request; `store=False` gives the lock up without a value."""
    req = pb.FillRequest(level=level, key=key, lock_token=token, tags=strings("tags", tags))
    if store:
        req.value.CopyFrom(to_cache_value(value))
    if ttl is not None:
        req.ttl.CopyFrom(to_duration(ttl))
    if soft_ttl is not None:
        req.soft_ttl.CopyFrom(to_duration(soft_ttl))
    return req


def compute_request(
    key: str,
    level: pb.CacheLevel.ValueType,
    task: str,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    queue: str = "",
    ttl: Seconds | None = None,
    soft_ttl: Seconds | None = None,
    tags: Iterable[str] = (),
    lock_ttl: Seconds | None = None,
) -> pb.GetOrComputeRequest:
    """A GetOrCompute request."""
    t = pb.ComputeTask(name=task, queue=queue, args=arguments(args))
    if kwargs:
        t.kwargs.CopyFrom(to_struct(kwargs))
    req = pb.GetOrComputeRequest(level=level, key=key, task=t, tags=strings("tags", tags))
    for field, d in (("ttl", ttl), ("soft_ttl", soft_ttl), ("lock_ttl", lock_ttl)):
        if d is not None:
            getattr(req, field).CopyFrom(to_duration(d))
    return req


def computed(r: pb.GetOrComputeResponse) -> Computed:
    """A GetOrCompute reply as a `Computed`."""
    return Computed(value=from_cache_value(r.entry.value), computed=r.computed, task_id=r.task_id)
