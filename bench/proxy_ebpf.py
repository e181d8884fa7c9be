"""Service proxy, eBPF mode vs iptables mode: the cost of reaching a service as services grow.

In scratch network namespaces (made and removed here) a TCP server on
0.0.0.0:8080 backs N services x 3 endpoints (10.244.0.1-3:8080, on the namespace's lo):

- ebpf: the socket programs (ebpf/proxy_sock.c) on a scratch cgroup2
  directory (never the root), maps filled by `SockLB.sync`; the client runs
  inside that cgroup;
- iptables: `IptablesMode.sync(full=True)` in another namespace (the VIPs
  routed on lo, DNAT in OUTPUT); the client runs there.

The client opens new connections for a few seconds, each to a random
service's VIP (each one is the first connection to that VIP in a while), or
straight to the endpoints' addresses (the peer: "direct"), and reports
connections per second and the median connect() latency. Ratios are VIP /
direct, measured in the same run, per mode and size. Also:

- programming latency (`--programming`): a real etcd and the proxy component
  (`Proxy` with `EbpfMode`) in this process; an EndpointSlice written to etcd
  until the service's map entries name the new backend (what the next
  connect() uses), p50/p99;
- the kernel memory of the maps (`memlock` of each map fd) at each size.

    python -m bench.proxy_ebpf [--services 1000,10000,30000] [--seconds 3]
    python -m bench.proxy_ebpf --programming 30 --services 10000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from corral.ebpf import loader, proxy_sock
from corral.node import netns
from corral.proxy.core import EndpointInfo, ServicePort, ServiceView
from corral.proxy.ebpf import sock_entries
from corral.proxy.iptables import IptablesMode, Netfilter

CIDR = "10.244.0.0/16"
PORT = 8080

SERVER = r"""
import socket, os
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(4096)
print("up", flush=True)
while True:  # the client closes first, with a reset: no TIME_WAIT skews later runs
    c, _ = s.accept(); c.send(b"x")
    try: c.recv(1)
    except OSError: pass
    c.close()
"""

# argv: "vip" N (services' VIPs, port 80) or "direct" (the endpoints, 8080), seconds
CLIENT = r"""
import json, random, socket, struct, sys, time
RST = struct.pack("ii", 1, 0)
kind, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
if kind == "vip":
    targets = [f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(n)]; port = 80
else:
    targets = [f"10.244.0.{j + 1}" for j in range(3)]; port = 8080
lat = []; n = 0; end = time.perf_counter() + secs; rnd = random.Random(1)
while True:
    t = time.perf_counter()
    if t > end: break
    s = socket.socket(); s.settimeout(5); s.connect((rnd.choice(targets), port))
    lat.append(time.perf_counter() - t); s.recv(1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST); s.close(); n += 1
