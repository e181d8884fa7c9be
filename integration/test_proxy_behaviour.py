"""The service proxy's behaviour on a real `corral up` cluster, once per datapath.

One 3-node cluster per datapath (`bpf`: the eBPF overlay fast path, `kernel`:
the kernel's VXLAN path), shared by every case of the module, with one set of
pods: three servers (one per node) behind the `prx-web` Service and a client
pod on node-1. The servers answer every TCP connection and UDP datagram with
"<pod name> <client address> <port>", so a case sees which endpoint it reached
and what source address the endpoint saw. Readiness is a TCP probe on a port a
server closes when told to over UDP (no shared files), so a case can make an
endpoint NotReady and ready again in place.

The mode is parametrized through `corral up`'s CORRAL_PROXY_MODE (iptables,
ebpf, nftables): one cluster per (mode, datapath). In the eBPF mode pods' connections
are translated by the socket programs and host-network clients, NodePort and
connected UDP keep the iptables rules (docs/proxy.md), so the shared cases pass
unchanged; the `ebpf`-only cases at the end check what is specific to it. The
nftables mode keeps its state in the node's `ip corral-<node>` table; the few
cases that look at kernel state read it through the `Env` helpers below. No
timing asserts: cases wait for the state they need and count outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from corral.api.objects import EndpointSlice, Pod, Service
from corral.api.store import Store
from integration.cluster_helpers import wait_for
from integration.clusters import LocalCluster, local_cluster
from integration.podcmd import POD_PYTHON

pytestmark = pytest.mark.slow

MODES = ("iptables", "ebpf", "nftables")
DATAPATHS = ("bpf", "kernel")
NODEPORT = 30480
AFFINITY_NET = "172.31.12"  # extra client addresses on a node's lo (outside every corral range)
EXTERNAL_IP = "172.31.13.10"  # spec.externalIPs (outside every corral range, routed by the test)
LOCAL_NODEPORT = 30481
POLICY_SERVICES = ["prx-local", "prx-itp", "prx-ext", "prx-lb", "prx-lb-local"]
LB_LABEL = "corral.dev/prx-lb"

SERVER = r"""
import os, socket, threading
NAME = os.environ["POD"]
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(1024)
    while True:
        c, a = s.accept()
        try: c.sendall(f"{NAME} {a[0]} {port}\n".encode())
        except OSError: pass
        c.close()
def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        d, a = s.recvfrom(100); s.sendto(f"{NAME} {a[0]} {port}\n".encode(), a)
health = [None]
def serve_health(s):
    while True:
        try: s.accept()[0].close()
        except OSError: return
def set_ready(on):
    if on and health[0] is None:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 8081)); s.listen(64); health[0] = s
        threading.Thread(target=serve_health, args=(s,), daemon=True).start()
    elif not on and health[0] is not None:
        health[0].close(); health[0] = None
def echo_conn(c):
    with c, c.makefile("rw") as f:
        for line in f:
            f.write(f"{NAME} {line.strip()}\n"); f.flush()
def echo(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        threading.Thread(target=echo_conn, args=(s.accept()[0],), daemon=True).start()
for p in (8080, 9090):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
threading.Thread(target=echo, args=(7070,), daemon=True).start()
threading.Thread(target=udp, args=(5353,), daemon=True).start()
set_ready(True)
ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); ctl.bind(("0.0.0.0", 8082))
while True:
    d, a = ctl.recvfrom(100)
    set_ready(d == b"ready"); ctl.sendto(b"ok", a)
"""

# argv: HOST PORT COUNT [tcp|udp|udp1] [SRC,SRC,...]: a JSON list of answers ("ERR:<name>")
# udp1: one socket (one source port) for every datagram, as a DNS client that keeps its port
CLIENT = r"""
import errno, json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kind = sys.argv[4] if len(sys.argv) > 4 else "tcp"
srcs = sys.argv[5].split(",") if len(sys.argv) > 5 and sys.argv[5] else [None]
out = []
def err(e):
    return "ERR:" + (errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__)
keep = None
for i in range(n):
    for src in srcs:
        try:
            if kind == "tcp":
                s = socket.socket(); s.settimeout(3)
                if src: s.bind((src, 0))
                s.connect((host, port)); out.append(s.recv(200).decode().strip()); s.close()
            else:
                if kind == "udp1" and keep is None or kind == "udp":
                    keep = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); keep.settimeout(1)
                    keep.connect((host, port))
                keep.send(b"hi"); out.append(keep.recv(200).decode().strip())
        except OSError as e:
            out.append(err(e))
        if kind == "udp1": time.sleep(0.05)
print(json.dumps(out))
"""

# one long-lived connection: argv HOST PORT WAIT; a line, WAIT seconds, a line (the answers)
HOLD = r"""
import socket, sys, time
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, port), timeout=5); f = s.makefile("rw")
f.write("one\n"); f.flush(); print(f.readline().strip(), flush=True)
time.sleep(wait)
try:
    f.write("two\n"); f.flush(); print(f.readline().strip() or "ERR:closed", flush=True)
except OSError as e:
    print(f"ERR:{e}", flush=True)
"""

# a request loop for the restart case: new connections for SECS seconds, each given 2 s
# (a request takes milliseconds; 2 s is under the 3 s at which TCP would send its SYN a
# third time, so a dropped SYN and its retransmit, or a reply path that hangs, fail)
LOOP = r"""
import errno, json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = fail = 0; errors = []; slowest = 0.0
end = time.monotonic() + secs
while time.monotonic() < end:
    t0 = time.monotonic(); stage = "connect"; s = socket.socket(); s.settimeout(2)
    try:
        s.connect((host, port)); stage = "first byte"
        if not s.recv(100):
            raise OSError(0, "closed without an answer")
        ok += 1; slowest = max(slowest, time.monotonic() - t0)
    except OSError as e:
        fail += 1
        name = errno.errorcode.get(e.errno, "") if e.errno else type(e).__name__
        errors.append(f"{time.time():.2f} {stage} from port {s.getsockname()[1]}: {name} {e}")
    s.close()
    time.sleep(0.02)
