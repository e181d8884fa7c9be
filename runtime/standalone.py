"""Run only the pod runtime of a node: `python -m corral.runtime.standalone --node N ...`.

For tests and debugging without the whole node agent: start it inside the
node's network namespace (`nsenter --net=<node ns> ...`) so CNI plugins put the
host side of pod interfaces there. SIGTERM/SIGINT stop it and leave pods running
(a later run adopts them); SIGUSR1 or `--stop-pods-on-exit` terminate them first
(the Pod objects stay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from corral.api.store import Store, Unavailable
from corral.node.context import NodeContext, NodeOptions, NodePaths
from corral.runtime.pods import PodRuntime


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    d = NodePaths()
    ap = argparse.ArgumentParser(prog="corral-runtime")
    ap.add_argument("--node", required=True)
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--netns-dir", default=d.netns_dir)
    ap.add_argument("--state-dir", default=d.state_dir)
    ap.add_argument("--cni-conf-dir", default=d.cni_conf_dir)
    ap.add_argument("--cni-bin-dir", default=d.cni_bin_dir)
    ap.add_argument("--cni-cache-dir", default=d.cni_cache_dir)
    ap.add_argument("--run-dir", default=d.run_dir)
    ap.add_argument("--host-ip")
    ap.add_argument("--restart-backoff", type=float, default=10.0)
    ap.add_argument("--stop-pods-on-exit", action="store_true")
    return ap.parse_args(argv)


async def main(args: argparse.Namespace) -> int:
    store = Store(args.etcd)
    delay = 0.05
    while True:  # etcd (or the way to it) may come up after us
        try:
            await store.connect()
            break
        except Unavailable as e:
            if delay > 2:
                logging.getLogger("corral.runtime").warning("waiting for etcd: %s", e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    paths = NodePaths(
        run_dir=args.run_dir,
        cni_conf_dir=args.cni_conf_dir,
        cni_bin_dir=args.cni_bin_dir,
        cni_cache_dir=args.cni_cache_dir,
        netns_dir=args.netns_dir,
        state_dir=args.state_dir,
    )
    ctx = NodeContext(
        node_name=args.node,
        store=store,
        paths=paths,
        underlay_ip=args.host_ip,
        options=NodeOptions(restart_backoff=args.restart_backoff),
    )
    rt = PodRuntime(ctx)
    await rt.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_pods = args.stop_pods_on_exit
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)

    def stop_with_pods() -> None:
        nonlocal stop_pods
        stop_pods = True
        stop.set()

    loop.add_signal_handler(signal.SIGUSR1, stop_with_pods)
    task = asyncio.create_task(rt.run())
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done() and task.exception() is not None:
        logging.getLogger("corral.runtime").error("runtime failed", exc_info=task.exception())
        await ctx.informers.stop()
        await store.close()
        return 1
    if stop_pods:
        await rt.stop_all_pods()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await rt.stop()
    await ctx.informers.stop()
    await store.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(asyncio.run(main(parse())))
