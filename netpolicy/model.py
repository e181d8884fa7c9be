"""The NetworkPolicy engine, pure: objects in, per-pod allow lists and verdicts out.

Kubernetes' semantics (networking.k8s.io/v1), in one place that both the node
agent's iptables rules (netpolicy/rules.py) and `corral net policy`/`trace`
are computed from, so what the CLI explains is what the kernel enforces:

- A pod is *isolated* for ingress (egress) when at least one policy of its
  namespace selects it and lists Ingress (Egress) in its policyTypes. A pod no
  policy isolates accepts (sends) everything in that direction.
- An isolated pod accepts (sends) exactly the union of the rules of every
  policy isolating it; nothing else ("default deny"). Order never matters.
- A rule with no peers allows every peer, one with no ports every port. A peer
  is a podSelector (pods of the policy's namespace), a namespaceSelector (every
  pod of those namespaces), both (those pods of those namespaces) or an ipBlock
  (its CIDR minus its excepts, any address, pods included). An empty selector
  selects everything.
- A port is a number, a number range (`endPort`) or a container port *name*,
  which is resolved on the pod the traffic goes to: the selected pod itself for
  ingress, each peer pod for egress (an address that is no pod has no names).
- A flow is allowed when the source's egress and the destination's ingress
  both allow it. Replies of allowed flows and traffic from a pod's own node are
  not judged (the kernel rules accept them before these lists are consulted).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from corral.api.objects import (
    NAMESPACE_NAME_LABEL,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    NetworkPolicyPeer,
    NetworkPolicyPort,
    Pod,
)
from corral.api.selectors import matches_label_selector

INGRESS, EGRESS = "Ingress", "Egress"


def selects(sel: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    """A NetworkPolicy selector: empty (or absent) selects everything."""
    if sel is None or (not sel.match_labels and not sel.match_expressions):
        return True
    return matches_label_selector(sel, labels)


@dataclass(frozen=True)
class PodInfo:
    """What the engine needs of a pod."""

    namespace: str
    name: str
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    # named container ports: name -> (port, protocol)
    ports: Mapping[str, tuple[int, str]] = field(default_factory=dict, compare=False, hash=False)
    node: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, pod: Pod) -> PodInfo | None:
        """None for a pod that has no IP of its own (yet), host network or finished."""
        ip = pod.status.pod_ip or (pod.status.pod_ips[0].ip if pod.status.pod_ips else None)
        if not ip or pod.spec.host_network or pod.status.phase in ("Succeeded", "Failed"):
            return None
        named = {}
        for c in pod.spec.containers:
            for p in c.ports:
                if p.name:
                    named.setdefault(p.name, (p.container_port, p.protocol))
        return cls(
            pod.namespace or "default",
            pod.name,
            ip,
            dict(pod.metadata.labels),
            named,
            pod.spec.node_name,
        )


@dataclass(frozen=True)
class PortRange:
    """One protocol's ports `lo`..`hi`; both None: every port of the protocol."""

    protocol: str
    lo: int | None = None
    hi: int | None = None

    def covers(self, protocol: str, port: int) -> bool:
        if protocol != self.protocol:
            return False
        return self.lo is None or (self.hi is not None and self.lo <= port <= self.hi)

    def __str__(self) -> str:
        if self.lo is None:
            return f"{self.protocol}/*"
        return f"{self.protocol}/{self.lo}" + (f"-{self.hi}" if self.hi != self.lo else "")


@dataclass(frozen=True)
class Allow:
    """One entry of a pod's allow list: rule `rule` of policy `policy` allows traffic
    with the peer in `peers` (CIDRs; None: any address) on `ports` (None: any)."""

    policy: str  # namespace/name
    rule: int  # index in the policy's ingress (or egress) list
    peers: tuple[str, ...] | None
    ports: tuple[PortRange, ...] | None

    def matches(self, peer: str, protocol: str, port: int) -> bool:
        if self.peers is not None:
            addr = ipaddress.ip_address(peer)
            if not any(addr in ipaddress.ip_network(c) for c in self.peers):
                return False
        return self.ports is None or any(p.covers(protocol, port) for p in self.ports)

    def describe(self) -> str:
        peers = "any peer" if self.peers is None else ", ".join(self.peers) or "no peer"
        ports = "any port" if self.ports is None else ", ".join(map(str, self.ports))
        return f"{self.policy} rule {self.rule}: {peers} on {ports}"


@dataclass
class Direction:
    """A pod's policy in one direction: None `allows` means not isolated (all allowed)."""

    policies: list[str] = field(default_factory=list)  # the policies isolating the pod
    allows: list[Allow] | None = None

    @property
    def isolated(self) -> bool:
        return self.allows is not None


@dataclass
class PodPolicy:
    pod: PodInfo
    ingress: Direction = field(default_factory=Direction)
    egress: Direction = field(default_factory=Direction)

    def direction(self, which: str) -> Direction:
        return self.ingress if which == INGRESS else self.egress