print(json.dumps({"ok": ok, "fail": fail, "errors": errors[:5], "slowest": round(slowest, 3)}))
"""


@dataclass
class Env:
    c: LocalCluster
    datapath: str
    mode: str
    servers: dict[str, str]  # pod name -> IP
    client: str
    client_ip: str
    vip: str

    def run(self, coro: Any) -> Any:
        async def go() -> Any:
            async with Store(self.c.etcd_urls, tls=self.c.state().tls("cli")) as s:
                return await coro(s)

        return asyncio.run(go())

    def from_pod(self, pod: str, *args: str) -> list[str]:
        r = self.c.corral("exec", pod, "--", POD_PYTHON, "-c", CLIENT, *args, timeout=180)
        assert r.returncode == 0, r.stderr + r.stdout
        return json.loads(r.stdout.strip().splitlines()[-1])

    def from_host(self, *args: str) -> list[str]:
        """The CLIENT from the host's own underlay address: outside the cluster."""
        r = subprocess.run([sys.executable, "-c", CLIENT, *args], capture_output=True,
                           text=True, timeout=180)  # fmt: skip
        assert r.returncode == 0, r.stderr + r.stdout
        return json.loads(r.stdout.strip().splitlines()[-1])

    def from_ns(self, ns: str, *args: str) -> list[str]:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, *args],
                           capture_output=True, text=True, timeout=180)  # fmt: skip
        assert r.returncode == 0, r.stderr + r.stdout
        return json.loads(r.stdout.strip().splitlines()[-1])

    def from_node(self, node: str, *args: str) -> list[str]:
        r = self.c.exec(node, sys.executable, "-c", CLIENT, *args, timeout=180)
        assert r.returncode == 0, r.stderr + r.stdout
        return json.loads(r.stdout.strip().splitlines()[-1])

    def names(self, answers: list[str]) -> list[str]:
        return [a.split()[0] for a in answers]

    def tell(self, pod: str, what: str) -> None:
        """Make a server NotReady ("notready") or ready again ("ready")."""
        ip = self.servers[pod]
        script = (
            "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2);"
            f"s.sendto(b'{what}', ('{ip}', 8082)); s.recv(10)"
        )
        r = self.c.exec("node-1", sys.executable, "-c", script)
        assert r.returncode == 0, r.stderr

    def endpoint_state(self, svc: str = "prx-web") -> dict[str, bool]:
        """IP -> ready, from the service's EndpointSlice."""

        async def get(s: Store) -> dict[str, bool]:
            sl = await s.get(EndpointSlice, svc, "default")
            if sl is None:
                return {}
            return {e.addresses[0]: bool(e.conditions.ready) for e in sl.endpoints}

        return self.run(get)

    def set_label(self, pod: str, app: str | None) -> None:
        def change(p: Pod) -> Pod:
            p = p.model_copy(deep=True)
            if app is None:
                p.metadata.labels.pop("app", None)
            else:
                p.metadata.labels["app"] = app
            return p

        self.run(lambda s: s.modify(Pod, pod, "default", change))

    def patch_service(self, name: str, **spec: Any) -> None:
        def change(svc: Service) -> Service:
            d = svc.dump()
            d["spec"].update(spec)
            for k, v in list(d["spec"].items()):
                if v is None:
                    del d["spec"][k]
            return Service.model_validate(d)

        self.run(lambda s: s.modify(Service, name, "default", change))

    def ipset_entries(self, node: str) -> int:
        if self.mode == "nftables":
            return sum(len(v) for v in self.nft_affinity(node).values())
        r = self.c.exec(node, "ipset", "list", "-t")
        return sum(
            int(ln.split(":")[1])
            for ln in r.stdout.splitlines()
            if ln.startswith("Number of entries")
        )

    # ------------------------------------------- the proxy's kernel state, per mode

    def nft_table(self, node: str) -> str:
        from corral.proxy.nftrules import table_name

        return table_name(self.c.node(node))

    def nat_rules(self, node: str) -> str:
        """The proxy's NAT rules as text (iptables-save, or the nftables mode's table)."""
        if self.mode == "nftables":
            return self.c.exec(node, "nft", "list", "table", "ip", self.nft_table(node)).stdout
        return self.c.exec(node, "iptables-save", "-t", "nat").stdout

    def dnat_to(self, ip: str, port: int) -> str:
        if self.mode == "nftables":
            return f"dnat to {ip}:{port}"
        return f"--to-destination {ip}:{port}"

    def has_affinity_sets(self, node: str) -> bool:
        if self.mode == "nftables":
            return "set aff-" in self.nat_rules(node)
        return "CORRAL-AFF-" in self.c.exec(node, "ipset", "list", "-n").stdout

    def nft_affinity(self, node: str) -> dict[str, dict[str, int]]:
        """set -> client -> seconds left, from the nftables mode's table."""
        r = self.c.exec(node, "nft", "-j", "list", "table", "ip", self.nft_table(node))
        out: dict[str, dict[str, int]] = {}
        for o in json.loads(r.stdout or "{}").get("nftables", []):
            st = o.get("set")
            if st and st["name"].startswith("aff-"):
                out[st["name"]] = {
                    e["elem"]["val"]: int(e["elem"]["expires"]) for e in st.get("elem", [])
                }
        return out

    def affinity_left(self, node: str, client: str) -> list[int]:
        """Seconds left (iptables: the entry's timeout) of `client`'s affinity entries."""
        if self.mode == "nftables":
            return [v[client] for v in self.nft_affinity(node).values() if client in v]
        r = self.c.exec(node, "ipset", "list")
        return [
            int(ln.split()[2])
            for ln in r.stdout.splitlines()
            if ln.startswith(f"{client} timeout ")
        ]

    def flush_by_hand(self, node: str) -> None:
        if self.mode == "nftables":
            self.c.exec(node, "nft", "flush", "table", "ip", self.nft_table(node), check=True)
            assert "dnat to" not in self.nat_rules(node)
        else:
            self.c.exec(node, "iptables", "-t", "nat", "-F", check=True)
            assert "-A CORRAL-SVC-" not in self.nat_rules(node)


def _server(name: str, node: str) -> Pod:
    probe = {"tcpSocket": {"port": 8081}, "periodSeconds": 1, "failureThreshold": 1}
    return Pod(
        metadata={"name": name, "labels": {"app": "prx-web", "self": name}},
        spec={
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "srv",
                    "command": [POD_PYTHON, "-c", SERVER],
                    "env": [{"name": "POD", "value": name}],
                    "ports": [
                        {"name": "web", "containerPort": 8080},
                        {"name": "alt", "containerPort": 9090},
                        {"name": "dns", "containerPort": 5353, "protocol": "UDP"},
                    ],
                    "readinessProbe": probe,
                }
            ],
        },
    )


