"""Measures the near cache: a hot `get` served from the L1, against the same
`get` from koo; and the invalidation delay, from a Set acknowledged by koo A
to its message on a WatchInvalidations stream of koo B.

    python bench/near_cache.py TARGET_A [TARGET_B]

(with one target, the delay is measured on that koo alone).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from koo import KooCache, NearCache
from koo.cache.v1 import cache_service_pb2 as pb
from koo.cache.v1 import cache_service_pb2_grpc as pb_grpc


def pct(samples: list[float], p: float) -> float:
    """The `p` percentile of `samples`."""
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))]


async def hot_get(target: str) -> None:
    """µs per `get` of one key: from the L1, then from koo."""
    async with NearCache(KooCache(target)) as near:
        await near.wait(lambda n: n.ready)
        heard = near.stats.invalidations
        await near.set("bench:near", {"a": 1, "b": "text" * 20})
        await near.wait(lambda x: x.stats.invalidations > heard)
        await near.get("bench:near")
        n = 200_000
        t0 = time.perf_counter()
        for _ in range(n):
            await near.get("bench:near")
        l1 = (time.perf_counter() - t0) / n * 1e6
        assert near.stats.hits >= n
        remote = near.cache
        m = 2_000
        t0 = time.perf_counter()
        for _ in range(m):
            await remote.get("bench:near")
        koo = (time.perf_counter() - t0) / m * 1e6
    print(f"hot get: L1 {l1:.2f} µs, koo {koo:.0f} µs ({koo / l1:.0f}x)")


async def delay(a: str, b: str, rounds: int = 500) -> None:
    """ms from a Set's reply on A to its SET message on B's stream."""
    writer = KooCache(a)
    watcher = KooCache(b)
    stub = pb_grpc.CacheServiceStub(watcher._conn.channel())
    call = stub.WatchInvalidations(pb.WatchInvalidationsRequest(key_prefix="bench:delay:"))
    it = call.__aiter__()
    first = await it.__anext__()
    assert first.kind == pb.INVALIDATION_KIND_READY
    sent: list[float] = []
    acked: list[float] = []
    for i in range(rounds):
        t0 = time.perf_counter()
        await writer.set(f"bench:delay:{i}", i)
        t1 = time.perf_counter()
        while True:
            m = await it.__anext__()
            if m.kind == pb.INVALIDATION_KIND_SET and m.keys[0] == f"bench:delay:{i}":
                break
        t2 = time.perf_counter()
        sent.append((t2 - t0) * 1e3)
        acked.append((t2 - t1) * 1e3)
    call.cancel()
    for name, samples in (("Set sent on A", sent), ("Set acked on A", acked)):
        print(
            f"delay {name} -> message on B ({rounds} rounds): p50 {statistics.median(samples):.2f} ms, "
            f"p99 {pct(samples, 0.99):.2f} ms, max {max(samples):.2f} ms"
        )


async def main() -> None:
    a = sys.argv[1]
    b = sys.argv[2] if len(sys.argv) > 2 else a
    await hot_get(a)
    await delay(a, b)


if __name__ == "__main__":
    asyncio.run(main())
