"""The mode-independent proxy core: what every Service port should do, and what changed.

kube-proxy's ServiceChangeTracker and EndpointsChangeTracker, on corral's shared
informers. Services and EndpointSlices are reduced to just what a proxy mode
programs (`ServiceView`: the service's ports with their VIP, nodePort and
affinity, and per port the endpoints with their conditions), so changes that
do not matter to the data path (labels, status, resourceVersion) compare equal
and vanish. One `ChangeTracker` keyed by service (`ns/name`) coalesces bursts:
a mode's sync `take()`s the keys that changed and reads the current views.

Endpoints come from EndpointSlices (the endpoints controller writes both
shapes; only the slices carry serving/terminating), grouped by their
`kubernetes.io/service-name` label; a named targetPort is already resolved per
pod in the slice's ports, which are named after the service port.

Which endpoints a service port uses (`usable`): the ready ones; when none is
ready, the ones both serving and terminating (KEP-1669: a rolling update's last
pods keep answering); else none, and the mode rejects.

Traffic policies, here so every mode gets them alike (kube-proxy's
CategorizeEndpoints): the tracker is built for one node and marks the endpoints
on it `local`. `cluster_endpoints` is what in-cluster traffic to the ClusterIP
may use (internalTrafficPolicy Local: the local ones only), `external_endpoints`
what NodePort, externalIPs and LoadBalancer traffic may use (externalTrafficPolicy
Local: the local ones only, and the client's address is kept); `refusal` says
whether an empty set is a REJECT (the service has no endpoint at all) or a DROP
(it has some, none usable under the policy), as kube-proxy answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.api.informer import Informer, InformerFactory
from corral.api.objects import EndpointSlice, Service
from corral.api.tracker import ChangeTracker
from corral.common.labels import SERVICE_NAME_LABEL

BY_SERVICE = "proxy-service"

PortKey = tuple[str, str]  # (service port name or "", protocol)


@dataclass(frozen=True, order=True)
class EndpointInfo:
    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    local: bool = False  # on the proxy's own node (spec.nodeName of the endpoint)


@dataclass(frozen=True)
class ServicePort:
    """One port of a service, as a mode programs it."""

    service: str  # ns/name
    name: str  # the port's name, "" for an unnamed single port
    protocol: str  # TCP, UDP, SCTP
    cluster_ip: str
    port: int
    node_port: int | None = None
    affinity_timeout: int | None = None  # seconds; None: no ClientIP affinity
    external_ips: tuple[str, ...] = ()  # spec.externalIPs, then status.loadBalancer IPs
    internal_local: bool = False  # internalTrafficPolicy: Local
    external_local: bool = False  # externalTrafficPolicy: Local
    health_check_node_port: int | None = None  # LoadBalancer + Local

    @property
    def external(self) -> bool:
        """Reachable from outside the cluster (nodePort, externalIPs, LoadBalancer)."""
        return bool(self.node_port or self.external_ips)

    @property
    def id(self) -> str:
        """A stable identity (names chains and sets): ns/name:port/PROTO."""
        return f"{self.service}:{self.name}/{self.protocol}"

    @property
    def key(self) -> PortKey:
        return (self.name, self.protocol)


@dataclass(frozen=True)
class ServiceView:
    ports: tuple[ServicePort, ...]
    endpoints: tuple[tuple[PortKey, tuple[EndpointInfo, ...]], ...] = ()

    def endpoints_of(self, sp: ServicePort) -> tuple[EndpointInfo, ...]:
        for k, eps in self.endpoints:
            if k == sp.key:
                return eps
        return ()


def service_ports(svc: Service) -> tuple[ServicePort, ...]:
    """The ports a mode programs; none for headless, ExternalName or no VIP yet."""
    spec = svc.spec
    if spec.type == "ExternalName" or spec.headless or not spec.cluster_ip:
        return ()
    timeout = None
    if spec.session_affinity == "ClientIP":
        cfg = spec.session_affinity_config
        timeout = cfg.client_ip.timeout_seconds if cfg is not None else 10800
    external_ips = list(spec.external_ips)
    if spec.type == "LoadBalancer":
        external_ips += [i["ip"] for i in svc.status.load_balancer.ingress if i.get("ip")]
    return tuple(
        ServicePort(
            service=svc.key_name,
            name=p.name or "",
            protocol=p.protocol,
            cluster_ip=spec.cluster_ip,
            port=p.port,
            node_port=p.node_port if spec.type in ("NodePort", "LoadBalancer") else None,
            affinity_timeout=timeout,
            external_ips=tuple(dict.fromkeys(external_ips)),
            internal_local=spec.internal_traffic_policy == "Local",
            external_local=spec.external_traffic_policy == "Local",
            health_check_node_port=spec.health_check_node_port
            if spec.type == "LoadBalancer" and spec.external_traffic_policy == "Local"
            else None,
        )
        for p in spec.ports
    )


def slice_endpoints(
    slices: list[EndpointSlice], node: str | None = None
) -> dict[PortKey, tuple[EndpointInfo, ...]]:
    """Endpoints per service port over all of a service's slices (IPv4), deduplicated;
    those on `node` are marked local."""
    out: dict[PortKey, set[EndpointInfo]] = {}
    for s in slices:
        if s.address_type != "IPv4":
            continue
        for port in s.ports:
            key = (port.name or "", port.protocol)
            bucket = out.setdefault(key, set())
            for ep in s.endpoints:
                c = ep.conditions
                ready = c.ready is not False  # unset means ready (the API's rule)
                serving = ready if c.serving is None else c.serving
                local = node is not None and ep.node_name == node
                for ip in ep.addresses:
                    bucket.add(
                        EndpointInfo(ip, port.port, ready, serving, bool(c.terminating), local)
                    )
    # one entry per (ip, port): a pod listed twice (two slices mid-update) counts once,
    # as ready if either says so
    result: dict[PortKey, tuple[EndpointInfo, ...]] = {}
    for key, eps in out.items():
        best: dict[tuple[str, int], EndpointInfo] = {}
        for e in sorted(eps):
            have = best.get((e.ip, e.port))
            if have is None or (e.ready, e.serving) > (have.ready, have.serving):
                best[(e.ip, e.port)] = e
        result[key] = tuple(sorted(best.values()))
    return result


def usable(eps: tuple[EndpointInfo, ...]) -> tuple[EndpointInfo, ...]:
    """Ready endpoints; else serving+terminating ones (KEP-1669); else none."""
    ready = tuple(e for e in eps if e.ready)
    if ready:
        return ready
    return tuple(e for e in eps if e.serving and e.terminating)


def cluster_endpoints(sp: ServicePort, eps: tuple[EndpointInfo, ...]) -> tuple[EndpointInfo, ...]:
    """What in-cluster traffic to the ClusterIP uses (internalTrafficPolicy applied)."""
    if sp.internal_local:
        return usable(tuple(e for e in eps if e.local))
    return usable(eps)


def external_endpoints(sp: ServicePort, eps: tuple[EndpointInfo, ...]) -> tuple[EndpointInfo, ...]:
    """What NodePort/externalIP/LoadBalancer traffic uses (externalTrafficPolicy applied)."""
    if sp.external_local:
        return usable(tuple(e for e in eps if e.local))
    return usable(eps)


def dnat_targets(sp: ServicePort, eps: tuple[EndpointInfo, ...]) -> set[EndpointInfo]:
    """Every endpoint some path of the port may send to."""
    out = set(cluster_endpoints(sp, eps))
    if sp.external:
        out |= set(external_endpoints(sp, eps))
    return out


def refusal(eps: tuple[EndpointInfo, ...]) -> str:
    """How a path with no endpoint under its policy answers: "REJECT" when the service
    has no usable endpoint at all, "DROP" when it has some elsewhere (kube-proxy)."""
    return "DROP" if usable(eps) else "REJECT"


def _slice_service(s: EndpointSlice) -> list[str]:
    name = s.metadata.labels.get(SERVICE_NAME_LABEL)
    return [f"{s.namespace}/{name}"] if name else []


@dataclass
class Taken:
    """What a sync works from: the keys that changed, and since when they waited."""

    changed: set[str]
    since: dict[str, float] = field(default_factory=dict)  # key -> first change (time.time())


class ServiceTracker:
    """Services and their endpoints, reduced to views, with per-service change tracking.

    `on_change()` is called (with no argument) whenever a view changed, so the
    mode's runner can `run_soon()`.
    """

    def __init__(
        self,
        informers: InformerFactory,
        on_change: Callable[[], None],
        node: str | None = None,
    ) -> None:
        self.node = node  # endpoints on it are `local` (traffic policies)
        self.services: Informer[Service] = informers.informer(Service)
        self.slices: Informer[EndpointSlice] = informers.informer(EndpointSlice)
        self.slices.add_index(BY_SERVICE, _slice_service)
        self._on_change = on_change
        self._ports: dict[str, tuple[ServicePort, ...]] = {}
        self._endpoints: dict[str, dict[PortKey, tuple[EndpointInfo, ...]]] = {}
        self.tracker: ChangeTracker[str, ServiceView] = ChangeTracker()
        self._views: dict[str, ServiceView] = {}  # kept current: a sync reads them all
        self._since: dict[str, float] = {}
        self._regs = [
            self.services.on_change(self._service_changed),
            self.slices.on_change(self._slice_changed),
        ]

    def remove(self) -> None:
        for r in self._regs:
            r.remove()

    async def wait_synced(self) -> None:
        for r in self._regs:
            await r.wait_synced()

    @property
    def has_synced(self) -> bool:
        return all(r.has_synced for r in self._regs)

    def view(self, key: str) -> ServiceView | None:
        return self._views.get(key)

    def _compute(self, key: str) -> ServiceView | None:
        ports = self._ports.get(key)
        if not ports:
            return None
        eps = self._endpoints.get(key, {})
        return ServiceView(ports, tuple(sorted((k, v) for k, v in eps.items() if v)))

    def views(self) -> dict[str, ServiceView]:
        return dict(self._views)

    def _record(self, key: str, old: ServiceView | None) -> None:
        new = self._compute(key)
        if new is None:
            self._views.pop(key, None)
        else:
            self._views[key] = new
        if self.tracker.record(key, old, new):
            self._since.setdefault(key, time.time())
        else:
            self._since.pop(key, None)
        self._on_change()

    def _service_changed(self, old: Service | None, new: Service | None) -> None:
        svc = new or old
        if svc is None:
            return
        key = svc.key_name
        before = self.view(key)
        ports = service_ports(new) if new is not None else ()
        if ports:
            self._ports[key] = ports
        else:
            self._ports.pop(key, None)
        self._record(key, before)

    def _slice_changed(self, old: EndpointSlice | None, new: EndpointSlice | None) -> None:
        keys = set(_slice_service(old) if old else []) | set(_slice_service(new) if new else [])
        for key in keys:
            before = self.view(key)
            eps = slice_endpoints(self.slices.by_index(BY_SERVICE, key), self.node)
            if eps:
                self._endpoints[key] = eps
            else:
                self._endpoints.pop(key, None)
            self._record(key, before)

    def take(self) -> Taken:
        changed = set(self.tracker.take())
        since = {k: self._since.pop(k) for k in changed if k in self._since}
        self._since.clear()
        return Taken(changed, since)

    def __len__(self) -> int:
        return len(self.tracker)