def _service(name: str, selector: dict[str, str], **spec: Any) -> Service:
    base: dict[str, Any] = {
        "selector": selector,
        "ports": [
            {"name": "http", "port": 80, "targetPort": "web"},
            {"name": "alt", "port": 90, "targetPort": 9090},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        ],
    }
    base.update(spec)
    return Service(metadata={"name": name}, spec=base)


@contextlib.contextmanager
def _datapath_env(datapath: str, mode: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("CORRAL_DATAPATH", "CORRAL_PROXY_MODE")}
    os.environ["CORRAL_DATAPATH"] = datapath
    os.environ["CORRAL_PROXY_MODE"] = mode
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _reused(state_dir: str) -> Iterator[LocalCluster]:
    """A cluster someone else started (`corral up`), for iterating on this module."""
    name = os.path.basename(os.path.abspath(state_dir))
    env = dict(os.environ, CORRAL_STATE_DIR=os.path.dirname(state_dir), CORRAL_CLUSTER=name)
    env.pop("CORRAL_ETCD", None)
    c = LocalCluster.from_state(state_dir, env)
    try:
        yield c
    finally:

        async def clean(st: Store) -> None:
            for kind, names in (
                (Pod, [f"prx-srv-{i}" for i in range(3)] + ["prx-client"]),
                (Service, ["prx-web", "prx-none", "prx-self", "prx-again", *POLICY_SERVICES]),
            ):
                for n in names:
                    with contextlib.suppress(Exception):
                        await st.delete(kind, n, "default")

        async def go() -> None:
            async with Store(c.etcd_urls, tls=c.state().tls("cli")) as st:
                await clean(st)

        asyncio.run(go())  # fmt: skip


# iptables on both datapaths (the fast path must keep DNATed replies on the kernel
# path); ebpf on the default fast path only: its pods reach backends by their own IPs,
# and the rules it keeps for NodePort and host traffic are the iptables mode's, which
# the kernel-datapath run covers (one cluster less in `make test`'s budget)
COMBOS = [("iptables", "bpf"), ("iptables", "kernel"), ("ebpf", "bpf"), ("nftables", "bpf")]


@pytest.fixture(scope="module", params=COMBOS, ids=str)
def env(request: Any) -> Iterator[Env]:
    mode, datapath = request.param
    reuse = os.environ.get("CORRAL_PROXY_TEST_REUSE")  # dev: a running cluster's state dir
    if reuse and (
        datapath != DATAPATHS[0] or mode != os.environ.get("CORRAL_PROXY_MODE", MODES[0])
    ):
        pytest.skip("CORRAL_PROXY_TEST_REUSE runs one datapath and the mode of $CORRAL_PROXY_MODE")
    opened = _reused(reuse) if reuse else local_cluster(3, "--dns-replicas", "0")
    with _datapath_env(datapath, mode), opened as c:
        e = Env(c, datapath, mode, {}, "prx-client", "", "")
        pods = [_server(f"prx-srv-{i}", c.nodes[i]) for i in range(3)]
        pods.append(
            Pod(
                metadata={"name": e.client},
                spec={
                    "nodeName": c.nodes[0],
                    "containers": [{"name": "c", "command": ["sleep", "infinity"]}],
                },
            )
        )

        async def create(s: Store) -> None:
            for p in pods:
                await s.create(p)
            await s.create(
                _service("prx-web", {"app": "prx-web"}, type="NodePort",
                         ports=[{"name": "http", "port": 80, "targetPort": "web",
                                 "nodePort": NODEPORT},
                                {"name": "alt", "port": 90, "targetPort": 9090},
                                {"name": "echo", "port": 70, "targetPort": 7070},
                                {"name": "dns", "port": 53, "protocol": "UDP",
                                 "targetPort": 5353}])
            )  # fmt: skip

        e.run(create)

        async def state(s: Store) -> tuple[dict[str, str], str, str] | None:
            got = {}
            for p in pods:
                pod = await s.get(Pod, p.name, "default")
                if pod is None or not pod.status.pod_ip or pod.status.phase != "Running":
                    return None
                if p.name != e.client and not pod.ready:
                    return None
                got[p.name] = pod.status.pod_ip
            svc = await s.get(Service, "prx-web", "default")
            if svc is None or not svc.spec.cluster_ip:
                return None
            return got, got.pop(e.client), svc.spec.cluster_ip

        e.servers, e.client_ip, e.vip = wait_for(lambda: e.run(state), "pods and service up")
        wait_for(lambda: sum(e.endpoint_state().values()) == 3, "three ready endpoints")
        wait_for(
            lambda: set(e.names(e.from_pod(e.client, e.vip, "80", "20"))) == set(e.servers),
            "every server reachable through the VIP",
        )
        if datapath == "bpf":
            info = json.loads(c.exec("node-1", "cat", "/run/corral/datapath.json").stdout)
            assert info["datapath"] == "bpf", info
        yield e


# ---------------------------------------------------------------- cases


def test_random_spread_preserves_client_ip_and_multiport(env: Env) -> None:
    answers = env.from_pod(env.client, env.vip, "80", "300")
    assert not [a for a in answers if a.startswith("ERR")], answers
    counts = Counter(env.names(answers))
    # uniform over 3: mean 100, sd ~8.2; these bounds are ~6 sd wide
    assert set(counts) == set(env.servers) and all(50 <= n <= 150 for n in counts.values()), counts
    # the backend sees the client pod's own address (no SNAT), on the named targetPort
    assert {tuple(a.split()[1:]) for a in answers} == {(env.client_ip, "8080")}
    alt = env.from_pod(env.client, env.vip, "90", "15")
    assert {tuple(a.split()[1:]) for a in alt} == {(env.client_ip, "9090")}
    udp = env.from_pod(env.client, env.vip, "53", "15", "udp")
    assert {tuple(a.split()[1:]) for a in udp} == {(env.client_ip, "5353")}


def test_nodeport_from_another_node(env: Env) -> None:
    n1 = env.c.ips[env.c.nodes[0]]
    answers = env.from_node("node-3", n1, str(NODEPORT), "30")
    assert not [a for a in answers if a.startswith("ERR")], answers
    assert len(set(env.names(answers))) >= 2  # load-balanced, not just the local pod
    own = env.from_node("node-2", env.c.ips[env.c.nodes[1]], str(NODEPORT), "5")
    assert not [a for a in own if a.startswith("ERR")], own


