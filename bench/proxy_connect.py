"""Service proxy: first-connection latency through a VIP vs straight to the pod IP.

Three scratch network namespaces (made and removed here), `Topology`:

    client (10.243.0.2, a "pod")  --veth--  node (the proxy's rules)  --veth--  server

The server namespace owns every address of 10.244.0.0/15 (a `local` route on
lo), so one listener answers as any endpoint; it replies with the address the
connection reached (the DNATed endpoint), then closes. The node namespace
forwards between the two and holds the proxy mode's kernel state for N
services x 3 endpoints.

Per round the client makes a new TCP connection and reads the first byte, to
a random service's VIP and then straight to one of that service's endpoints
(alternating, so both see the same load); the figures are p50/p99 of
connect + first byte and the ratio of the p50s.

    python -m bench.proxy_connect --mode iptables --services 1000,10000

`mode` selects how the node namespace is programmed (`PROGRAMMERS`); a new
mode (eBPF) adds a function there and joins the same table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from corral.node import netns
from corral.proxy.core import EndpointInfo, ServicePort, ServiceView

CLUSTER_CIDR = "10.240.0.0/12"  # the "pod network": client and endpoints are pods
ENDPOINTS = "10.244.0.0/15"  # every endpoint the views use (server-owned)
CLIENT_IP, CLIENT_GW = "10.243.0.2", "10.243.0.1"
SERVER_IP, SERVER_GW = "10.242.0.2", "10.242.0.1"
PORT, TARGET_PORT = 80, 8080

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try: c.sendall(c.getsockname()[0].encode() + b"\n")
    except OSError: pass
    c.close()
"""

# argv: JSON [[host, port], ...]: connect + first byte to each in turn, seconds as JSON
PROBE = r"""
import json, socket, sys, time
out = []
for host, port in json.loads(sys.stdin.read()):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=5); s.recv(64)
    out.append(time.perf_counter() - t0); s.close()
print(json.dumps(out))
"""


def vip(i: int) -> str:
    return f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def endpoint(i: int, j: int) -> str:
    k = 3 * i + j
    return f"10.244.{k // 250 % 250}.{k % 250 + 2}"


def views(n: int) -> dict[str, ServiceView]:
    """N ClusterIP services x 3 endpoints, as the proxy's core hands them to a mode."""
    out = {}
    for i in range(n):
        sp = ServicePort(f"default/svc-{i}", "http", "TCP", vip(i), PORT)
        eps = tuple(EndpointInfo(endpoint(i, j), TARGET_PORT) for j in range(3))
        out[sp.service] = ServiceView((sp,), ((sp.key, eps),))
    return out


