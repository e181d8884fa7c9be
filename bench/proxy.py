"""Service proxy, iptables or nftables mode: full and partial sync cost vs its plain peer.

In two scratch network namespaces (made and removed here), N services x 3
endpoints are programmed:

- corral: `IptablesMode.sync(full=True)` (rule generation in Python + one
  `iptables-restore --noflush`, plus its hook checks), on a namespace that
  already holds the rules, as the periodic full sync finds it;
- peer: one `iptables-restore --noflush` of a kube-proxy-shaped ruleset this
  bench writes itself (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*, KUBE-MARK-MASQ,
  the same rules per service: mark for masquerade, a 3-way statistic
  cascade, per endpoint a hairpin mark and a DNAT), on a namespace that
  already holds it. Chain names are hashed as kube-proxy's are: iptables-nft
  restores sequential names markedly faster than hashed ones at this scale.

With `--mode nftables`: corral is `NftablesMode.sync(full=True)` (rule
generation + one in-process libnftables transaction), the peer one `nft -f`
of the very ruleset that full sync sends (kube-proxy's nftables layout, see
proxy/nftrules.py), each on a namespace already holding it; "first" is the
same on empty namespaces.

Rounds alternate between the two; the ratio is of the medians. Also printed:
the partial sync after one service's endpoint changed, at the same size.

    python -m bench.proxy [--services 1000,10000] [--rounds 3] [--mode nftables]
    python -m bench.proxy --incremental 50 --services 1000,10000
        # an EndpointSlice written to etcd -> a connection through the VIP answered
        # by the new endpoint (client and listener in their own namespaces)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import secrets
import statistics
import subprocess
import time
from typing import Any

from corral.node import iptables, netns
from corral.proxy.core import EndpointInfo, ServicePort, ServiceView
from corral.proxy.iptables import IptablesMode, Netfilter

CIDR = "10.244.0.0/16"


def views(n: int) -> dict[str, ServiceView]:
    out = {}
    for i in range(n):
        vip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        sp = ServicePort(f"default/svc-{i}", "http", "TCP", vip, 80)
        eps = tuple(
            EndpointInfo(f"10.244.{(3 * i + j) // 250 % 250}.{(3 * i + j) % 250 + 2}", 8080)
            for j in range(3)
        )
        out[sp.service] = ServiceView((sp,), ((sp.key, eps),))
    return out


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()


def kube_proxy_ruleset(vs: dict[str, ServiceView]) -> str:
    """What kube-proxy's iptables mode writes for the same services (nat table)."""
    chains = ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"]
    rules = [
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    for key, v in vs.items():
        sp = v.ports[0]
        eps = v.endpoints_of(sp)
        # kube-proxy's names: 16 base32 characters of a sha256 (servicePortChainName)
        svc = "KUBE-SVC-" + _hash(f"{key}:http/tcp")
        chains.append(svc)
        rules.append(
            f"-A KUBE-SERVICES -d {sp.cluster_ip}/32 -p tcp -m comment --comment "
            f'"{key}:http cluster IP" -m tcp --dport 80 -j {svc}'
        )
        rules.append(
            f'-A {svc} ! -s {CIDR} -d {sp.cluster_ip}/32 -p tcp -m comment --comment "{key}:http '
            'cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ'
        )
        for i, ep in enumerate(eps):
            sep = "KUBE-SEP-" + _hash(f"{key}:http/tcp{ep.ip}:8080")
            chains.append(sep)
            stat = (
                ""
                if i == len(eps) - 1
                else f"-m statistic --mode random --probability {1 / (len(eps) - i):.10f} "
            )
            rules.append(
                f'-A {svc} -m comment --comment "{key}:http -> {ep.ip}:8080" {stat}-j {sep}'
            )
            rules.append(
                f'-A {sep} -s {ep.ip}/32 -m comment --comment "{key}:http" -j KUBE-MARK-MASQ'
            )
            rules.append(
                f'-A {sep} -p tcp -m comment --comment "{key}:http" -m tcp '
                f"-j DNAT --to-destination {ep.ip}:8080"
            )
    rules.append(
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" '
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    )
    return "\n".join(["*nat", *(f":{c} - [0:0]" for c in chains), *rules, "COMMIT"]) + "\n"


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def maxrss_mb() -> float:
    """The bench process's peak resident memory (the mode runs in it, as in the proxy)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The bench process's resident memory now (after the syncs: what a proxy keeps)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def nft_file(ns: str, text: str) -> None:
    """The peer of the nftables mode: `nft -f` (a process, the text parsed by nft)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
        f.write(text)
        f.flush()
        subprocess.run(netns.command(ns, ["nft", "-f", f.name]), check=True, timeout=3600)


def run_nftables(n: int, rounds: int) -> dict[str, float]:
    from corral.proxy import nftrules as N
    from corral.proxy.nftables import Nft, NftablesMode

    tag = secrets.token_hex(3)
    ns_c, ns_p = f"benchpx-c-{tag}", f"benchpx-p-{tag}"
    for ns in (ns_c, ns_p):
        netns.add(ns)
    try:
        vs = views(n)
        mode = NftablesMode(CIDR, "bench", Nft(ns_c), Netfilter(ns_c))
        first = timed(lambda: mode.sync(True, vs, set()))
        per = {k: N.service_rules(v, CIDR) for k, v in vs.items()}
        empty = N.full(mode.table, per, CIDR, (), ()).text()
        peer_first = timed(lambda: nft_file(ns_p, empty))
        chains = {c for r in per.values() for c in r.chains}
        sets = {s for r in per.values() for s in r.sets}
        again = N.full(mode.table, per, CIDR, chains, sets).text()
        ours, peer = [], []
        for _ in range(rounds):
            ours.append(timed(lambda: mode.sync(True, vs, set())))
            peer.append(timed(lambda: nft_file(ns_p, again)))
        partial = endpoint_changes(mode, vs, rounds)
        rules = sum(len(r) for p in per.values() for r in p.chains.values())
        return figures(n, rules, first, peer_first, ours, peer, partial)
    finally:
        for ns in (ns_c, ns_p):
            netns.remove(ns)


def figures(
    n: int,
    rules: int,
    first: float,
    peer_first: float,
    ours: list[float],
    peer: list[float],
    partial: list[float],
) -> dict[str, float]:
    """One size's row: medians of the rounds, and the process's memory now."""
    return {
        "services": n,
        "rules": rules,
        "first": first,
        "peer_first": peer_first,
        "full": statistics.median(ours),
        "peer": statistics.median(peer),
        "partial": statistics.median(partial),
        "maxrss": maxrss_mb(),
        "rss": rss_mb(),
    }


def endpoint_changes(mode: Any, vs: dict[str, ServiceView], rounds: int) -> list[float]:
    """Seconds of each partial sync after one endpoint of one service changed."""
    key = next(iter(vs))
    v = vs[key]
    sp = v.ports[0]
    out = []
    for r in range(rounds):
        eps = (*v.endpoints_of(sp)[:2], EndpointInfo(f"10.244.254.{r + 2}", 8080))
        vs[key] = ServiceView((sp,), ((sp.key, eps),))
        out.append(timed(lambda: mode.sync(False, vs, {key})))
    return out


def run(n: int, rounds: int) -> dict[str, float]:
    tag = secrets.token_hex(3)
    ns_c, ns_p = f"benchpx-c-{tag}", f"benchpx-p-{tag}"
    for ns in (ns_c, ns_p):
        netns.add(ns)
    try:
        vs = views(n)
        mode = IptablesMode(CIDR, Netfilter(ns_c))
        first = timed(lambda: mode.sync(True, vs, set()))
        text = kube_proxy_ruleset(vs)
        peer_first = timed(lambda: iptables.restore(ns_p, text, timeout=3600))
        ours, peer = [], []
        for _ in range(rounds):
            ours.append(timed(lambda: mode.sync(True, vs, set())))
            peer.append(timed(lambda: iptables.restore(ns_p, text, timeout=3600)))
        # one endpoint of one service changes: a partial sync
        partial = endpoint_changes(mode, vs, rounds)
        rules = int(
            subprocess.run(
                netns.command(ns_c, ["sh", "-c", "iptables-save -t nat | grep -c '^-A'"]),
                capture_output=True,
                text=True,
            ).stdout.strip()
            or 0
        )
        return figures(n, rules, first, peer_first, ours, peer, partial)
    finally:
        for ns in (ns_c, ns_p):
            netns.remove(ns)


# in the client namespace: per line "HOST PORT IP,IP,..." connect again and again until
# an answer names one of the IPs (the server answers with the address it was reached at)
UNTIL_ANSWERED = r"""
import socket, sys, time
for line in sys.stdin:
    host, port, want = line.split(); want = set(want.split(",")); n = 0
    while True:
        n += 1
        try:
            s = socket.create_connection((host, int(port)), timeout=1)
            got = s.recv(64).decode().strip(); s.close()
        except OSError:
            got = ""
        if got in want:
            break
        time.sleep(0.001)
    print("ok", n, flush=True)
"""


async def incremental(
    n: int, changes: int, gap: float = 0.3, mode_name: str = "iptables"
) -> tuple[list[float], list[float]]:
    """EndpointSlice written to etcd -> a connection to the VIP answered by a new endpoint.

    A real etcd; the proxy component in this process on the shared informers,
    its rules in the node namespace of `bench.proxy_connect.topology` (node
    set-up and the BPF map skipped). Each change replaces one service's three
    endpoints by three new addresses; a client in its own namespace connects
    to the VIP (every ~1 ms, a new connection each time) until the listener
    answers as one of the new endpoints. Returns those latencies and the
    proxy's partial sync durations, in seconds.
    """
    import asyncio
    import shutil
    import tempfile

    from bench import proxy_connect as pc
    from corral.api.informer import InformerFactory
    from corral.api.objects import EndpointSlice, Service
    from corral.api.store import Store
    from corral.cluster.etcd import LocalEtcd
    from corral.proxy.component import Proxy

    def slice_of(i: int, ips: list[str]) -> EndpointSlice:
        return EndpointSlice(
            metadata={
                "name": f"svc-{i}",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": f"svc-{i}"},
            },
            endpoints=[{"addresses": [ip]} for ip in ips],
            ports=[{"name": "http", "port": pc.TARGET_PORT}],
        )

    tmp = tempfile.mkdtemp(prefix="benchpx-etcd-")
    server = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    server.start()
    try:
        with pc.topology() as topo:
            async with Store(server.url) as store:
                sem = asyncio.Semaphore(50)

                async def put(i: int) -> None:
                    async with sem:
                        await store.put(
                            Service(
                                metadata={"name": f"svc-{i}", "namespace": "default"},
                                spec={
                                    "clusterIP": pc.vip(i),
                                    "ports": [{"name": "http", "port": pc.PORT}],
                                },
                            )
                        )
                        await store.put(slice_of(i, [pc.endpoint(i, j) for j in range(3)]))

                await asyncio.gather(*(put(i) for i in range(n)))
                informers = InformerFactory(store)
                if mode_name == "nftables":
                    from corral.proxy.nftables import Nft, NftablesMode

                    mode: Any = NftablesMode(
                        pc.CLUSTER_CIDR, "bench", Nft(topo.node), Netfilter(topo.node)
                    )
                else:
                    mode = IptablesMode(pc.CLUSTER_CIDR, Netfilter(topo.node))
                proxy = Proxy(
                    store,
                    informers,
                    "bench",
                    mode=mode,
                    node_setup=False,
                    max_interval=3600,
                )
                await proxy.start()
                task = asyncio.create_task(proxy.run())
                while not proxy.synced_once:
                    await asyncio.sleep(0.05)
                prober = topo.client_process(UNTIL_ANSWERED)
                assert prober.stdin is not None and prober.stdout is not None
                loop = asyncio.get_running_loop()
                answered, syncs = [], []
                for c in range(1, changes + 1):
                    i = (c * 7919) % n
                    new = [f"10.245.{(3 * c + j) // 250 % 250}.{(3 * c + j) % 250 + 2}"
                           for j in range(3)]  # fmt: skip
                    runs = proxy.runner.runs
                    prober.stdin.write(f"{pc.vip(i)} {pc.PORT} {','.join(new)}\n")
                    prober.stdin.flush()
                    t0 = time.perf_counter()
                    await store.put(slice_of(i, new))
                    line = await loop.run_in_executor(None, prober.stdout.readline)
                    answered.append(time.perf_counter() - t0)
                    assert line.startswith("ok"), line
                    if proxy.runner.runs == runs + 1 and proxy.last and not proxy.last.full:
                        syncs.append(proxy.last.seconds)
                    await asyncio.sleep(gap)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await proxy.stop()
                await informers.stop()
                return answered, syncs
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1000,10000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", choices=("iptables", "nftables"), default="iptables")
    ap.add_argument(
        "--incremental",
        type=int,
        default=0,
        metavar="CHANGES",
        help="instead: CHANGES EndpointSlice updates, etcd write -> a connection answered "
        "by the new endpoint, p50/p99",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.proxy makes network namespaces: run it as root")
    if args.incremental:
        import asyncio

        from bench.proxy_connect import pct

        print(f"{'services':>8} {'changes':>7} {'p50':>8} {'p99':>8} {'sync p50':>8}")
        for n in (int(x) for x in args.services.split(",")):
            xs, syncs = asyncio.run(incremental(n, args.incremental, mode_name=args.mode))
            sync50 = f"{pct(syncs, 0.5) * 1000:>6.1f}ms" if syncs else "-"
            print(
                f"{n:>8} {len(xs):>7} {pct(xs, 0.5) * 1000:>6.1f}ms "
                f"{pct(xs, 0.99) * 1000:>6.1f}ms {sync50:>8}",
                flush=True,
            )
        return
    print(
        f"{'services':>8} {'rules':>7} {'first':>7} {'peer 1st':>8} {'full':>7} "
        f"{'peer':>7} {'ratio':>6} {'partial':>8} {'maxrss':>7} {'rss':>7}"
    )
    for n in (int(x) for x in args.services.split(",")):
        r = run_nftables(n, args.rounds) if args.mode == "nftables" else run(n, args.rounds)
        print(
            f"{r['services']:>8} {r['rules']:>7} {r['first']:>6.3f}s {r['peer_first']:>7.3f}s "
            f"{r['full']:>6.3f}s {r['peer']:>6.3f}s {r['full'] / r['peer']:>6.2f} "
            f"{r['partial'] * 1000:>6.1f}ms {r['maxrss']:>5.0f}MB {r['rss']:>5.0f}MB"
        )


if __name__ == "__main__":
    main()