lat.sort()
print(json.dumps({"rate": n / secs, "p50_us": lat[len(lat) // 2] * 1e6}))
"""


def vip(i: int) -> str:
    return f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def views(n: int) -> dict[str, ServiceView]:
    out = {}
    for i in range(n):
        sp = ServicePort(f"default/svc-{i}", "http", "TCP", vip(i), 80)
        eps = tuple(EndpointInfo(f"10.244.0.{j + 1}", PORT) for j in range(3))
        out[sp.service] = ServiceView((sp,), ((sp.key, eps),))
    return out


@contextlib.contextmanager
def namespace(tag: str) -> Iterator[tuple[str, subprocess.Popen]]:
    name = f"benchpe-{tag}-{secrets.token_hex(3)}"
    netns.add(name)
    path = os.path.join(netns.NETNS_DIR, name)
    srv = None
    try:
        subprocess.run(netns.command(name, ["ip", "link", "set", "lo", "up"]), check=True)
        for j in range(3):  # the endpoints' addresses, local to the namespace
            subprocess.run(
                netns.command(name, ["ip", "addr", "add", f"10.244.0.{j + 1}/32", "dev", "lo"]),
                check=True,
            )
        subprocess.run(
            netns.command(name, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]), check=True
        )
        srv = subprocess.Popen(
            netns.command(name, [sys.executable, "-c", SERVER]),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
        yield path, srv
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        netns.remove(name)


def client(ns: str, cgroup: str | None, n: int, secs: float, via_vip: bool) -> dict:
    def join() -> None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:  # type: ignore[arg-type]
            f.write(str(os.getpid()))

    argv = [sys.executable, "-c", CLIENT, "vip" if via_vip else "direct", str(n), str(secs)]
    out = subprocess.run(
        netns.command(ns, argv),
        preexec_fn=join if cgroup else None,
        capture_output=True,
        text=True,
        timeout=secs + 60,
        check=True,
    )
    return json.loads(out.stdout)


def connections(sizes: list[int], secs: float, rounds: int, iptables_upto: int) -> Iterator[dict]:
    run = secrets.token_hex(3)
    node = f"bench-{run}"
    cg = os.path.join(loader.CGROUP2_ROOT, f"corral-bench-{run}")
    os.mkdir(cg)
    lb = proxy_sock.SockLB(node, cgroup=cg)
    try:
        lb.load()
        lb.attach()
        with namespace("e") as (ens, _), namespace("i") as (ins, _):
            iname = os.path.basename(ins)
            subprocess.run(
                netns.command(iname, ["ip", "route", "add", "10.96.0.0/12", "dev", "lo"]),
                check=True,
            )
            ipt = IptablesMode(CIDR, Netfilter(iname))
            for n in sizes:
                vs = views(n)
                t0 = time.perf_counter()
                lb.sync(sock_entries(vs, vs), None)  # the conversion EbpfMode makes too
                t_map = time.perf_counter() - t0
                with_ipt = n <= iptables_upto
                t0 = time.perf_counter()
                if with_ipt:
                    ipt.sync(True, vs, set(vs))
                t_ipt = time.perf_counter() - t0
                got: dict[str, list[dict]] = {}
                variants = [
                    ("ebpf_vip", ens, cg, True),
                    ("ebpf_direct", ens, cg, False),
                    ("ipt_vip", ins, None, True),
                    ("ipt_direct", ins, None, False),
                ][: 4 if with_ipt else 2]
                for r in range(rounds):  # the order flips each round
                    for key, ns, cgroup, is_vip in variants if r % 2 == 0 else variants[::-1]:
                        got.setdefault(key, []).append(client(ns, cgroup, n, secs, is_vip))
                med = {
                    k: {m: statistics.median(r[m] for r in v) for m in ("rate", "p50_us")}
                    for k, v in got.items()
                }
                mem = lb.map_memory()
                yield {"services": n, "map_s": t_map, "ipt_s": t_ipt, "mem": mem, **med}
    finally:
        lb.close()
        proxy_sock.remove_all(node, cg)
        os.rmdir(cg)
        loader.remove_pins(node)


async def programming(n: int, changes: int) -> list[float]:
    """etcd write of an EndpointSlice change -> the service's map entries name the new backend."""
    import asyncio
    import shutil
    import tempfile

    from corral.api.informer import InformerFactory
    from corral.api.objects import EndpointSlice, Service
    from corral.api.store import Store
    from corral.cluster.etcd import LocalEtcd
    from corral.proxy.component import Proxy
    from corral.proxy.ebpf import EbpfMode

    tmp = tempfile.mkdtemp(prefix="benchpe-etcd-")
    run = secrets.token_hex(3)
    node = f"bench-{run}"
    cg = os.path.join(loader.CGROUP2_ROOT, f"corral-bench-{run}")
    os.mkdir(cg)
    ns = f"benchpe-p-{run}"
    server = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    server.start()
    netns.add(ns)
    mode = EbpfMode(CIDR, node, proxy_sock.SockLB(node, cgroup=cg), Netfilter(ns))

    def slice_of(i: int, gen: int) -> EndpointSlice:
        return EndpointSlice(
            metadata={
                "name": f"svc-{i}",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": f"svc-{i}"},
            },
            endpoints=[{"addresses": [f"10.244.{(3 * i + j) // 250 % 250}.{(3 * i + j) % 250 + 2}"]}
                       for j in range(2)]
            + [{"addresses": [f"10.245.{gen // 250 % 250}.{gen % 250 + 2}"]}],
            ports=[{"name": "http", "port": 8080}],
        )  # fmt: skip

    try:
        async with Store(server.url) as store:
            sem = asyncio.Semaphore(50)

            async def put(i: int) -> None:
                async with sem:
                    await store.put(
                        Service(
                            metadata={"name": f"svc-{i}", "namespace": "default"},
                            spec={"clusterIP": vip(i), "ports": [{"name": "http", "port": 80}]},
                        )
                    )
                    await store.put(slice_of(i, 0))

            await asyncio.gather(*(put(i) for i in range(n)))
            informers = InformerFactory(store)
            proxy = Proxy(store, informers, node, mode=mode, node_setup=False, max_interval=3600)
            await proxy.start()
            task = asyncio.create_task(proxy.run())
            while not (proxy.synced_once and mode.attached):
                await asyncio.sleep(0.05)
            out = []
            for c in range(1, changes + 1):
                i = (c * 7919) % n
                want = (f"10.245.{c // 250 % 250}.{c % 250 + 2}", 8080)
                key = (vip(i), 80, "TCP")
                t0 = time.perf_counter()
                await store.put(slice_of(i, c))
                while True:
                    h = (mode.sock.have or {}).get(key)
                    if h is not None and want in h.entry.backends:
                        break
                    await asyncio.sleep(0.001)
                out.append(time.perf_counter() - t0)
                # the iptables half of the sync runs behind, on its own runner: the next
                # change does not wait for it
                await asyncio.sleep(0.2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await proxy.stop()
            await informers.stop()
            return out
    finally:
        mode.sock.close()
        proxy_sock.remove_all(node, cg)
        os.rmdir(cg)
        loader.remove_pins(node)
        netns.remove(ns)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1000,10000,30000")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--programming", type=int, default=0, metavar="CHANGES")
    ap.add_argument(
        "--iptables-upto",
        type=int,
        default=10000,
        metavar="N",
        help="measure the iptables mode only up to N services (its full sync of 30k "
        "takes tens of minutes on this machine)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.proxy_ebpf makes namespaces, cgroups and BPF maps: run it as root")
    why = loader.unavailable()
    if why:
        raise SystemExit(why)
    sizes = [int(x) for x in args.services.split(",")]
    if args.programming:
        import asyncio

        print(f"{'services':>8} {'changes':>7} {'p50':>8} {'p99':>8}")
        for n in sizes:
            xs = sorted(asyncio.run(programming(n, args.programming)))
            p50 = xs[len(xs) // 2]
            p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
            print(f"{n:>8} {len(xs):>7} {p50 * 1000:>6.1f}ms {p99 * 1000:>6.1f}ms", flush=True)
        return
    print(
        f"{'services':>8} {'mode':>8} {'vip/s':>8} {'direct/s':>8} {'ratio':>6} "
        f"{'vip p50':>8} {'dir p50':>8} {'program':>8} {'maps MiB':>8}"
    )
    for r in connections(sizes, args.seconds, args.rounds, args.iptables_upto):
        mem = sum(r["mem"].values()) / 2**20
        for mode, prog in (("ebpf", r["map_s"]), ("ipt", r["ipt_s"])):
            if f"{mode}_vip" not in r:
                continue
            v, d = r[f"{mode}_vip"], r[f"{mode}_direct"]
            print(
                f"{r['services']:>8} {mode:>8} {v['rate']:>8.0f} {d['rate']:>8.0f} "
                f"{v['rate'] / d['rate']:>6.2f} {v['p50_us']:>6.0f}us {d['p50_us']:>6.0f}us "
                f"{prog:>7.2f}s {mem if mode == 'ebpf' else 0:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
