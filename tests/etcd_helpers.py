"""etcd for tests: one of a test's own, and a synchronous way to use a store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd


@contextlib.contextmanager
def running_etcd(what: str = "etcd", **options: Any) -> Iterator[LocalEtcd]:
    """A real etcd of its own on free loopback ports (`options` go to LocalEtcd), stopped
    (thawed first, if a test froze it) and removed with its data afterwards."""
    tmp = tempfile.mkdtemp(prefix=f"corral-test-{what}-")
    server = LocalEtcd(
        data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"), **options
    )
    server.start()
    try:
        yield server
    finally:
        if server.record is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.record.pid, signal.SIGCONT)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def on_store(url: str, fn: Callable[[Store], Any]) -> Any:
    """Run `fn(store)` on a fresh connection to `url`, from synchronous test code."""

    async def go() -> Any:
        async with Store(url) as s:
            return await fn(s)

    return asyncio.run(go())