def test_no_endpoints_rejects_at_once(env: Env) -> None:
    env.run(lambda s: s.create(_service("prx-none", {"app": "prx-nobody"})))
    try:
        vip = wait_for(
            lambda: (
                (svc := env.run(lambda s: s.get(Service, "prx-none", "default")))
                and svc.spec.cluster_ip
            ),
            "a VIP for prx-none",
        )
        wait_for(
            lambda: env.from_pod(env.client, vip, "80", "1") == ["ERR:ECONNREFUSED"],
            "connections to a service without endpoints to be refused",
            timeout=30,
        )
        assert env.from_pod(env.client, vip, "80", "5") == ["ERR:ECONNREFUSED"] * 5
        # UDP: ICMP port unreachable, which the kernel rate-limits per client (1/s, burst 6)
        wait_for(
            lambda: env.from_pod(env.client, vip, "53", "1", "udp") == ["ERR:ECONNREFUSED"],
            "UDP to a service without endpoints to be refused",
            timeout=30,
        )
    finally:
        env.run(lambda s: s.delete(Service, "prx-none", "default"))


def test_hairpin_reaches_itself(env: Env) -> None:
    env.run(lambda s: s.create(_service("prx-self", {"self": "prx-srv-1"})))
    try:
        vip = wait_for(
            lambda: (
                (svc := env.run(lambda s: s.get(Service, "prx-self", "default")))
                and svc.spec.cluster_ip
            ),
            "a VIP for prx-self",
        )
        got = wait_for(
            lambda: (
                (a := env.from_pod("prx-srv-1", vip, "80", "3"))
                and not any(x.startswith("ERR") for x in a)
                and a
            ),
            "the pod to reach itself through its service",
            timeout=30,
        )
        assert set(env.names(got)) == {"prx-srv-1"}
    finally:
        env.run(lambda s: s.delete(Service, "prx-self", "default"))


def test_udp_and_tcp_fail_over_when_an_endpoint_goes(env: Env) -> None:
    """UDP from one source port moves at once (its conntrack entry is deleted)."""
    first = env.names(env.from_pod(env.client, env.vip, "53", "1", "udp1"))[0]
    assert first in env.servers
    # a client that keeps its source port keeps its endpoint while it stays
    script_args = (env.vip, "53", "200", "udp1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "exec", env.client, "--", POD_PYTHON, "-c", CLIENT,
         *script_args],
        env=env.c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(2.0)  # the loop (~10 s) is under way, stuck to `first`
        env.set_label(first, None)
        out, _err = proc.communicate(timeout=120)
        answers = json.loads(out.strip().splitlines()[-1])
        names = [a.split()[0] for a in answers if not a.startswith("ERR")]
        assert names
        moved = [n for n in names if n != first]
        assert moved, f"the UDP client never left {first}: {Counter(names)}"
        # once moved it stays on its new endpoint: it never came back to the removed one
        assert first not in names[names.index(moved[0]) :]
        tcp = env.names(env.from_pod(env.client, env.vip, "80", "30"))
        assert first not in tcp and len(tcp) == 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        env.set_label(first, "prx-web")
        wait_for(lambda: sum(env.endpoint_state().values()) == 3, "three ready endpoints again")


