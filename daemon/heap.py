"""CPython's cycle collector, tuned for a process whose informers cache big lists.

With 30,000 pods and 10,000 Services cached (millions of small pydantic-held
objects), the default thresholds (700, 10, 10) made the collector rescan the
caches again and again while they grew: in a 5,000-Service run it took 3.8 s
of the controllers' 6.7 s. The caches are long-lived and acyclic (refcounting
frees what is replaced), so once they are loaded this component collects once
and freezes what exists (`gc.freeze()`: moved out of the collector's view,
still freed by refcount), and raises the young generation's threshold so
bursts of events do not trigger a collection every 700 allocations. It freezes
again whenever the objects tracked since have grown by a quarter of what was
frozen (CPython's own rule for when a full collection is worth it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging

from corral.api.informer import InformerFactory

log = logging.getLogger(__name__)

THRESHOLDS = (50_000, 20, 20)
CHECK_EVERY = 10.0  # seconds


class HeapTuning:
    """A daemon component: freeze the informer caches out of the cycle collector."""

    def __init__(self, informers: InformerFactory) -> None:
        self.informers = informers
        self.frozen_at = 0  # objects frozen, as of the last freeze
        self.freezes = 0

    def freeze(self) -> None:
        gc.collect()
        gc.freeze()
        self.freezes += 1
        self.frozen_at = gc.get_freeze_count()
        _trim()

    async def run(self) -> None:
        gc.set_threshold(*THRESHOLDS)
        await asyncio.sleep(0.5)  # the other components have made their informers
        await self.informers.wait_synced()
        self.freeze()
        log.info("informer caches frozen out of the cycle collector (%d objects)", self.frozen_at)
        while True:
            await asyncio.sleep(CHECK_EVERY)
            if len(gc.get_objects()) > self.frozen_at // 4:
                self.freeze()

    def debug_state(self) -> dict[str, int]:
        return {"frozen": gc.get_freeze_count(), "freezes": self.freezes}


def _trim() -> None:
    """Give the heap that the initial lists used (whole responses, decoded once) back to
    the system: glibc keeps freed memory in its arenas otherwise."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
