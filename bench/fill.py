"""Writing many objects to etcd fast, as every bench sets up its scene: transactions of
`batched` runs, 8 at a time (what `corral apply` does)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from corral.api.store import Store, batched


async def commit_all(store: Store, objs: Sequence[Any], size: int = 800) -> float:
    """Create `objs` (each about `size` bytes encoded); the seconds it took."""
    gate = asyncio.Semaphore(8)

    async def one(batch: list[Any]) -> None:
        async with gate:
            await store.commit(creates=batch)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(b) for b in batched(list(objs), size=lambda _: size)))
    return time.perf_counter() - t0


async def fill(url: str, objs: Sequence[Any], size: int = 800) -> float:
    """commit_all on a Store of its own."""
    store = Store(url)
    await store.connect()
    try:
        return await commit_all(store, objs, size)
    finally:
        await store.close()
