"""NetworkPolicy on a `corral up` cluster: the upstream netpol model, probed pairwise.

Kubernetes' e2e model (test/e2e/network/netpol), scaled to the time budget:
namespaces x, y, z with pods a, b, c (label pod=<name>) spread over three nodes,
each serving TCP on 80 and 81 (named serve-80-tcp, serve-81-tcp). For each case
the policies are written with `corral apply`, every pair is probed from inside
the source pod (`corral exec`) and the table compared with the expected one.
The cluster runs the default datapath (the eBPF fast path where it loads), so
the pods a policy isolates must be handed to the kernel's rules by the fast path.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from corral.api.objects import Namespace, NetworkPolicy, Pod
from corral.api.store import Store
from corral.ebpf import loader
from integration.cluster_helpers import wait_for
from integration.clusters import LocalCluster, local_cluster
from integration.podcmd import POD_PYTHON

pytestmark = pytest.mark.slow

NS = ("x", "y", "z")
PODS = ("a", "b", "c")
ALL = [f"{n}/{p}" for n in NS for p in PODS]
PORTS = (80, 81)

SERVER = textwrap.dedent(
    """
    import socket, selectors
    sel = selectors.DefaultSelector()
    for port in (80, 81):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(256); sel.register(s, selectors.EVENT_READ, "tcp")
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
        sel.register(u, selectors.EVENT_READ, "udp")
    while True:
        for key, _ in sel.select():
            try:
                if key.data == "udp":
                    _, peer = key.fileobj.recvfrom(64); key.fileobj.sendto(b"ok", peer)
                    continue
                c, _ = key.fileobj.accept()
                c.sendall(b"ok"); c.close()
            except OSError:
                pass
    """
)
# argv: JSON list of [ip, port] (TCP) or [ip, port, "udp"]; prints a JSON list of
# booleans (answered "ok")
PROBER = textwrap.dedent(
    """
    import json, socket, sys, threading
    targets = json.loads(sys.argv[1]); out = [False] * len(targets)
    def udp(i, ip, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
        for _ in range(3):
            try:
                s.sendto(b"hi", (ip, port)); out[i] = s.recv(2) == b"ok"; return
            except OSError:
                pass
    def one(i, ip, port, proto="tcp"):
        if proto == "udp":
            return udp(i, ip, port)
        for _ in range(2):
            s = socket.socket(); s.settimeout(1.5)
            try:
                s.connect((ip, port)); out[i] = s.recv(2) == b"ok"; return
            except OSError:
                pass
            finally:
                s.close()
    ts = [threading.Thread(target=one, args=(i, *t)) for i, t in enumerate(targets)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(json.dumps(out))
    """
)

Table = dict[tuple[str, str, int], bool]


def server_pod(key: str, node: str) -> Pod:
    ns, name = key.split("/")
    return Pod.model_validate(
        {
            "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
            "spec": {
                "nodeName": node,
                "containers": [
                    {
                        "name": "srv",
                        "command": [POD_PYTHON, "-c", SERVER],
                        "ports": [{"name": f"serve-{p}-tcp", "containerPort": p} for p in PORTS],
                    }
                ],
            },
        }
    )


class Model:
    def __init__(self, c: LocalCluster) -> None:
        self.c = c
        self.ips: dict[str, str] = {}

    def run(self, fn: Callable[[Store], object]) -> object:
        async def go() -> object:
            async with self.c.store() as s:
                return await fn(s)  # type: ignore[misc]

        return asyncio.run(go())

    def refresh_ips(self) -> dict[str, str]:
        async def get(s: Store) -> dict[str, str]:
            out = {}
            for ns in NS:
                pods, _ = await s.list(Pod, ns)
                for p in pods:
                    if p.status.pod_ip and p.status.phase == "Running":
                        out[f"{ns}/{p.name}"] = p.status.pod_ip
            return out

        self.ips = self.run(get)  # type: ignore[assignment]
        return self.ips

    def apply(self, *docs: dict) -> None:
        r = self.c.corral("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        assert r.returncode == 0, r.stderr + r.stdout

    def delete_policies(self) -> None:
        async def go(s: Store) -> None:
            for ns in NS:
                for pol in (await s.list(NetworkPolicy, ns))[0]:
                    await s.delete(NetworkPolicy, pol.name, ns)

        self.run(go)

    def probe_from(self, src: str, targets: list[tuple]) -> list[bool]:
        ns, name = src.split("/")
        arg = json.dumps([[self.ips[d] if "/" in d else d, *rest] for d, *rest in targets])
        r = self.c.corral("exec", name, "-n", ns, "--", POD_PYTHON, "-c", PROBER, arg, timeout=180)
        assert r.returncode == 0, r.stderr + r.stdout
        return json.loads(r.stdout.strip().splitlines()[-1])

    def table(self, srcs: list[str] = ALL, dsts: list[str] = ALL) -> Table:
        targets = [(d, p) for d in dsts for p in PORTS]
        with ThreadPoolExecutor(4) as ex:
            rows = list(ex.map(lambda s: self.probe_from(s, targets), srcs))
        return {
            (s, d, p): ok
            for s, row in zip(srcs, rows, strict=True)
            for (d, p), ok in zip(targets, row, strict=True)
        }

    def expect(self, want: Callable[[str, str, int], bool]) -> None:
        """Probe until the table matches `want` (policies arrive on every node
        asynchronously), failing with the differing pairs."""
        # a pod reaching its own IP never leaves its namespace: not judged, not compared
        expected = {
            (s, d, p): want(s, d, p) for s, d, p in itertools.product(ALL, ALL, PORTS) if s != d
        }
        last: list[str] = []

        def matches() -> bool:
            got = self.table()
            last[:] = [
                f"{s} -> {d}:{p} got {got[s, d, p]} want {w}"
                for (s, d, p), w in expected.items()
                if got[s, d, p] != w
            ]
            return not last

        try:
            wait_for(matches, "the probe table to match the truth table", timeout=120)
        except AssertionError:
            raise AssertionError("\n".join(last[:40])) from None


@pytest.fixture(scope="module")
def model() -> Iterator[Model]:
    with local_cluster(3, "--dns-replicas", "0") as c:
        m = Model(c)
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in NS]
        m.apply(*docs)
        pods = [server_pod(k, c.nodes[i % 3]) for i, k in enumerate(ALL)]
        m.apply(*(p.dump() for p in pods))
        wait_for(lambda: len(m.refresh_ips()) == len(ALL), "every model pod running", 240)
        yield m


def policy(ns: str, name: str, spec: dict) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


@pytest.fixture
def clean(model: Model) -> Iterator[Model]:
    yield model
    model.delete_policies()


def test_namespaces_carry_their_name_label(model: Model) -> None:
    async def labels(s: Store) -> dict[str, str]:
        ns = await s.get(Namespace, "x")
        assert ns is not None
        return ns.metadata.labels

    assert model.run(labels).get("kubernetes.io/metadata.name") == "x"  # type: ignore[union-attr]


def test_no_policy_everything_answers(clean: Model) -> None:
    clean.expect(lambda s, d, p: True)


def test_default_deny_ingress_then_allow_by_namespace_and_pod(clean: Model) -> None:
    clean.apply(policy("x", "deny-all", {"podSelector": {}}))
    clean.expect(lambda s, d, p: not d.startswith("x/"))
    # x/a from pods b of namespace y only (both selectors in one peer), on 80
    clean.apply(
        policy(
            "x",
            "yb-to-a",
            {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": "y"}
                                },
                                "podSelector": {"matchLabels": {"pod": "b"}},
                            }
                        ],
                        "ports": [{"port": "serve-80-tcp"}],
                    }
                ],
            },
        )
    )
    clean.expect(lambda s, d, p: not d.startswith("x/") or (d, s, p) == ("x/a", "y/b", 80))


def test_net_policy_and_trace_name_the_deciding_policy(clean: Model) -> None:
    clean.apply(
        policy("x", "deny-all", {"podSelector": {}}),
        policy(
            "x",
            "from-y",
            {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [
                    {
                        "from": [{"namespaceSelector": {"matchLabels": {"ns-name": "none"}}}],
                    },
                    {
                        "from": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": "y"}
                                }
                            }
                        ],
                        "ports": [{"port": 80}],
                    },
                ],
            },
        ),
    )
    clean.expect(lambda s, d, p: not d.startswith("x/") or (d == "x/a" and s[0] == "y" and p == 80))

    r = clean.c.corral("get", "netpol", "-n", "x")
    assert r.returncode == 0 and "from-y" in r.stdout and "pod=a" in r.stdout, r.stderr + r.stdout
    r = clean.c.corral("describe", "networkpolicy", "from-y", "-n", "x")
    assert r.returncode == 0 and "policyTypes" in r.stdout, r.stderr + r.stdout

    r = clean.c.corral("net", "policy", "x/a", "-o", "json")
    assert r.returncode == 0, r.stderr + r.stdout
    doc = json.loads(r.stdout)
    assert doc["ingress"]["policies"] == ["x/deny-all", "x/from-y"]
    assert doc["node_agrees"] is True and not doc["egress"]["isolated"]
    if loader.unavailable() is None:  # the fast path is on: isolated pods leave it
        assert doc["node_fast_path_map"] is True

    xa = clean.ips["x/a"]
    r = clean.c.corral("net", "trace", "y/b", f"{xa}:80/tcp", "-o", "json", timeout=300)
    hop = next(h for h in json.loads(r.stdout)["hops"] if h["step"] == "network policy")
    assert "x/from-y rule 1" in hop["decision"] and hop["status"] == "confirmed", hop
    r = clean.c.corral("net", "trace", "y/b", f"{xa}:81/tcp", "-o", "json", timeout=300)
    assert r.returncode == 1, r.stdout
    hop = next(h for h in json.loads(r.stdout)["hops"] if h["step"] == "network policy")
    assert "default deny" in hop["decision"] and "x/deny-all" in hop["decision"], hop
    assert "did not reach" in hop["seen"], hop


def test_service_traffic_is_judged_on_its_backend_after_translation(clean: Model) -> None:
    """The VIP's port is 8080, the pod's 80: a policy on port 80 allows the service flow
    only if it is judged after DNAT, on the backend pod and its port."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "np-web", "namespace": "x"},
        "spec": {"selector": {"pod": "a"}, "ports": [{"port": 8080, "targetPort": 80}]},
    }
    clean.apply(svc)
    try:
        clean.apply(
            policy(
                "x",
                "yb-80",
                {
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [
                        {
                            "from": [
                                {
                                    "namespaceSelector": {"matchLabels": {"ns-x": "absent"}},
                                },
                                {
                                    "namespaceSelector": {},
                                    "podSelector": {"matchLabels": {"pod": "b"}},
                                },
                            ],
                            "ports": [{"port": 80}],
                        }
                    ],
                },
            )
        )

        async def vip(s: Store) -> str | None:
            from corral.api.objects import Service

            got = await s.get(Service, "np-web", "x")
            return got.spec.cluster_ip if got else None

        ip = str(clean.run(vip))
        want = {"y/b": True, "z/b": True, "y/c": False, "x/c": False}
        got: dict[str, bool] = {}

        def as_wanted() -> bool:
            for src in want:
                got[src] = clean.probe_from(src, [(ip, 8080)])[0]
            return got == want

        wait_for(as_wanted, f"the service VIP to answer exactly {want} (last {got})", 180)
    finally:
        clean.c.corral("delete", "service", "np-web", "-n", "x")


def test_udp_is_its_own_protocol(clean: Model) -> None:
    clean.apply(
        policy(
            "z",
            "udp-81",
            {
                "podSelector": {"matchLabels": {"pod": "c"}},
                "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}],
            },
        )
    )
    targets = [("z/c", 80, "udp"), ("z/c", 81, "udp"), ("z/c", 81, "tcp"), ("z/b", 80, "udp")]
    want = [False, True, False, True]
    got: list[bool] = []

    def as_wanted() -> bool:
        got[:] = clean.probe_from("x/b", targets)
        return got == want

    wait_for(as_wanted, f"UDP and TCP probes of z/c to be {want}", 120)


def test_egress_ip_block_except_and_end_port(clean: Model) -> None:
    zb = clean.ips["z/b"]
    clean.apply(
        policy(
            "y",
            "out",
            {
                "podSelector": {"matchLabels": {"pod": "a"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": [f"{zb}/32"]}}],
                        "ports": [{"port": 80, "endPort": 80}],
                    }
                ],
            },
        )
    )
    clean.expect(lambda s, d, p: s != "y/a" or (p == 80 and d != "z/b"))


def test_a_pod_created_under_default_deny_never_answers(clean: Model) -> None:
    clean.apply(policy("z", "deny-all", {"podSelector": {}}))
    clean.expect(lambda s, d, p: not d.startswith("z/"))
    node = clean.c.nodes[1]
    new = server_pod("z/d", node)
    clean.apply(new.dump())
    try:
        # probe from the moment the pod has an address until its server runs
        answered: list[bool] = []

        def up() -> bool:
            async def get(s: Store) -> str | None:
                p = await s.get(Pod, "d", "z")
                return p.status.pod_ip if p else None

            ip = clean.run(get)
            if not ip:
                return False
            answered.extend(clean.probe_from("x/a", [(str(ip), 80), (str(ip), 81)]))
            # its own node reaches it (Kubernetes: probes from the node are allowed)
            r = clean.c.exec(node, POD_PYTHON, "-c", PROBER, json.dumps([[ip, 80]]), timeout=60)
            return r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]) == [True]

        wait_for(up, "the new pod's server to answer its own node", timeout=180)
        ip = clean.run(_ip)
        answered.extend(clean.probe_from("x/a", [(str(ip), 80), (str(ip), 81)]))
        assert answered and not any(answered)
    finally:
        r = clean.c.corral("delete", "pod", "d", "-n", "z")
        assert r.returncode == 0, r.stderr


async def _ip(s: Store) -> str:
    p = await s.get(Pod, "d", "z")
    assert p is not None and p.status.pod_ip
    return p.status.pod_ip


def test_label_change_moves_a_pod_out_of_a_policy(clean: Model) -> None:
    clean.apply(
        policy(
            "x",
            "from-c",
            {
                "podSelector": {"matchLabels": {"pod": "b"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}],
            },
        )
    )
    clean.expect(lambda s, d, p: d != "x/b" or s == "x/c")
    r = clean.c.corral("label", "pod", "b", "-n", "x", "pod=bb", "--overwrite")
    assert r.returncode == 0, r.stderr + r.stdout
    try:
        clean.expect(lambda s, d, p: True)
    finally:
        clean.c.corral("label", "pod", "b", "-n", "x", "pod=b", "--overwrite")