def test_established_connection_outlives_its_endpoint_going_notready(env: Env) -> None:
    """A NotReady endpoint gets no new connections; its open ones go on (conntrack),
    also when its replies come back over the fast path (a pod on another node)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "exec", env.client, "--", POD_PYTHON, "-c", HOLD,
         env.vip, "70", "20"],
        env=env.c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    victim = None
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first and first[1:] == ["one"], first
        victim = first[0]
        env.tell(victim, "notready")
        ip = env.servers[victim]
        wait_for(lambda: env.endpoint_state().get(ip) is False, "NotReady", timeout=10)
        wait_for(
            lambda: env.dnat_to(ip, 7070) not in env.nat_rules("node-1"),
            "the proxy to stop sending new connections to it", timeout=10,
        )  # fmt: skip
        out, err = proc.communicate(timeout=60)
        assert out.split() == [victim, "two"], (out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if victim:
            env.tell(victim, "ready")
            wait_for(lambda: sum(env.endpoint_state().values()) == 3, "ready again")


def test_client_ip_affinity_200_clients_timeout_notready_and_switching(env: Env) -> None:
    node = "node-2"
    srcs = [f"{AFFINITY_NET}.{i}" for i in range(1, 201)]
    for ip in srcs:
        env.c.exec(node, "ip", "addr", "add", f"{ip}/32", "dev", "lo", check=True)
    try:
        env.patch_service(
            "prx-web",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 3600}},
        )
        wait_for(
            lambda: env.has_affinity_sets(node),
            "affinity sets on node-2",
            timeout=30,
        )
        # every one of 200 clients sticks to one endpoint over 3 rounds
        answers = env.from_node(node, env.vip, "80", "3", "tcp", ",".join(srcs))
        assert not [a for a in answers if a.startswith("ERR")]
        by_client: dict[int, set[str]] = {}
        for i, a in enumerate(answers):
            by_client.setdefault(i % len(srcs), set()).add(a.split()[0])
        assert all(len(v) == 1 for v in by_client.values()), by_client
        spread = Counter(next(iter(v)) for v in by_client.values())
        assert set(spread) == set(env.servers), spread
        assert env.ipset_entries(node) >= 200  # more than xt_recent's 100 remembered
        # an endpoint goes NotReady: its clients move at once, and stick to their new one
        victim = spread.most_common(1)[0][0]
        mine = [srcs[i] for i, v in by_client.items() if next(iter(v)) == victim]
        env.tell(victim, "notready")
        wait_for(lambda: env.endpoint_state().get(env.servers[victim]) is False, "NotReady")
        wait_for(
            lambda: victim not in env.names(env.from_node(node, env.vip, "80", "1", "tcp",
                                                          ",".join(mine))),
            "the NotReady endpoint's clients to move", timeout=30,
        )  # fmt: skip
        again = env.from_node(node, env.vip, "80", "2", "tcp", ",".join(mine))
        assert victim not in env.names(again)
        moved: dict[int, set[str]] = {}
        for i, a in enumerate(again):
            moved.setdefault(i % len(mine), set()).add(a.split()[0])
        assert all(len(v) == 1 for v in moved.values()), moved
        env.tell(victim, "ready")
        wait_for(lambda: sum(env.endpoint_state().values()) == 3, "ready again")
        # a short timeout: a client's entry expires once it is idle that long
        env.patch_service(
            "prx-web",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 2}},
        )
        one = srcs[0]

        def remembered() -> bool:
            return bool(env.affinity_left(node, one))

        def fresh_entry() -> bool:
            env.from_node(node, env.vip, "80", "1", "tcp", one)
            return any(left <= 2 for left in env.affinity_left(node, one))

        wait_for(fresh_entry, "an entry with the short timeout", timeout=30)
        wait_for(lambda: not remembered(), "the idle client's entry to expire", timeout=30)
        # affinity off: one client spreads again, and the sets are gone
        env.patch_service("prx-web", sessionAffinity="None", sessionAffinityConfig=None)
        wait_for(
            lambda: not env.has_affinity_sets(node),
            "the affinity sets to go",
            timeout=30,
        )
        spread_one = env.names(env.from_node(node, env.vip, "80", "30", "tcp", one))
        assert len(set(spread_one)) >= 2, spread_one
    finally:
        env.patch_service("prx-web", sessionAffinity="None", sessionAffinityConfig=None)
        for ip in srcs:
            env.c.exec(node, "ip", "addr", "del", f"{ip}/32", "dev", "lo")


def test_service_deleted_and_recreated(env: Env) -> None:
    env.run(lambda s: s.create(_service("prx-again", {"app": "prx-web"})))
    try:
        vip = wait_for(
            lambda: (
                (svc := env.run(lambda s: s.get(Service, "prx-again", "default")))
                and svc.spec.cluster_ip
            ),
            "a VIP for prx-again",
        )
        wait_for(
            lambda: not any(x.startswith("ERR") for x in env.from_pod(env.client, vip, "80", "3")),
            "prx-again to answer",
            timeout=30,
        )
        env.run(lambda s: s.delete(Service, "prx-again", "default"))
        wait_for(
            lambda: vip not in env.nat_rules("node-1"),
            "prx-again's rules to go",
            timeout=30,
        )
        env.run(lambda s: s.create(_service("prx-again", {"app": "prx-web"}, clusterIP=vip)))
        wait_for(
            lambda: not any(x.startswith("ERR") for x in env.from_pod(env.client, vip, "80", "3")),
            "the recreated prx-again to answer",
            timeout=30,
        )
    finally:
        with contextlib.suppress(Exception):
            env.run(lambda s: s.delete(Service, "prx-again", "default"))


def test_repair_after_a_flush_by_hand(env: Env) -> None:
    env.flush_by_hand("node-1")
    wait_for(
        lambda: (
            len(env.names(a := env.from_pod(env.client, env.vip, "80", "10"))) == 10
            and not any(x.startswith("ERR") for x in a)
        ),
        "the proxy to repair the flushed rules",
        timeout=60,
    )


def test_restart_of_the_proxy_under_a_request_loop(env: Env) -> None:
    c = env.c
    node = c.nodes[0]
    proxy = next(d for d in c.state().daemons if d.role == "daemon:proxy" and d.node == node)
    loop = subprocess.Popen(
        [sys.executable, "-m", "corral", "exec", env.client, "--", POD_PYTHON, "-c", LOOP,
         env.vip, "80", "25"],
        env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3)  # the loop is under way
        t_kill = time.time()
        os.kill(proxy.pid, signal.SIGTERM)
        from corral.node.procs import start_time

        wait_for(lambda: start_time(proxy.pid) is None, "the proxy to stop", timeout=30)
        up = c.up_again()
        assert up.returncode == 0, up.stderr + up.stdout
        new = next(d for d in c.state().daemons if d.role == "daemon:proxy" and d.node == node)
        assert new.pid != proxy.pid
        out, _err = loop.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        if result["fail"]:
            # what the kernel made of the failed flows (unanswered ones stay ~2 min) and
            # what the proxy did meanwhile
            ct = c.exec(node, "conntrack", "-L", "-p", "tcp", "--orig-dst", env.vip,
                        "--state", "SYN_SENT").stdout  # fmt: skip
            log = c.log("proxy", node)[-3000:]
            pytest.fail(
                f"{result}; SIGTERM at {t_kill:.2f}\nconntrack:\n{ct}\nproxy log:\n{log}\n"
                f"corral up:\n{up.stdout}"
            )
        assert result["ok"] > 50
        assert c.log("proxy", node).count("proxy programmed") >= 2
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()


# ---------------------------------------------------------------- traffic policies, externalIPs


def _http_get(host: str, port: int) -> tuple[int, dict[str, Any]] | None:
    """(status, JSON body) of GET / from the host, None when nothing answers."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _create_service(env: Env, svc: Service) -> Service:
    env.run(lambda s: s.create(svc))
    return wait_for(
        lambda: (
            (got := env.run(lambda s: s.get(Service, svc.name, "default")))
            and got.spec.cluster_ip
            and (got.spec.type == "ClusterIP" or all(p.node_port for p in got.spec.ports))
            and got
        ),
        f"addresses for {svc.name}",
    )


def _delete_service(env: Env, name: str) -> None:
    with contextlib.suppress(Exception):
        env.run(lambda s: s.delete(Service, name, "default"))


def _ok(answers: list[str]) -> bool:
    return bool(answers) and not any(a.startswith("ERR") for a in answers)


