"""NetworkPolicy on the kernel path: the node agent's component in a node namespace of
the test's own, pods on a bridge, real etcd, real TCP probes.

The node namespace holds a bridge with three pod namespaces (x/a, x/b, y/c) plugged
in, as corral-cni would; each pod serves TCP on 80 and 81. The component reads
Pods, Namespaces and NetworkPolicies from etcd, and what it writes into the node's
iptables is what decides each probe.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from corral.api.objects import Namespace, NetworkPolicy, Pod
from corral.api.store import Store
from corral.daemon.nodecontext import NodeContext
from corral.netpolicy import rules
from corral.netpolicy.component import NetworkPolicyAgent
from corral.node import iptables, netns
from corral.node.context import NodeOptions
from tests.kit import eventually, scratch_netns

NODE = "np-node"
SUBNET = "10.244.7"
PODS = {"x/a": 10, "x/b": 11, "y/c": 12}

SERVER = textwrap.dedent(
    """
    import socket, selectors, sys
    sel = selectors.DefaultSelector()
    for port in (80, 81):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(64); sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            c, _ = key.fileobj.accept(); c.sendall(b"ok"); c.close()
    """
)
PROBE = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.settimeout(float(sys.argv[3]))
    try:
        s.connect((sys.argv[1], int(sys.argv[2]))); print(s.recv(2).decode() or "closed")
    except OSError as e:
        print(type(e).__name__)
    """
)


def ip_of(key: str) -> str:
    return f"{SUBNET}.{PODS[key]}"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class Bed:
    node: str
    pod_ns: dict[str, str]

    def probe(self, src: str, dst: str, port: int = 80, timeout: float = 1.0) -> bool:
        target = dst if dst[0].isdigit() else ip_of(dst)
        argv = [sys.executable, "-c", PROBE, target, str(port), str(timeout)]
        r = subprocess.run(
            netns.command(self.pod_ns[src], argv), capture_output=True, text=True, timeout=30
        )
        return r.stdout.strip() == "ok"

    def from_node(self, dst: str, port: int = 80) -> bool:
        argv = [sys.executable, "-c", PROBE, ip_of(dst), str(port), "1"]
        r = subprocess.run(netns.command(self.node, argv), capture_output=True, text=True)
        return r.stdout.strip() == "ok"


@pytest.fixture
def bed() -> Iterator[Bed]:
    with scratch_netns("npnode") as node:
        sh("ip", "-n", node, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", node, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        sh("ip", "-n", node, "link", "set", "br0", "up")
        pod_ns: dict[str, str] = {}
        servers = []
        stack = []
        try:
            for i, (key, last) in enumerate(PODS.items()):
                cm = scratch_netns(f"nppod{i}")
                pod_ns[key] = cm.__enter__()
                stack.append(cm)
                ns = pod_ns[key]
                sh("ip", "-n", node, "link", "add", f"np{i}", "type", "veth", "peer", "eth0",
                   "netns", ns)  # fmt: skip
                sh("ip", "-n", node, "link", "set", f"np{i}", "master", "br0", "up")
                sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{last}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "-n", ns, "route", "add", "default", "via", f"{SUBNET}.1")
                p = subprocess.Popen(
                    netns.command(ns, [sys.executable, "-c", SERVER]),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                servers.append(p)
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            yield Bed(node, pod_ns)
        finally:
            for p in servers:
                p.kill()
                p.wait()
            for cm in reversed(stack):
                cm.__exit__(None, None, None)


def pod(key: str, labels: dict[str, str] | None = None, ip: str | None = None) -> Pod:
    ns, name = key.split("/")
    return Pod.model_validate(
        {
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"pod": name}},
            "spec": {
                "nodeName": NODE,
                "containers": [
                    {
                        "name": "c",
                        "command": ["sleep"],
                        "ports": [{"name": "web", "containerPort": 81}],
                    }
                ],
            },
            "status": {"phase": "Running", **({"podIP": ip} if ip else {})},
        }
    )


