"""The node agent's NetworkPolicy component: this node's pods' iptables chains, kept.

Inputs are the process's shared informers (Pod, Namespace, NetworkPolicy);
every change asks the bounded-frequency runner for a sync, which computes the
effective policy of each pod on this node (netpolicy/model.py), renders it
(netpolicy/rules.py) and rewrites only the chains that differ. A full sync
every `resync_interval` repairs drift (a flushed chain, a deleted jump).
Stopping leaves the chains in place, so a restarted agent finds them and
converges without a moment unprotected.

A new pod's rules are in place before it runs: the CNI server calls
`on_address` (NodeContext.address_hooks) with the pod and its new IP before
ADD answers, and that call programs the node's chains with the pod included
(its labels from the informer, its IP from ADD, since the Pod object gets its
IP only later). If that fails, ADD fails and the runtime retries.

Dropped flows of pods in namespaces annotated `corral.dev/log-dropped-flows: "true"`
are logged one line per flow (netpolicy/droplog.py: NFLOG read on a netlink
socket in the node's namespace).

The eBPF fast path skips netfilter; every local pod a policy isolates is put
in its pinned `netpol_pods` map, and the fast path leaves their packets to the
kernel, where these chains judge them (docs/netpolicy.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from corral.api.informer import Informer, Registration
from corral.api.objects import Namespace, NetworkPolicy, Pod
from corral.common.metrics import register_collector
from corral.daemon.nodecontext import NodeContext
from corral.daemon.runner import BoundedFrequencyRunner
from corral.ebpf import netpol_pods
from corral.netpolicy import droplog, rules
from corral.netpolicy.model import Model, PodInfo, PodPolicy
from corral.node import sysctl

log = logging.getLogger("corral.netpolicy")

BRIDGE_NF = "net.bridge.bridge-nf-call-iptables"
PENDING_SECONDS = 300.0  # how long an address from ADD stands in for the Pod's own


class NetworkPolicyAgent:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.netns = ctx.options.netns
        self.pods: Informer[Pod] = ctx.informers.informer(Pod)
        self.namespaces: Informer[Namespace] = ctx.informers.informer(Namespace)
        self.policies: Informer[NetworkPolicy] = ctx.informers.informer(NetworkPolicy)
        self.runner = BoundedFrequencyRunner(
            "netpolicy", self._sync, 0.05, max(ctx.options.resync_interval, 1.0)
        )
        self.lock = asyncio.Lock()
        # ns/name -> (IP, when): addresses CNI ADD handed out, until the Pod shows them
        self.pending: dict[str, tuple[str, float]] = {}
        self.local: dict[str, PodPolicy] = {}
        self.retired: dict[tuple[str, str, str], int] = {}  # counts of rewritten chains
        self.syncs = 0
        self.changes = 0
        self.last_error = ""
        self._regs: list[Registration] = []
        self._unregister: Any = None
        self._fast: netpol_pods.PolicedMap | None = None
        self._bridge_nf = False
        self._nflog: socket.socket | None = None
        self.drops: collections.deque[str] = collections.deque(maxlen=100)
        self.log_error = ""
        # what the last sync wrote: a partial sync that wants the same touches nothing
        self._applied: tuple[dict[str, list[str]], set[str]] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not self._regs:
            for inf in (self.pods, self.namespaces, self.policies):
                self._regs.append(inf.on_change(self._changed))
        if self.on_address not in self.ctx.address_hooks:
            self.ctx.address_hooks.append(self.on_address)
        if self._unregister is None:
            self._unregister = register_collector(self.collect)
        self.ctx.informers.start()
        for inf in (self.pods, self.namespaces, self.policies):
            await inf.wait_synced()
        self._listen()
        await self.sync(full=True)

    async def run(self) -> None:
        await self.runner.run()

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.ctx.address_hooks.remove(self.on_address)
        for r in self._regs:
            r.remove()
        self._regs = []
        if self._unregister:
            self._unregister()
            self._unregister = None
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._nflog is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._nflog.fileno())
            self._nflog.close()
            self._nflog = None

    # ------------------------------------------------------------ dropped flows

    def _listen(self) -> None:
        """Read the NFLOG group dropped flows are logged to (droplog.py)."""
        if self._nflog is not None:
            return
        try:
            self._nflog = droplog.open_listener(self.netns)
        except OSError as e:
            self.log_error = f"cannot read NFLOG group {droplog.GROUP}: {e}"
            log.warning("network policy: %s; dropped flows are not logged", self.log_error)
            return
        asyncio.get_running_loop().add_reader(self._nflog.fileno(), self._read_drops)

    def _read_drops(self) -> None:
        assert self._nflog is not None
        while True:
            try:
                data = self._nflog.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ENOBUFS: lines were lost, the socket goes on
                self.log_error = str(e)
                return
            for d in droplog.parse(data):
                self._log_drop(d)

    def _log_drop(self, d: droplog.Dropped) -> None:
        pp = next((p for p in self.local.values() if p.pod.ip == d.pod_ip), None)
        who = pp.pod.key if pp else d.pod_ip
        policies = ", ".join(pp.direction(d.direction).policies) if pp else "?"
        port = f":{d.dport}" if d.dport is not None else ""
        line = (
            f"dropped {d.protocol} {d.src} -> {d.dst}{port}: {d.direction.lower()} of {who}, "
            f"default deny (isolated by {policies})"
        )
        self.drops.append(line)
        log.info("network policy: %s", line)

    def ready(self) -> bool:
        return self.syncs > 0

    def _changed(self, old: object, new: object) -> None:
        self.runner.run_soon()

    # ------------------------------------------------------------ the CNI hook

    async def on_address(self, namespace: str, name: str, ip: str) -> None:
        """CNI ADD gave pod namespace/name the address `ip`: its rules, now."""
        self.pending[f"{namespace}/{name}"] = (ip, time.monotonic())
        for inf in (self.pods, self.namespaces, self.policies):
            await inf.wait_synced()  # a half-listed cluster could miss the pod's policy
        await self.sync(full=False)

    # ------------------------------------------------------------ sync

    def model(self) -> Model:
        """The cluster as the engine sees it, with addresses ADD gave out and the
        Pod objects do not show yet."""
        now = time.monotonic()
        infos: dict[str, PodInfo] = {}
        for pod in self.pods.values():
            key = f"{pod.namespace}/{pod.name}"
            pend = self.pending.get(key)
            info = PodInfo.of(pod)
            if pend is not None:
                if (info is not None and info.ip == pend[0]) or now - pend[1] > PENDING_SECONDS:
                    del self.pending[key]
                elif not pod.spec.host_network and pod.status.phase not in ("Succeeded", "Failed"):
                    info = PodInfo(
                        pod.namespace or "default",
                        pod.name,
                        pend[0],
                        dict(pod.metadata.labels),
                        _named_ports(pod),
                        pod.spec.node_name,
                    )
            if info is not None:
                infos[key] = info
        for key in [k for k in self.pending if k not in infos and now - self.pending[k][1] > 30]:
            del self.pending[key]  # ADD for a pod that never showed up (or is gone)
        # One owner per address: the pod ADD just gave it to, else one not being deleted
        # (a terminating pod's object can still show an address a new pod now has).
        owner: dict[str, str] = {}
        for key, info in infos.items():
            other = owner.get(info.ip)
            if other is None or key in self.pending or self._deleting(other):
                owner[info.ip] = key
        return Model(
            (infos[k] for k in owner.values()),
            {n.name: dict(n.metadata.labels) for n in self.namespaces.values()},
            self.policies.values(),
        )

    def _deleting(self, key: str) -> bool:
        ns, _, name = key.partition("/")
        pod = self.pods.get(name, ns)
        return pod is None or pod.metadata.deletion_timestamp is not None

    def local_policies(self, m: Model) -> dict[str, PodPolicy]:
        mine = [p for p in m.pods if p.node == self.ctx.node_name]
        return m.policies_of(mine)

    async def _sync(self, full: bool) -> None:
        await self.sync(full)

    async def sync(self, full: bool = False) -> None:
        async with self.lock:
            m = self.model()
            local = self.local_policies(m)
            logged = {
                n.name for n in self.namespaces.values() if droplog.enabled(n.metadata.annotations)
            }
            want = rules.render(list(local.values()), logged)
            policed = {pp.pod.ip for pp in local.values() if _isolated(pp)}
            if not full and self._applied == (want.chains, policed):
                self.local = local
                return
            loop = asyncio.get_running_loop()
            try:
                changed = await loop.run_in_executor(None, self._apply, want, policed, full)
            except Exception as e:
                self._applied = None
                self.last_error = f"{type(e).__name__}: {e}"
                raise
            self._applied = (want.chains, policed)
            self.last_error = ""
            self.local = local
            self.syncs += 1
            if changed:
                self.changes += 1
                log.info("network policy: %s", "; ".join(changed[:5]))

    def _apply(self, want: rules.Wanted, policed: set[str], full: bool) -> list[str]:
        if full or not self._bridge_nf:
            with contextlib.suppress(OSError):
                sysctl.ensure(BRIDGE_NF, "1", self.netns)
                self._bridge_nf = True
        have = rules.read(self.netns)
        lines, touched = rules.diff(have, want)
        if touched:
            gone = rules.Saved(counted=[c for c in have.counted if c[0] in set(touched)])
            for k, v in rules.counts(gone).items():
                self.retired[k] = self.retired.get(k, 0) + v
        rules.apply(self.netns, lines)
        self._sync_fastpath(policed)
        return [f"{c} rewritten" if c in want.chains else f"{c} removed" for c in touched]

    def _sync_fastpath(self, ips: set[str]) -> None:
        if self._fast is None:
            self._fast = netpol_pods.PolicedMap.open(self.ctx.node_name)
            if self._fast is None:
                return  # no fast path on this node (yet): every packet meets netfilter
        try:
            self._fast.sync(ips)
        except OSError:
            self._fast.close()  # a reloaded fast path pins a new map: open it next time
            self._fast = None
            raise

    # ------------------------------------------------------------ visibility

    def counters(self) -> dict[tuple[str, str, str], int]:
        out = dict(self.retired)
        for k, v in rules.counts(rules.read(self.netns)).items():
            out[k] = out.get(k, 0) + v
        return out

    def collect(self) -> Iterable[Any]:
        fam = CounterMetricFamily(
            "corral_netpol_packets",
            "New flows' packets judged by NetworkPolicy on this node, by policy, direction "
            "and verdict (a default-deny drop counts for every policy isolating the pod)",
            labels=["policy", "direction", "verdict"],
        )
        try:
            for (pol, direction, verdict), n in sorted(self.counters().items()):
                fam.add_metric([pol, direction, verdict], n)
        except Exception as e:  # a scrape must not fail on iptables
            log.debug("netpol counters: %s", e)
        yield fam
        g = GaugeMetricFamily(
            "corral_netpol_isolated_pods",
            "Pods on this node a NetworkPolicy isolates",
            labels=["direction"],
        )
        for d in ("ingress", "egress"):
            g.add_metric([d], sum(1 for pp in self.local.values() if getattr(pp, d).isolated))
        yield g

    def debug_state(self) -> dict[str, Any]:
        return {
            "syncs": self.syncs,
            "changes": self.changes,
            "last_error": self.last_error,
            "pending": {k: v[0] for k, v in self.pending.items()},
            "dropped_flows": list(self.drops)[-20:],
            "drop_log_error": self.log_error,
            "fast_path_map": self._fast is not None,
            "pods": {k: describe(pp) for k, pp in sorted(self.local.items())},
        }


def _isolated(pp: PodPolicy) -> bool:
    return pp.ingress.isolated or pp.egress.isolated


def _named_ports(pod: Pod) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for c in pod.spec.containers:
        for p in c.ports:
            if p.name:
                out.setdefault(p.name, (p.container_port, p.protocol))
    return out


def describe(pp: PodPolicy) -> dict[str, Any]:
    """A pod's effective policy as JSON (the debug dump, `corral net policy`)."""

    def one(d: Any) -> dict[str, Any]:
        if not d.isolated:
            return {"isolated": False, "policies": [], "allow": "all (no policy selects the pod)"}
        return {
            "isolated": True,
            "policies": list(d.policies),
            "allow": [a.describe() for a in d.allows or []],
        }

    return {"ip": pp.pod.ip, "ingress": one(pp.ingress), "egress": one(pp.egress)}
