"""A client process for test_cached: 20 concurrent callers of one cold key.

Usage: python cached_child.py TARGET PREFIX START_AT
Waits until the wall-clock time START_AT, then prints how many times this
process computed the value.
"""

from __future__ import annotations

import asyncio
import sys
import time

import koo
from koo import CacheLevel, cached

calls = 0


async def main(prefix: str, start_at: float) -> None:
    @cached(ttl=60, level=CacheLevel.DATABASE, key_prefix=prefix)
    async def slow_square(x: int) -> int:
        global calls
        calls += 1
        await asyncio.sleep(0.5)
        return x * x

    await asyncio.sleep(max(0.0, start_at - time.time()))
    results = await asyncio.gather(*(slow_square(7) for _ in range(20)))
    assert results == [49] * 20
    print(calls)


if __name__ == "__main__":
    koo.configure(sys.argv[1])
    asyncio.run(main(sys.argv[2], float(sys.argv[3])))