def policy(ns: str, name: str, spec: dict) -> NetworkPolicy:
    return NetworkPolicy.model_validate(
        {
            "apiVersion": "networking.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


async def objects(store: Store) -> None:
    for ns in ("x", "y"):
        await store.create(Namespace.model_validate({"metadata": {"name": ns}}))
    for key in PODS:
        await store.create(pod(key, ip=ip_of(key)))


async def probes(bed: Bed, pairs: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], bool]:
    loop = asyncio.get_running_loop()
    got = await asyncio.gather(
        *(loop.run_in_executor(None, bed.probe, s, d, p) for s, d, p in pairs)
    )
    return dict(zip(pairs, got, strict=True))


ALL = [(s, d, p) for s in PODS for d in PODS if s != d for p in (80, 81)]


async def until(bed: Bed, want: dict[tuple[str, str, int], bool]) -> None:
    """Probe until the table is `want` (rules arrive asynchronously), then hold."""

    async def same() -> bool:
        got = await probes(bed, list(want))
        return got == want

    await eventually(same, "the probe table to match", timeout=60)


@pytest.fixture
async def agent(bed: Bed, store: Store):
    ctx = NodeContext(NODE, store, options=NodeOptions(netns=bed.node, resync_interval=1.0))
    await objects(store)
    a = NetworkPolicyAgent(ctx)
    await a.start()
    task = asyncio.ensure_future(a.run())
    try:
        yield a
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await a.stop()
        await ctx.informers.stop()


async def test_no_policy_nothing_isolated(bed: Bed, agent: NetworkPolicyAgent):
    assert all((await probes(bed, ALL)).values())
    saved = rules.read(bed.node)
    assert saved.rules[rules.CHAIN] == [rules.ESTABLISHED]
    assert saved.rules[rules.HOOK][0] == rules.JUMP


async def test_ingress_truth_table_updates_and_counters(bed: Bed, agent, store: Store):
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}
        ],
    }
    await store.create(policy("x", "b-to-a", spec))
    want = {k: not (k[1] == "x/a" and (k[0] != "x/b" or k[2] != 80)) for k in ALL}
    await until(bed, want)
    # traffic from the node itself is never judged (probes)
    assert await asyncio.get_running_loop().run_in_executor(None, bed.from_node, "x/a", 81)

    counted = agent.counters()
    assert counted.get(("x/b-to-a", "ingress", "allow"), 0) > 0
    assert counted.get(("x/b-to-a", "ingress", "deny"), 0) > 0
    samples = {
        (s.labels["policy"], s.labels["verdict"]): s.value
        for fam in agent.collect()
        for s in fam.samples
        if s.name == "corral_netpol_packets_total"
    }
    assert samples[("x/b-to-a", "allow")] > 0 and samples[("x/b-to-a", "deny")] > 0

    # a namespace selector by the label Kubernetes sets: y/c may now reach x/a on 81
    spec2 = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [
            {
                "from": [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}
                ],
                "ports": [{"port": "web"}],
            }
        ],
    }
    await store.create(policy("x", "y-web", spec2))
    want[("y/c", "x/a", 81)] = True
    await until(bed, want)

    # relabel x/b: it no longer matches pod=b
    await store.modify(Pod, "b", "x", lambda p: (p.metadata.labels.update(pod="bb"), p)[1])
    want[("x/b", "x/a", 80)] = False
    await until(bed, want)

    # deleting the policies opens everything again, and their chains go
    await store.delete(NetworkPolicy, "b-to-a", "x")
    await store.delete(NetworkPolicy, "y-web", "x")
    await until(bed, dict.fromkeys(ALL, True))
    assert not [c for c in rules.read(bed.node).chains if c.startswith("CORRAL-NP")]


async def test_egress_default_deny_and_ip_block(bed: Bed, agent, store: Store):
    spec = {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"ipBlock": {"cidr": f"{SUBNET}.0/24", "except": [f"{ip_of('y/c')}/32"]}}]}
        ],
    }
    await store.create(policy("x", "a-out", spec))
    want = {k: not (k[0] == "x/a" and k[1] == "y/c") for k in ALL}
    await until(bed, want)