@dataclass
class Topology:
    node: str
    client: str
    server: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, ns: str, *argv: str) -> None:
        netns.run(ns, list(argv))

    def start_server(self) -> None:
        p = subprocess.Popen(
            netns.command(self.server, [sys.executable, "-c", SERVER, str(TARGET_PORT)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def probe(self, targets: list[tuple[str, int]]) -> list[float]:
        r = subprocess.run(
            netns.command(self.client, [sys.executable, "-c", PROBE]),
            input=json.dumps(targets),
            capture_output=True,
            text=True,
            timeout=60 + len(targets),
            check=True,
        )
        return json.loads(r.stdout)

    def client_process(self, script: str, *args: str) -> subprocess.Popen:
        """A long-lived process in the client namespace (line protocol on stdin/stdout)."""
        p = subprocess.Popen(
            netns.command(self.client, [sys.executable, "-c", script, *args]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.procs.append(p)
        return p


@contextlib.contextmanager
def topology(prefix: str = "benchpx") -> Iterator[Topology]:
    """client -- node -- server, in three namespaces removed on exit (also on failure)."""
    tag = secrets.token_hex(3)
    t = Topology(f"{prefix}-n-{tag}", f"{prefix}-c-{tag}", f"{prefix}-s-{tag}")
    made: list[str] = []
    try:
        for ns in (t.node, t.client, t.server):
            netns.add(ns)
            made.append(ns)
        sides = ((t.client, CLIENT_IP, CLIENT_GW, "vc"), (t.server, SERVER_IP, SERVER_GW, "vs"))
        for peer, ip, gw, dev in sides:
            peer_end = ["peer", "name", "eth0", "netns", netns.path(peer)]
            t.run(t.node, "ip", "link", "add", dev, "type", "veth", *peer_end)
            t.run(t.node, "ip", "addr", "add", f"{gw}/24", "dev", dev)
            t.run(t.node, "ip", "link", "set", dev, "up")
            t.run(peer, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            t.run(peer, "ip", "link", "set", "eth0", "up")
            t.run(peer, "ip", "route", "add", "default", "via", gw)
        t.run(t.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        t.run(t.node, "ip", "route", "add", ENDPOINTS, "via", SERVER_IP)
        # the VIPs: routable from the node (REJECTs happen after routing, in FORWARD)
        t.run(t.node, "ip", "route", "add", "10.96.0.0/12", "via", SERVER_IP)
        t.run(t.server, "ip", "route", "add", "local", ENDPOINTS, "dev", "lo")
        t.start_server()
        yield t
    finally:
        for p in t.procs:
            p.kill()
            p.wait()
        for ns in made:
            netns.remove(ns)


# ------------------------------------------------------------------ modes


def program_iptables(t: Topology, vs: dict[str, ServiceView]) -> Callable[[], None]:
    """One full sync of the iptables mode in the node namespace; returns its cleanup."""
    from corral.proxy.iptables import IptablesMode, Netfilter

    mode = IptablesMode(CLUSTER_CIDR, Netfilter(t.node))
    mode.sync(True, vs, set())
    return lambda: None  # the namespace goes with the topology


def program_nftables(t: Topology, vs: dict[str, ServiceView]) -> Callable[[], None]:
    """One full sync of the nftables mode (its own table) in the node namespace."""
    from corral.proxy.iptables import Netfilter
    from corral.proxy.nftables import Nft, NftablesMode

    mode = NftablesMode(CLUSTER_CIDR, "bench", Nft(t.node), Netfilter(t.node))
    mode.sync(True, vs, set())
    return lambda: None


PROGRAMMERS: dict[str, Callable[[Topology, dict[str, ServiceView]], Callable[[], None]]] = {
    "iptables": program_iptables,
    "nftables": program_nftables,
}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(mode: str, n: int, samples: int = 2000) -> dict[str, float]:
    """p50/p99 of connect + first byte via the VIP and direct, for N services."""
    program = PROGRAMMERS[mode]
    vs = views(n)
    with topology() as t:
        t0 = time.monotonic()
        done = program(t, vs)
        programmed = time.monotonic() - t0
        try:
            rnd = secrets.SystemRandom()
            warm = [(vip(0), PORT), (endpoint(0, 0), TARGET_PORT)] * 20
            t.probe(warm)
            targets: list[tuple[str, int]] = []
            for _ in range(samples):
                i = rnd.randrange(n)
                targets += [(vip(i), PORT), (endpoint(i, rnd.randrange(3)), TARGET_PORT)]
            got = t.probe(targets)
        finally:
            done()
    via, direct = got[0::2], got[1::2]
    return {
        "services": n,
        "programmed": programmed,
        "vip50": pct(via, 0.5),
        "vip99": pct(via, 0.99),
        "pod50": pct(direct, 0.5),
        "pod99": pct(direct, 0.99),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="iptables", choices=sorted(PROGRAMMERS))
    ap.add_argument("--services", default="1000,10000")
    ap.add_argument("--samples", type=int, default=2000, help="connections per target kind")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.proxy_connect makes network namespaces: run it as root", file=sys.stderr)
        return 2
    print(
        f"{'mode':>8} {'services':>8} {'VIP p50':>8} {'VIP p99':>8} {'pod p50':>8} "
        f"{'pod p99':>8} {'ratio':>6}"
    )
    for n in (int(x) for x in args.services.split(",")):
        r = run(args.mode, n, args.samples)
        print(
            f"{args.mode:>8} {n:>8} {r['vip50'] * 1e6:>6.0f}us {r['vip99'] * 1e6:>6.0f}us "
            f"{r['pod50'] * 1e6:>6.0f}us {r['pod99'] * 1e6:>6.0f}us "
            f"{r['vip50'] / r['pod50']:>6.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
