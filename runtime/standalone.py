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
import logging
import signal

from corral.api.store import Store
from corral.daemon.core import Daemon, Informers
from corral.daemon.nodecontext import NodeContext
from corral.node.context import NodeOptions, NodePaths
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


class _Runtime:
    """PodRuntime as a daemon component that can stop its pods on the way out."""

    def __init__(self, rt: PodRuntime, stop_pods: bool) -> None:
        self.rt, self.stop_pods = rt, stop_pods

    async def start(self) -> None:
        await self.rt.start()

    async def run(self) -> None:
        await self.rt.run()

    async def stop(self) -> None:
        if self.stop_pods:
            await self.rt.stop_all_pods()
        await self.rt.stop()

    def debug_state(self) -> dict:
        return self.rt.debug_state()


async def main(args: argparse.Namespace) -> int:
    store = Store(args.etcd)
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
    comp = _Runtime(PodRuntime(ctx), args.stop_pods_on_exit)
    daemon = Daemon("runtime", args.node, store, configure_logging=True)
    daemon.add("informers", Informers(ctx.informers))
    daemon.add("pods", comp)

    def stop_with_pods() -> None:
        comp.stop_pods = True
        daemon.request_stop()

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop_with_pods)
    await daemon.run()  # SIGTERM/SIGINT: stop, leaving the pods running
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(asyncio.run(main(parse())))