async def test_drift_is_repaired_and_restart_keeps_rules(bed: Bed, agent, store: Store):
    await store.create(policy("x", "deny-all", {"podSelector": {}}))
    want = {k: not k[1].startswith("x/") for k in ALL}
    await until(bed, want)
    chain = rules.chain_of("Ingress", ip_of("x/a"))
    before = rules.read(bed.node).rules[chain]

    # someone flushes a chain and deletes the jump: the periodic sync puts them back
    iptables.run(bed.node, ["iptables", "-t", "filter", "-F", chain])
    iptables.run(bed.node, ["iptables", "-t", "filter", "-D", "FORWARD", "-j", rules.CHAIN])

    async def repaired() -> bool:
        s = rules.read(bed.node)
        return s.rules.get(chain) == before and s.rules[rules.HOOK][0] == rules.JUMP

    await eventually(repaired, "the flushed chain and the jump to come back", timeout=60)

    # the agent stops: the rules stay; a new agent changes nothing
    await agent.stop()
    await until(bed, want)
    have = rules.read(bed.node)
    ctx2 = NodeContext(NODE, store, options=NodeOptions(netns=bed.node))
    again = NetworkPolicyAgent(ctx2)
    try:
        await again.start()
        assert again.changes == 0
        assert rules.read(bed.node).rules == have.rules
    finally:
        await again.stop()
        await ctx2.informers.stop()


async def test_address_hook_programs_a_new_pod_before_its_pod_shows_the_ip(bed: Bed, store: Store):
    """The CNI ADD hook: a pod whose Pod object has no IP yet is protected at once."""
    ctx = NodeContext(NODE, store, options=NodeOptions(netns=bed.node, resync_interval=3600))
    for ns in ("x", "y"):
        await store.create(Namespace.model_validate({"metadata": {"name": ns}}))
    for key in PODS:
        await store.create(pod(key, ip=None if key == "x/a" else ip_of(key)))
    await store.create(policy("x", "deny-all", {"podSelector": {}}))
    a = NetworkPolicyAgent(ctx)
    try:
        await a.start()
        assert rules.chain_of("Ingress", ip_of("x/a")) not in rules.read(bed.node).chains
        for hook in ctx.address_hooks:  # what the CNI server does before ADD answers
            await hook("x", "a", ip_of("x/a"))
        assert rules.chain_of("Ingress", ip_of("x/a")) in rules.read(bed.node).chains
        assert not await asyncio.get_running_loop().run_in_executor(
            None, bed.probe, "y/c", "x/a", 80
        )
    finally:
        await a.stop()
        await ctx.informers.stop()


async def test_dropped_flows_are_logged_once_per_flow_when_the_namespace_asks(
    bed: Bed, agent: NetworkPolicyAgent, store: Store
):
    await store.create(policy("x", "deny-all", {"podSelector": {}}))
    await until(bed, {("y/c", "x/a", 80): False, ("y/c", "x/b", 81): False})
    assert not agent.drops  # the namespace did not ask

    def ask(ns: Namespace) -> Namespace:
        ns.metadata.annotations["corral.dev/log-dropped-flows"] = "true"
        return ns

    await store.modify(Namespace, "x", None, ask)
    chain = rules.chain_of("Ingress", ip_of("x/a"))

    async def logging_rule() -> bool:
        return any("NFLOG" in r for r in rules.read(bed.node).rules.get(chain, []))

    await eventually(logging_rule, "the NFLOG rule before the default deny", timeout=60)
    loop = asyncio.get_running_loop()
    for _ in range(3):  # one flow, three connection attempts: one line
        assert not await loop.run_in_executor(None, bed.probe, "y/c", "x/a", 80)

    want = f"TCP {ip_of('y/c')} -> {ip_of('x/a')}:80: ingress of x/a, default deny"
    await eventually(
        lambda: any(line.startswith(f"dropped {want}") for line in agent.drops),
        "the dropped flow's log line",
        timeout=30,
    )
    assert "x/deny-all" in agent.drops[-1]
    assert len([d for d in agent.drops if f"-> {ip_of('x/a')}:80" in d]) == 1
    assert agent.debug_state()["dropped_flows"]