def test_external_traffic_policy_local_and_health_check_from_outside(env: Env) -> None:
    """NodePort from the host (an outside client): Local keeps the client's address and
    only the node with an endpoint answers; its healthCheckNodePort says 200 (count)
    there and 503 elsewhere; Cluster works from every node, masqueraded."""
    if env.datapath == "kernel":
        pytest.skip("the overlay datapath does not change this; iptables+bpf covers it")
    host = env.c.state().host_ip
    n1, n2, n3 = (env.c.ips[n] for n in env.c.nodes)
    port = {"name": "http", "port": 80, "targetPort": "web", "nodePort": LOCAL_NODEPORT}
    svc = _create_service(env, _service("prx-local", {"self": "prx-srv-1"}, type="LoadBalancer",
                                        externalTrafficPolicy="Local", ports=[port]))  # fmt: skip
    try:
        hc = svc.spec.health_check_node_port
        assert hc and hc != LOCAL_NODEPORT
        wait_for(lambda: _ok(env.from_host(n2, str(LOCAL_NODEPORT), "1")), "Local NodePort")
        answers = env.from_host(n2, str(LOCAL_NODEPORT), "10")
        # the server on node-2 saw the host's own address: no SNAT on the way
        assert {tuple(a.split()[:2]) for a in answers} == {("prx-srv-1", host)}, answers
        # node-1 and node-3 have no local endpoint: dropped (a timeout, not a refusal)
        assert env.from_host(n1, str(LOCAL_NODEPORT), "1") == ["ERR:TimeoutError"]
        assert env.from_host(n3, str(LOCAL_NODEPORT), "1") == ["ERR:TimeoutError"]
        want = {"service": {"namespace": "default", "name": "prx-local"}, "localEndpoints": 1,
                "serviceProxyHealthy": True}  # fmt: skip
        assert wait_for(lambda: _http_get(n2, hc), "the health check on node-2") == (200, want)
        for n in (n1, n3):
            got = wait_for(lambda n=n: _http_get(n, hc), "the health check elsewhere")
            assert got[0] == 503 and got[1]["localEndpoints"] == 0, got
        # pods reach a Local NodePort on any node (kube-proxy sends them cluster-wide)
        assert _ok(env.from_pod(env.client, n1, str(LOCAL_NODEPORT), "3"))
        # Cluster (prx-web): every node answers from outside; the server sees a node address
        for n in (n1, n2, n3):
            got = env.from_host(n, str(NODEPORT), "6")
            assert _ok(got), got
            assert host not in {a.split()[1] for a in got}, got
    finally:
        _delete_service(env, "prx-local")


def test_internal_traffic_policy_local(env: Env) -> None:
    """In-cluster traffic to the ClusterIP stays on the client's node; none there: dropped."""
    if env.datapath == "kernel":
        pytest.skip("the overlay datapath does not change this; iptables+bpf covers it")
    svc = _create_service(env, _service("prx-itp", {"app": "prx-web"},
                                        internalTrafficPolicy="Local"))  # fmt: skip
    vip = svc.spec.cluster_ip
    try:
        wait_for(lambda: _ok(env.from_pod(env.client, vip, "80", "1")), "prx-itp to answer")
        # the client on node-1: only node-1's server, however many tries
        assert set(env.names(env.from_pod(env.client, vip, "80", "20"))) == {"prx-srv-0"}
        assert set(env.names(env.from_pod("prx-srv-2", vip, "80", "10"))) == {"prx-srv-2"}
        if env.mode == "ebpf":  # translated in the socket: no flow to the VIP in conntrack
            env.c.exec("node-1", "conntrack", "-F")
            assert _ok(env.from_pod(env.client, vip, "80", "3"))
            ct = env.c.exec("node-1", "conntrack", "-L", "-p", "tcp", "--orig-dst", vip).stdout
            assert f"src={env.client_ip} " not in ct, ct
        # node-1's server NotReady: node-1 has no local endpoint, the client is dropped
        # while node-2's pods still reach theirs
        env.tell("prx-srv-0", "notready")
        wait_for(lambda: env.endpoint_state("prx-itp").get(env.servers["prx-srv-0"]) is False,
                 "NotReady")  # fmt: skip
        wait_for(lambda: env.from_pod(env.client, vip, "80", "1") == ["ERR:TimeoutError"],
                 "the client without a local endpoint to be dropped", timeout=60)  # fmt: skip
        assert set(env.names(env.from_pod("prx-srv-1", vip, "80", "5"))) == {"prx-srv-1"}
    finally:
        env.tell("prx-srv-0", "ready")
        _delete_service(env, "prx-itp")
        wait_for(lambda: sum(env.endpoint_state().values()) == 3, "ready again")


@contextlib.contextmanager
def _outside_client(env: Env, via: str) -> Iterator[tuple[str, str]]:
    """A namespace on the underlay bridge (not a node, not a pod, not the host), its
    address in the underlay network and a route for EXTERNAL_IP via the node `via`:
    the router an operator points at the node for spec.externalIPs. (ns, address)."""
    import ipaddress
    import secrets

    st = env.c.state()
    ns = f"{st.name}-oc{secrets.token_hex(2)}"
    net = ipaddress.ip_network(st.underlay_cidr)
    addr = str(net.network_address + net.num_addresses - 10)
    ul = st.underlay_netns
    sh = [
        ["ip", "netns", "add", ns],
        ["ip", "netns", "exec", ul, "ip", "link", "add", f"{ns[-6:]}u", "type", "veth", "peer",
         "name", "eth0", "netns", ns],
        ["ip", "netns", "exec", ul, "ip", "link", "set", f"{ns[-6:]}u", "master", "br0", "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"],
        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ["ip", "netns", "exec", ns, "ip", "route", "add", f"{EXTERNAL_IP}/32", "via", via],
    ]  # fmt: skip
    try:
        for argv in sh:
            subprocess.run(argv, check=True, capture_output=True, text=True)
        yield ns, addr
    finally:
        subprocess.run(["ip", "netns", "exec", ul, "ip", "link", "del", f"{ns[-6:]}u"],
                       capture_output=True)  # fmt: skip
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("policy", ["Cluster", "Local"])
def test_external_ips_from_outside_and_from_pods(env: Env, policy: str) -> None:
    if env.datapath == "kernel":
        pytest.skip("the overlay datapath does not change this; iptables+bpf covers it")
    n2 = env.c.ips[env.c.nodes[1]]
    _create_service(env, _service("prx-ext", {"app": "prx-web"}, externalIPs=[EXTERNAL_IP],
                                  externalTrafficPolicy=policy))  # fmt: skip
    try:
        with _outside_client(env, via=n2) as (ns, addr):
            wait_for(lambda: _ok(env.from_ns(ns, EXTERNAL_IP, "80", "1")), "the external IP")
            got = env.from_ns(ns, EXTERNAL_IP, "80", "30")
            assert _ok(got), got
            names, sources = set(env.names(got)), {a.split()[1] for a in got}
            if policy == "Local":  # node-2's endpoint only, the client's address kept
                assert (names, sources) == ({"prx-srv-1"}, {addr}), got
            else:  # spread over the cluster, masqueraded
                assert len(names) >= 2 and addr not in sources, got
            # UDP too, on the service port
            udp = env.from_ns(ns, EXTERNAL_IP, "53", "3", "udp")
            assert _ok(udp), udp
        # from a pod (its node DNATs the external IP): every endpoint, both policies
        got = env.from_pod(env.client, EXTERNAL_IP, "80", "20")
        assert _ok(got) and len(set(env.names(got))) >= 2, got
    finally:
        _delete_service(env, "prx-ext")


