"""VXLAN overlay: pod-to-pod throughput against the underlay, and lease convergence.

Throughput: iperf3 between pods on two nodes (VXLAN, on the datapath the
agents pick: the eBPF fast path when BCC loads, `--datapath kernel` for the
kernel's corral.1 path) against iperf3 between the same two nodes over the
underlay, one stream and four, in alternating rounds so machine noise hits
both alike; prints the median of the rounds' pod/node ratios (each round's two
runs are back to back). With two or more CPUs, iperf3's client and server are
pinned to CPUs 0 and 1 in both runs (`--no-pin` to leave them to the
scheduler), which takes most of the run-to-run noise out on a small machine.

Convergence: 50 extra simulated node leases sit in etcd; then new leases are
written one at a time and the time until the route and FDB entry are present
on every real node is measured (polling the nodes' kernels over netlink).
Removal is measured the same way.

    python -m bench.overlay [--seconds 5] [--rounds 8] [--extra 50] [--trials 40]
                            [--datapath auto|bpf|kernel] [--no-pin]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from corral.api.objects import SubnetLease
from corral.api.store import Store, subnet_key
from corral.cluster.etcd import LocalEtcd
from corral.ebpf import loader
from corral.node import netns
from corral.overlay import lease as leases
from corral.overlay.vxlan import VxlanNetlink
from tests.overlay_testbed import Testbed, wait_for


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def iperf(
    tb: Testbed,
    client_ns: str,
    server_ns: str,
    server_ip: str,
    streams: int,
    seconds: int,
    port: int,
    pin: bool = False,
) -> float:
    """Received bits/s of one iperf3 run."""
    srv = subprocess.Popen(
        netns.command(server_ns, ["iperf3", "-s", "-1", "-p", str(port)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run(
                netns.command(
                    client_ns,
                    [
                        "iperf3",
                        "-c",
                        server_ip,
                        "-p",
                        str(port),
                        "-t",
                        str(seconds),
                        "-P",
                        str(streams),
                        "-J",
                        *(["-A", "0,1"] if pin else []),
                    ],
                ),
                capture_output=True,
                text=True,
                timeout=seconds + 60,
            )
            ok = r.returncode == 0 and '"sum_received"' in r.stdout
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the server was not listening yet
        doc = json.loads(r.stdout or "{}")
        if r.returncode != 0 or "sum_received" not in doc.get("end", {}):
            raise SystemExit(
                f"iperf3 failed: {doc.get('error') or r.stdout[-800:]} {r.stderr[-500:]}"
            )
        return float(doc["end"]["sum_received"]["bits_per_second"])
    finally:
        srv.kill()
        srv.wait()


def throughput(tb: Testbed, seconds: int, rounds: int, pin: bool) -> dict[str, Any]:
    p1, p2 = tb.node(1).pods[0], tb.node(2).pods[0]
    n1, n2 = tb.node(1), tb.node(2)
    res: dict[str, list[float]] = {}
    port = 5301
    for rnd in range(rounds):
        for streams in (1, 4):
            pairs = [("pod", p1.ns, p2.ns, p2.ip), ("node", n1.ns, n2.ns, n2.ip)]
            if rnd % 2:
                pairs.reverse()
            for what, c, s, ip in pairs:
                port += 1
                bps = iperf(tb, c, s, ip, streams, seconds, port, pin)
                res.setdefault(f"{what}-{streams}", []).append(bps)
                print(
                    f"  round {rnd + 1} {what:>4} {streams} stream(s): {bps / 1e9:6.2f} Gbit/s",
                    flush=True,
                )
    out: dict[str, Any] = {}
    for streams in (1, 4):
        pods, nodes = res[f"pod-{streams}"], res[f"node-{streams}"]
        # the ratio of each round's back-to-back pair: a burst of load from other
        # processes hits both runs of a pair alike, so pairs compare better than medians
        ratios = [p / n for p, n in zip(pods, nodes, strict=True)]
        out[f"{streams}"] = {
            "pod_gbps": statistics.median(pods) / 1e9,
            "node_gbps": statistics.median(nodes) / 1e9,
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return out


def _present(k: VxlanNetlink, index: int, subnet: str, mac: str) -> bool:
    """Route and FDB entry for `subnet` are in place (a route lookup first: it is cheap)."""
    gw = subnet.split("/")[0]
    probe = gw[:-1] + "7"  # an address inside the subnet
    r = k.ipr.route("get", dst=probe)[0]
    if r.get("RTA_OIF") != index or r.get("RTA_GATEWAY") != gw:
        return False
    return any(f.get("NDA_LLADDR") == mac for f in k.ipr.fdb("dump", ifindex=index))


def fake(i: int) -> SubnetLease:
    return SubnetLease(
        subnet=f"10.244.{100 + i}.0/24",
        node_name=f"sim-{i}",
        public_ip=f"172.30.0.{100 + (i % 100)}",
        vtep_mac=f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
    )


def convergence(tb: Testbed, extra: int, trials: int) -> dict[str, Any]:
    # etcd calls run on a loop of our own that is idle while we poll the kernels:
    # pyroute2's sync API cannot run inside a running event loop.
    loop = asyncio.new_event_loop()
    store = Store(tb.etcd_url)
    loop.run_until_complete(store.connect())
    kernels = [VxlanNetlink(n.ns) for n in tb.nodes]
    idx = [k.link_index("corral.1") or 0 for k in kernels]

    def wait_all(rec: SubnetLease, present: bool, t0: float, limit: float = 30) -> float:
        pending = set(range(len(kernels)))
        while pending:
            pending = {
                i
                for i in pending
                if _present(kernels[i], idx[i], rec.subnet, rec.vtep_mac) != present
            }
            if time.monotonic() - t0 > limit:
                raise SystemExit(f"lease {rec.subnet} not (un)programmed within {limit} s")
            if pending:
                time.sleep(0.005)
        return time.monotonic() - t0

    def put(rec: SubnetLease) -> None:
        loop.run_until_complete(store.put_raw(subnet_key(rec.subnet), leases.encode(rec)))

    add, rem = [], []
    try:

        async def put_all() -> None:
            await asyncio.gather(
                *(
                    store.put_raw(subnet_key(fake(i).subnet), leases.encode(fake(i)))
                    for i in range(extra)
                )
            )

        loop.run_until_complete(put_all())
        wait_all(fake(extra - 1), True, time.monotonic(), limit=60)
        for t in range(trials):
            rec = fake(extra + t)
            t0 = time.monotonic()
            put(rec)
            add.append(wait_all(rec, True, t0))
            t0 = time.monotonic()
            loop.run_until_complete(store.delete_raw(subnet_key(rec.subnet)))
            rem.append(wait_all(rec, False, t0))
    finally:
        for k in kernels:
            k.close()
        loop.run_until_complete(store.close())
        loop.close()
    return {
        "leases": extra + len(tb.nodes),
        "trials": trials,
        "add_p50_ms": statistics.median(add) * 1e3,
        "add_p99_ms": pct(add, 99) * 1e3,
        "add_max_ms": max(add) * 1e3,
        "remove_p50_ms": statistics.median(rem) * 1e3,
        "remove_p99_ms": pct(rem, 99) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="seconds per iperf3 run")
    ap.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="alternating rounds (single-stream rounds swing ~0.7-1.2 here)",
    )
    ap.add_argument("--extra", type=int, default=50, help="simulated node leases")
    ap.add_argument("--trials", type=int, default=40, help="new leases to time")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument(
        "--datapath",
        choices=("auto", "bpf", "kernel"),
        default="auto",
        help="the agents' datapath for pod traffic (default: auto)",
    )
    ap.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin iperf3's client and server to CPUs 0 and 1",
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.overlay needs root (network namespaces)", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="corral-bench-overlay-")
    etcd = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    etcd.start()
    tb = Testbed(etcd.url, nodes=args.nodes, resync=10.0, lease_ttl=30)
    try:
        for i in range(1, args.nodes + 1):
            tb.start_agent(i, wait=False, extra=["--datapath", args.datapath])
        for i in range(1, args.nodes + 1):
            tb.wait_ready(i)
            tb.add_pod(i)
        wait_for(lambda: tb.ping(tb.node(1).pods[0], tb.node(2).pods[0].ip), 60, "pods")
        pin = args.pin and (os.cpu_count() or 1) >= 2
        fast = False
        if args.datapath != "kernel" and loader.unavailable() is None:
            with contextlib.suppress(AssertionError):  # auto without BCC: the kernel path
                for i in range(1, args.nodes + 1):
                    tb.wait_fastpath(i)
                fast = True
        print(
            f"throughput (medians over rounds; {'eBPF fast' if fast else 'kernel'} datapath, "
            f"iperf3 {'pinned to CPUs 0,1' if pin else 'not pinned'}):",
            flush=True,
        )
        tp = throughput(tb, args.seconds, args.rounds, pin)
        for streams, r in tp.items():
            print(
                f"  {streams} stream(s): pod-to-pod {r['pod_gbps']:.2f} Gbit/s, "
                f"node-to-node {r['node_gbps']:.2f} Gbit/s, ratio {r['ratio']:.2f} "
                f"(rounds {r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            )
        print(
            f"convergence ({args.extra} simulated leases + {args.nodes} nodes, "
            f"{args.trials} trials):",
            flush=True,
        )
        cv = convergence(tb, args.extra, args.trials)
        print(
            f"  new lease -> route+FDB on every node: p50 {cv['add_p50_ms']:.1f} ms, "
            f"p99 {cv['add_p99_ms']:.1f} ms, max {cv['add_max_ms']:.1f} ms"
        )
        print(
            f"  removed lease -> entries gone everywhere: p50 {cv['remove_p50_ms']:.1f} ms, "
            f"p99 {cv['remove_p99_ms']:.1f} ms"
        )
        print(
            json.dumps(
                {"datapath": "bpf" if fast else "kernel", "throughput": tp, "convergence": cv}
            )
        )
    finally:
        tb.close()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