@dataclass(frozen=True)
class Decision:
    """One direction's verdict and what decided it."""

    direction: str  # Ingress (judged at the destination) or Egress (at the source)
    allowed: bool
    policy: str | None = None  # namespace/name of the allowing policy
    rule: int | None = None
    reason: str = ""  # "allowed", "default deny", "no policy", "not a pod"

    def __str__(self) -> str:
        if self.policy is not None:
            return f"{self.direction.lower()} allowed by {self.policy} rule {self.rule}"
        return f"{self.direction.lower()}: {self.reason}"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    egress: Decision
    ingress: Decision

    @property
    def deciding(self) -> Decision:
        """The decision that dropped the flow, else the one that allowed it by a policy."""
        if not self.egress.allowed:
            return self.egress
        if not self.ingress.allowed:
            return self.ingress
        return self.ingress if self.ingress.policy else self.egress

    def __str__(self) -> str:
        word = "ALLOWED" if self.allowed else "DROPPED"
        return f"{word}: {self.egress}; {self.ingress}"


def _except(cidr: str, excepts: Iterable[str]) -> tuple[str, ...]:
    """`cidr` minus `excepts`, as a list of CIDRs."""
    nets = [ipaddress.ip_network(cidr, strict=False)]
    for x in excepts:
        hole = ipaddress.ip_network(x, strict=False)
        out = []
        for n in nets:
            if n.version == hole.version and hole.subnet_of(n):  # type: ignore[arg-type]
                out.extend(n.address_exclude(hole))  # type: ignore[arg-type]
            elif n.version == hole.version and n.subnet_of(hole):  # type: ignore[arg-type]
                continue
            else:
                out.append(n)
        nets = out
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, n)))  # type: ignore[arg-type]