def _lb_ip(env: Env, name: str) -> str:
    def get() -> str | None:
        svc = env.run(lambda s: s.get(Service, name, "default"))
        ing = svc.status.load_balancer.ingress if svc else []
        return ing[0].get("ip") if ing else None

    return wait_for(get, f"a LoadBalancer address for {name}")


def _holders(env: Env, ip: str) -> list[str]:
    """Nodes whose lo holds `ip` (the announcer's mechanism)."""
    lo = {n: env.c.exec(n, "ip", "-4", "-o", "addr", "show", "dev", "lo").stdout
          for n in env.c.nodes}  # fmt: skip
    return [n for n in env.c.nodes if f" {ip}/32 " in lo[n]]


def _set_node_label(env: Env, node: str, value: str | None) -> None:
    from corral.api.objects import Node

    def change(n: Node) -> Node:
        n = n.model_copy(deep=True)
        if value is None:
            n.metadata.labels.pop(LB_LABEL, None)
        else:
            n.metadata.labels[LB_LABEL] = value
        return n

    env.run(lambda s: s.modify(Node, node, None, change))


def _node_ready(env: Env, node: str) -> bool:
    from corral.api.objects import Node

    n = env.run(lambda s: s.get(Node, node))
    return n is not None and n.ready


def test_loadbalancer_from_outside_local_policy_and_failover(env: Env) -> None:
    """A LoadBalancer Service gets an address from the pool, one node (of those the pool
    selects) answers ARP for it, the host reaches it; with Local only a node with an
    endpoint announces; the announcer unplugged, another takes over (gratuitous ARP)."""
    import ipaddress

    from corral.api.objects import LoadBalancerPool

    if env.datapath == "kernel":
        pytest.skip("the overlay datapath does not change this; iptables+bpf covers it")
    st = env.c.state()
    net = ipaddress.ip_network(st.underlay_cidr)
    cidr = str(ipaddress.ip_network(f"{net.network_address + net.num_addresses - 48}/28"))
    pool = LoadBalancerPool(metadata={"name": "prx-pool"},
                            spec={"cidrs": [cidr], "nodeSelector": {LB_LABEL: "yes"}})  # fmt: skip
    _n1, n2, n3 = env.c.nodes
    for n in (n2, n3):
        _set_node_label(env, n, "yes")
    env.run(lambda s: s.create(pool))
    unplugged = None
    try:
        http = [{"name": "http", "port": 80, "targetPort": "web"}]
        _create_service(env, _service("prx-lb", {"self": "prx-srv-0"}, type="LoadBalancer",
                                      ports=http))  # fmt: skip
        _create_service(env, _service("prx-lb-local", {"self": "prx-srv-2"}, type="LoadBalancer",
                                      externalTrafficPolicy="Local", ports=http))  # fmt: skip
        ip, ip_local = _lb_ip(env, "prx-lb"), _lb_ip(env, "prx-lb-local")
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(cidr) and ip != ip_local
        r = env.c.corral("get", "svc", "prx-lb")
        assert ip in r.stdout, r.stdout  # EXTERNAL-IP
        # exactly one announcer, among the nodes the pool selects
        holders = wait_for(lambda: (h := _holders(env, ip)) and h, "an announcer")
        assert len(holders) == 1 and holders[0] in (n2, n3), holders
        # Local: only node-3, the one with prx-lb-local's endpoint, may announce
        assert wait_for(lambda: _holders(env, ip_local), "the Local announcer") == [n3]
        host = st.host_ip
        wait_for(lambda: _ok(env.from_host(ip, "80", "1")), "the LoadBalancer from the host")
        got = env.from_host(ip, "80", "10")
        assert set(env.names(got)) == {"prx-srv-0"}, got
        local = env.from_host(ip_local, "80", "5")
        assert {tuple(a.split()[:2]) for a in local} == {("prx-srv-2", host)}, local
        # failover: the announcer leaves the network (its link on the underlay goes down)
        announcer = holders[0]
        survivor = n3 if announcer == n2 else n2
        peer = f"n{env.c.nodes.index(announcer) + 1}"
        cap = subprocess.Popen(
            ["ip", "netns", "exec", st.underlay_netns, "tcpdump", "-l", "-n", "-e", "-i", "br0",
             "arp", "and", "host", ip],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            subprocess.run(["ip", "netns", "exec", st.underlay_netns, "ip", "link", "set", peer,
                            "down"], check=True)  # fmt: skip
            unplugged = peer
            t0 = time.monotonic()
            # its speaker key's lease runs out (seconds; long before the node is NotReady);
            # the unplugged one keeps its own address: its proxy cannot hear of anything
            wait_for(lambda: survivor in _holders(env, ip), "the survivor to take the address",
                     timeout=60)  # fmt: skip
            took = time.monotonic() - t0
            got = wait_for(lambda: (a := env.from_host(ip, "80", "5")) and _ok(a) and a,
                           "the LoadBalancer through the new announcer", timeout=30)  # fmt: skip
            assert set(env.names(got)) == {"prx-srv-0"}
        finally:
            time.sleep(1)
            cap.terminate()
            arp, _ = cap.communicate(timeout=10)
        link = env.c.exec(survivor, "ip", "-o", "link", "show", "eth0").stdout.split()
        mac = link[link.index("link/ether") + 1]
        garp = [ln for ln in arp.splitlines() if f" {mac} > " in ln and
                (f"who-has {ip} tell {ip}" in ln or f"Reply {ip} is-at {mac}" in ln)]  # fmt: skip
        assert garp, arp
        print(f"LoadBalancer failover: the survivor held the address {took:.1f}s after the unplug")
        # the host's neighbour entry follows (read only)
        neigh = subprocess.run(["ip", "neigh", "show", ip], capture_output=True, text=True)
        assert mac in neigh.stdout, neigh.stdout
    finally:
        if unplugged:
            subprocess.run(["ip", "netns", "exec", st.underlay_netns, "ip", "link", "set",
                            unplugged, "up"], check=False)  # fmt: skip
        for name in ("prx-lb", "prx-lb-local"):
            _delete_service(env, name)
        with contextlib.suppress(Exception):
            env.run(lambda s: s.delete(LoadBalancerPool, "prx-pool"))
        for n in env.c.nodes:
            with contextlib.suppress(Exception):
                _set_node_label(env, n, None)
        for n in env.c.nodes:
            wait_for(lambda n=n: _node_ready(env, n), f"{n} Ready again", timeout=120)


# ---------------------------------------------------------------- eBPF mode only


def _ebpf_left(env: Env, node: str) -> tuple[list[str], list[str]]:
    """(corral programs on the node's cgroup, the proxy's pinned maps) on the host's view."""
    from corral.ebpf import loader, proxy_sock
    from corral.proxy.ebpf import node_cgroup

    full = env.c.node(node)
    progs = sorted(p.name for p in loader.cgroup_programs(node_cgroup(full)))
    return progs, [m for m in loader.pinned(full) if m in proxy_sock.MAPS]


def _stop_proxy(env: Env, node: str) -> None:
    from corral.node.procs import start_time

    full = env.c.node(node)
    proxy = next(d for d in env.c.state().daemons if d.role == "daemon:proxy" and d.node == full)
    os.kill(proxy.pid, signal.SIGTERM)
    wait_for(lambda: start_time(proxy.pid) is None, "the proxy to stop", timeout=30)


def _up_with_mode(env: Env, mode: str) -> None:
    c = env.c
    r = subprocess.run(
        [sys.executable, "-m", "corral", "up", "--name", c.name, "--nodes", str(len(c.nodes)),
         "--underlay-cidr", c.underlay_cidr, "--wait", "120"],
        env=dict(c.env, CORRAL_PROXY_MODE=mode), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout


def _reaches(env: Env) -> bool:
    a = env.from_pod(env.client, env.vip, "80", "5")
    return len(a) == 5 and not any(x.startswith("ERR") for x in a)


def test_ebpf_pods_translated_in_the_socket_host_processes_not(env: Env) -> None:
    if env.mode != "ebpf":
        pytest.skip("eBPF mode only")
    progs, pins = _ebpf_left(env, "node-1")
    assert progs == ["corral_conn4", "corral_peer4", "corral_recv4", "corral_send4"], progs
    from corral.ebpf import proxy_sock

    assert sorted(pins) == sorted(proxy_sock.MAPS)
    env.c.exec("node-1", "conntrack", "-F")
    answers = env.from_pod(env.client, env.vip, "80", "20")
    assert not [a for a in answers if a.startswith("ERR")], answers
    # the pod's packets carried the backend's address: no flow to the VIP from the pod
    ct = env.c.exec("node-1", "conntrack", "-L", "-p", "tcp", "--orig-dst", env.vip).stdout
    assert f"src={env.client_ip} " not in ct, ct
    # a process outside the node's cgroup (the node's own) is not translated by the
    # programs: it reaches the service through the DNAT rules, a flow to the VIP
    host = env.from_node("node-1", env.vip, "80", "3")
    assert not [a for a in host if a.startswith("ERR")], host
    ct = env.c.exec("node-1", "conntrack", "-L", "-p", "tcp", "--orig-dst", env.vip).stdout
    assert f"dst={env.vip} " in ct, ct


def test_ebpf_mode_switch_and_cleanup_leave_nothing_behind(env: Env) -> None:
    """Last: it restarts node-1's proxy in the iptables mode, cleans up, and back."""
    if env.mode != "ebpf":
        pytest.skip("eBPF mode only")
    try:
        _stop_proxy(env, "node-1")
        _up_with_mode(env, "iptables")
        wait_for(lambda: _ebpf_left(env, "node-1") == ([], []), "no eBPF program or pin left")
        wait_for(lambda: _reaches(env), "the service through the iptables mode")
        _stop_proxy(env, "node-1")
        full = env.c.node("node-1")
        r = env.c.exec("node-1", sys.executable, "-m", "corral", "proxy", "--cleanup",
                       "--node", full)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert _ebpf_left(env, "node-1") == ([], [])
        nat = env.c.exec("node-1", "iptables-save", "-t", "nat").stdout
        assert "CORRAL-SVC-" not in nat and "CORRAL-SERVICES" not in nat
    finally:
        _up_with_mode(env, "ebpf")
    wait_for(lambda: len(_ebpf_left(env, "node-1")[0]) == 4, "the eBPF programs back")
    wait_for(lambda: _reaches(env), "the service through the eBPF mode again")


# ---------------------------------------------------------------- nftables mode only


def test_nftables_mode_switch_and_cleanup_leave_nothing_behind(env: Env) -> None:
    """Last: node-1's proxy to the iptables mode (no nftables table left), back to
    nftables (no CORRAL- chain left), then --cleanup removes the table."""
    if env.mode != "nftables":
        pytest.skip("nftables mode only")
    table = env.nft_table("node-1")

    def tables() -> str:
        return env.c.exec("node-1", "nft", "list", "tables").stdout

    assert f"table ip {table}" in tables()
    try:
        _stop_proxy(env, "node-1")
        _up_with_mode(env, "iptables")
        wait_for(lambda: f"table ip {table}" not in tables(), "no nftables table left")
        wait_for(lambda: _reaches(env), "the service through the iptables mode")
        _stop_proxy(env, "node-1")
        _up_with_mode(env, "nftables")
        wait_for(lambda: f"table ip {table}" in tables(), "the nftables table back")
        wait_for(lambda: _reaches(env), "the service through the nftables mode again")
        nat = env.c.exec("node-1", "iptables-save", "-t", "nat").stdout
        for proxy_chain in ("CORRAL-SERVICES", "CORRAL-SVC-", "CORRAL-SEP-", "CORRAL-PROXY-"):
            assert proxy_chain not in nat, nat  # (CORRAL-POSTROUTING is the node agent's)
        assert "CORRAL-AFF-" not in env.c.exec("node-1", "ipset", "list", "-n").stdout
        _stop_proxy(env, "node-1")
        r = env.c.exec("node-1", sys.executable, "-m", "corral", "proxy", "--cleanup",
                       "--node", env.c.node("node-1"))  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f"removed nftables table ip {table}" in r.stdout
        assert f"table ip {table}" not in tables()
    finally:
        _up_with_mode(env, "nftables")
    wait_for(lambda: _reaches(env), "the service through the nftables mode at the end")
