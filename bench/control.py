"""Control-plane pod startup: `run --replicas N` to every pod bound, vs the bare store.

The replication controller and the scheduler run in this process against a
local etcd; a replication controller of N replicas is created and the time
from that write to each pod's binding (seen through a watch) is recorded.
The peer is the floor any etcd-backed control plane pays: the same N pods
created and bound by plain sequential writes (create, then a CAS setting
spec.nodeName) from the same client, timed the same way.

    python -m bench.control [--replicas 30] [--nodes 3] [--rounds 5]

Node runtimes are not involved (no sandboxes): this is the control plane's
share of the pod-startup SLO (p99 <= 5 s end to end in Kubernetes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

from corral.api.objects import Pod, ReplicationController
from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd
from corral.control.replication import ReplicationManager
from corral.control.scheduler import Scheduler
from tests.control_helpers import make_node, make_pod


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def bound_times(store: Store, n: int, start: Callable[[], Awaitable[None]]) -> list[float]:
    """Seconds from `start()` being called to each of n pods being seen bound."""
    rev = await store.revision()
    seen: dict[str, float] = {}
    t0 = time.monotonic()
    starter = asyncio.create_task(start())
    async for ev in store.watch(Pod, None, rev + 1):
        if ev.type != "DELETED" and ev.object.spec.node_name and ev.object.name not in seen:
            seen[ev.object.name] = time.monotonic() - t0
            if len(seen) == n:
                break
    await starter
    return sorted(seen.values())


async def one_round(store: Store, replicas: int, nodes: int, r: int) -> tuple[list, list]:
    await store.delete_prefix_raw("/corral/")
    for i in range(nodes):
        await store.create(make_node(f"node-{i}"))
    tasks = [
        asyncio.create_task(Scheduler(store, seed=r).run()),
        asyncio.create_task(ReplicationManager(store).run()),
    ]
    await asyncio.sleep(0.3)  # informers listed and watching
    rc = ReplicationController.model_validate(
        {
            "metadata": {"name": f"web{r}"},
            "spec": {
                "replicas": replicas,
                "selector": {"app": "web"},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "command": ["x"]}]},
                },
            },
        }
    )

    async def create_rc() -> None:
        await store.create(rc)

    ours = await bound_times(store, replicas, create_rc)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    await store.delete_prefix_raw("/corral/v1/pods/")

    async def bare() -> None:
        for i in range(replicas):
            pod = await store.create(make_pod(f"bare-{i}"))
            pod.spec.node_name = f"node-{i % nodes}"
            await store.update(pod)

    floor = await bound_times(store, replicas, bare)
    return ours, floor


async def run(url: str, args: argparse.Namespace) -> None:
    async with Store(url) as store:
        ours: list[float] = []
        floor: list[float] = []
        for r in range(args.rounds):
            a, b = await one_round(store, args.replicas, args.nodes, r)
            ours += a
            floor += b
    print(
        f"control-plane pod startup, {args.replicas} replicas on {args.nodes} nodes, "
        f"{args.rounds} rounds ({len(ours)} pods)"
    )
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'last ms':>10}")
    for name, xs in (("corral rc+scheduler", ours), ("bare create+bind", floor)):
        print(
            f"{name:24}{pct(xs, 50) * 1000:10.1f}{pct(xs, 99) * 1000:10.1f}{max(xs) * 1000:10.1f}"
        )
    print(
        f"ratio p99 corral/bare: {pct(ours, 99) / pct(floor, 99):.2f} "
        f"(mean {statistics.mean(ours) / statistics.mean(floor):.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=30)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="corral-bench-control-")
    etcd = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    etcd.start()
    try:
        asyncio.run(run(etcd.url, args))
    finally:
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