class Model:
    """The cluster's pods, namespaces and policies, and what follows from them."""

    def __init__(
        self,
        pods: Iterable[PodInfo],
        namespaces: Mapping[str, Mapping[str, str]],
        policies: Iterable[NetworkPolicy],
    ) -> None:
        self.pods = sorted(pods, key=lambda p: (p.namespace, p.name))
        self.namespaces = dict(namespaces)
        self.policies = sorted(policies, key=lambda p: (p.namespace or "", p.name))
        self.by_ip = {p.ip: p for p in self.pods}
        self.by_key = {p.key: p for p in self.pods}
        # a peer's pods are the same for every pod its policy selects: computed once
        self._peers: dict[int, list[PodInfo]] = {}

    @classmethod
    def of(
        cls, pods: Iterable[Pod], namespaces: Iterable[Namespace], policies: Iterable[NetworkPolicy]
    ) -> Model:
        infos = [i for p in pods if (i := PodInfo.of(p)) is not None]
        return cls(infos, {n.name: dict(n.metadata.labels) for n in namespaces}, policies)

    def ns_labels(self, ns: str) -> Mapping[str, str]:
        # A namespace with no object (yet) still has its name label, as in Kubernetes.
        return self.namespaces.get(ns) or {NAMESPACE_NAME_LABEL: ns}

    # ------------------------------------------------------------ selection

    def selected(self, pol: NetworkPolicy) -> list[PodInfo]:
        """The pods a policy applies to."""
        return [
            p
            for p in self.pods
            if p.namespace == pol.namespace and selects(pol.spec.pod_selector, p.labels)
        ]

    def peer_pods(self, pol: NetworkPolicy, peer: NetworkPolicyPeer) -> list[PodInfo]:
        got = self._peers.get(id(peer))
        if got is None:
            got = self._peers[id(peer)] = self._peer_pods(pol, peer)
        return got

    def _peer_pods(self, pol: NetworkPolicy, peer: NetworkPolicyPeer) -> list[PodInfo]:
        if peer.ip_block is not None:
            nets = [
                ipaddress.ip_network(c) for c in _except(peer.ip_block.cidr, peer.ip_block.except_)
            ]
            return [p for p in self.pods if any(ipaddress.ip_address(p.ip) in n for n in nets)]
        out = []
        for p in self.pods:
            if peer.namespace_selector is None:
                if p.namespace != pol.namespace:
                    continue
            elif not selects(peer.namespace_selector, self.ns_labels(p.namespace)):
                continue
            if peer.pod_selector is not None and not selects(peer.pod_selector, p.labels):
                continue
            out.append(p)
        return out

    def peer_cidrs(self, pol: NetworkPolicy, peer: NetworkPolicyPeer) -> tuple[str, ...]:
        if peer.ip_block is not None:
            return _except(peer.ip_block.cidr, peer.ip_block.except_)
        return tuple(f"{p.ip}/32" for p in self.peer_pods(pol, peer))

    # ------------------------------------------------------------ allow lists

    @staticmethod
    def _ports(ports: list[NetworkPolicyPort], target: PodInfo | None) -> tuple[PortRange, ...]:
        """A rule's ports as ranges, named ones resolved on `target` (None: no names)."""
        out = []
        for p in ports:
            if p.port is None:
                out.append(PortRange(p.protocol))
            elif isinstance(p.port, int):
                out.append(PortRange(p.protocol, p.port, p.end_port or p.port))
            elif target is not None and (hit := target.ports.get(p.port)) and hit[1] == p.protocol:
                out.append(PortRange(p.protocol, hit[0], hit[0]))
        return tuple(dict.fromkeys(out))

    def _ingress(self, pol: NetworkPolicy, pod: PodInfo) -> list[Allow]:
        key = f"{pol.namespace}/{pol.name}"
        out = []
        for i, rule in enumerate(pol.spec.ingress):
            ports = self._ports(rule.ports, pod) if rule.ports else None
            if ports == ():
                continue  # only names this pod does not have: allows nothing
            if not rule.from_:
                out.append(Allow(key, i, None, ports))
                continue
            peers = tuple(
                dict.fromkeys(c for peer in rule.from_ for c in self.peer_cidrs(pol, peer))
            )
            if peers:
                out.append(Allow(key, i, peers, ports))
        return out

    def _egress(self, pol: NetworkPolicy, pod: PodInfo) -> list[Allow]:
        key = f"{pol.namespace}/{pol.name}"
        out: list[Allow] = []
        for i, rule in enumerate(pol.spec.egress):
            named = any(isinstance(p.port, str) for p in rule.ports)
            if not named:
                ports = self._ports(rule.ports, None) if rule.ports else None
                if not rule.to:
                    out.append(Allow(key, i, None, ports))
                    continue
                peers = tuple(
                    dict.fromkeys(c for peer in rule.to for c in self.peer_cidrs(pol, peer))
                )
                if peers:
                    out.append(Allow(key, i, peers, ports))
                continue
            # Named ports resolve on each destination pod: one entry per pod, plus the
            # numeric ports for every peer address.
            numeric = tuple(p for p in rule.ports if not isinstance(p.port, str))
            if numeric:
                ports = self._ports(list(numeric), None)
                peers_or_any = (
                    None
                    if not rule.to
                    else tuple(
                        dict.fromkeys(c for peer in rule.to for c in self.peer_cidrs(pol, peer))
                    )
                )
                if peers_or_any is None or peers_or_any:
                    out.append(Allow(key, i, peers_or_any, ports))
            targets = (
                self.pods
                if not rule.to
                else list(
                    {p.key: p for peer in rule.to for p in self.peer_pods(pol, peer)}.values()
                )
            )
            for t in targets:
                names = [p for p in rule.ports if isinstance(p.port, str)]
                ports = self._ports(names, t)
                if ports:
                    out.append(Allow(key, i, (f"{t.ip}/32",), ports))
        return out

    def policy_of(self, pod: PodInfo) -> PodPolicy:
        """The effective ingress and egress of one pod."""
        out = PodPolicy(pod)
        for pol in self.policies:
            if pol.namespace != pod.namespace or not selects(pol.spec.pod_selector, pod.labels):
                continue
            key = f"{pol.namespace}/{pol.name}"
            types = pol.spec.policy_types or [INGRESS]
            if INGRESS in types:
                d = out.ingress
                d.policies.append(key)
                d.allows = (d.allows or []) + self._ingress(pol, pod)
            if EGRESS in types:
                d = out.egress
                d.policies.append(key)
                d.allows = (d.allows or []) + self._egress(pol, pod)
        return out

    def policies_of(self, pods: Iterable[PodInfo] | None = None) -> dict[str, PodPolicy]:
        """pod key -> its effective policy (every pod, or those given)."""
        return {p.key: self.policy_of(p) for p in (self.pods if pods is None else pods)}

    # ------------------------------------------------------------ verdicts

    @staticmethod
    def judge(direction: str, d: Direction | None, peer: str, protocol: str, port: int) -> Decision:
        if d is None:
            return Decision(direction, True, reason="not a pod")
        if not d.isolated:
            return Decision(direction, True, reason="no policy")
        for a in d.allows or []:
            if a.matches(peer, protocol, port):
                return Decision(direction, True, a.policy, a.rule, "allowed")
        return Decision(
            direction, False, reason=f"default deny (isolated by {', '.join(d.policies)})"
        )

    def verdict(self, src: str, dst: str, protocol: str, port: int) -> Verdict:
        """Whether a new flow from address `src` to `dst` (after any Service DNAT) is allowed."""
        s, d = self.by_ip.get(src), self.by_ip.get(dst)
        eg = self.judge(EGRESS, self.policy_of(s).egress if s else None, dst, protocol, port)
        ing = self.judge(INGRESS, self.policy_of(d).ingress if d else None, src, protocol, port)
        return Verdict(eg.allowed and ing.allowed, eg, ing)
