"""CNI ADD/DEL latency: corral-cni + corral-ipam vs the reference bridge + host-local.

corral is measured twice, behind the stdlib-only Python shim ("corral") and behind
the native C shim ("corral-c", the default), both talking to the same daemon.

Both go through the same libcni Go client (tests/libcni_client) inside one node
namespace, in alternating blocks so machine noise hits both alike. Each pair is
ADD then DEL of one pod; the client times every call (process start of the
plugins included, the client's own start excluded).

    python -m bench.cni [--pairs 200] [--blocks 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from corral.cluster.etcd import LocalEtcd
from corral.cni.install import build_native_shim
from corral.node import netns
from tests.cni_helpers import REF_PLUGINS, CNINode, build_libcni_client, wait_until

REFERENCE = {
    "cniVersion": "1.0.0",
    "name": "refnet",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "refbr0",
            "isGateway": True,
            "mtu": 1450,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.245.0.0/24"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }
    ],
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def run_block(
    node: CNINode, conf_dir: Path, net: str, pods: list[str], cni_path: str | None = None
) -> dict[str, list]:
    argv = [node.client, "bench", str(conf_dir), net, str(node.cache_dir), *pods]
    env = dict(os.environ, CNI_PATH=cni_path or node.cni_path())
    r = subprocess.run(
        netns.command(node.name, argv),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if r.returncode != 0:
        raise SystemExit(
            f"{net}: libcni client failed: {r.stdout.strip()} {r.stderr.strip()}\n{node.log()}"
        )
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=200, help="ADD/DEL pairs per plugin set")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/cni needs root (network namespaces)")
    tmp = tempfile.mkdtemp(prefix="corral-bench-cni-")
    etcd = LocalEtcd(data_dir=os.path.join(tmp, "etcd"), log_path=os.path.join(tmp, "etcd.log"))
    etcd.start()
    node = CNINode(etcd.url, build_libcni_client())
    try:
        node.write_subnet("10.244.1.0/24", mtu=1450)
        node.start()
        wait_until(lambda: (node.conf_dir / "10-corral.conflist").exists(), 30, "conflist")
        ref_dir = node.write_conflist("refnet", REFERENCE)
        # The same daemon behind the native (C) shim, from a second bin dir.
        native_bin = node.tmp / "bin-native"
        native_bin.mkdir()
        build_native_shim(node.socket, str(native_bin / "corral-cni"))
        os.link(native_bin / "corral-cni", native_bin / "corral-ipam")
        native_path = f"{native_bin}:{REF_PLUGINS}"
        per_block = max(1, args.pairs // args.blocks)
        pods = [node.pod() for _ in range(per_block)]
        # Warm-up (page cache, first bridge creation), not counted.
        run_block(node, node.conf_dir, "corral", pods[:5])
        run_block(node, ref_dir, "refnet", pods[:5])
        run_block(node, node.conf_dir, "corral", pods[:5], native_path)
        res: dict[str, dict[str, list[float]]] = {
            who: {"add": [], "del": []} for who in ("corral", "corral-c", "reference")
        }
        for b in range(args.blocks):
            order = [
                ("corral", node.conf_dir, "corral", None),
                ("reference", ref_dir, "refnet", None),
                ("corral-c", node.conf_dir, "corral", native_path),
            ]
            for who, d, net, path in order if b % 2 == 0 else order[::-1]:
                wait_until(lambda: not node.veths(), 60, "veths from the last block to go")
                r = run_block(node, d, net, pods, path)
                res[who]["add"] += r["add"]
                res[who]["del"] += r["del"]
        print(
            f"CNI ADD/DEL through libcni, {per_block * args.blocks} pairs each "
            f"({args.blocks} alternating blocks), ms"
        )
        print(f"{'':10} {'ADD p50':>8} {'ADD p99':>8} {'DEL p50':>8} {'DEL p99':>8}")
        for who in ("corral", "corral-c", "reference"):
            a, d = res[who]["add"], res[who]["del"]
            print(
                f"{who:10} {pct(a, 50):8.1f} {pct(a, 99):8.1f} {pct(d, 50):8.1f} {pct(d, 99):8.1f}"
            )
        r = res["reference"]
        for who in ("corral", "corral-c"):
            o = res[who]
            print(
                f"ratio {who}/reference: "
                f"ADD p50 {statistics.median(o['add']) / statistics.median(r['add']):.2f}, "
                f"DEL p50 {statistics.median(o['del']) / statistics.median(r['del']):.2f}, "
                f"ADD p99 {pct(o['add'], 99) / pct(r['add'], 99):.2f}, "
                f"DEL p99 {pct(o['del'], 99) / pct(r['del'], 99):.2f}"
            )
    finally:
        node.cleanup()
        etcd.stop()
        subprocess.run(["rm", "-rf", tmp], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
