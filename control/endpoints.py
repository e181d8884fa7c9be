"""The endpoints controller: Endpoints (v1) and EndpointSlices for each Service.

For every Service with a selector, the pods it selects that have an IP become
addresses, one port per service port (a named targetPort is looked up in each
pod's container ports, so pods may differ). Both shapes are written:

- Endpoints: ready pods in `addresses`, the rest in `notReadyAddresses`;
  terminating pods are left out (kept, as ready, with publishNotReadyAddresses).
- EndpointSlice (what the proxies read): every pod with an IP, terminating
  ones included, with conditions ready (Ready and not terminating), serving
  (Ready, terminating or not) and terminating. With publishNotReadyAddresses
  every endpoint is ready and serving.

Pods are grouped by the ports they resolve to; the slice of the first group is
named after the Service, others `<service>-<hash>`; all carry the labels
`kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by`.
Services without a selector are left alone: their endpoints are the user's.
"""

from __future__ import annotations

import hashlib
import logging

from corral.api.informer import BY_NAMESPACE, Informer, InformerFactory, by_namespace, started
from corral.api.objects import (
    Endpoint,
    EndpointAddress,
    EndpointConditions,
    EndpointPort,
    Endpoints,
    EndpointSlice,
    EndpointSubset,
    ObjectMeta,
    ObjectReference,
    OwnerReference,
    Pod,
    Service,
    ServicePort,
    TypedObject,
)
from corral.api.store import AlreadyExists, Conflict, NotFound, Store
from corral.control.podlifecycle import finished, terminating
from corral.control.selectors import matches
from corral.control.supervisor import Supervisor
from corral.control.workqueue import WorkQueue, run_worker

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.corral.dev"

PortKey = tuple[tuple[str | None, int, str, str | None], ...]


def resolve_target_port(sp: ServicePort, pod: Pod) -> int | None:
    """The pod port a service port sends to; None if a named port is not in the pod."""
    tp = sp.target_port
    if tp is None:
        return sp.port
    if isinstance(tp, int):
        return tp
    for c in pod.spec.containers:
        for cp in c.ports:
            if cp.name == tp and cp.protocol == sp.protocol:
                return cp.container_port
    return None


def pod_ports(svc: Service, pod: Pod) -> PortKey:
    out = []
    for sp in svc.spec.ports:
        port = resolve_target_port(sp, pod)
        if port is not None:
            out.append((sp.name, port, sp.protocol, sp.app_protocol))
    return tuple(out)


def _hostname(svc: Service, pod: Pod) -> str | None:
    if pod.spec.subdomain == svc.name:
        return pod.spec.hostname or (
            pod.name if len(pod.name) <= 63 and "." not in pod.name else None
        )
    return None


def _ref(pod: Pod) -> ObjectReference:
    return ObjectReference(kind="Pod", namespace=pod.namespace, name=pod.name, uid=pod.metadata.uid)


def _owner(svc: Service) -> list[OwnerReference]:
    return [
        OwnerReference(
            api_version="v1",
            kind="Service",
            name=svc.name,
            uid=svc.metadata.uid or "",
            controller=True,
        )
    ]


def selected_pods(svc: Service, pods: list[Pod]) -> list[Pod]:
    return sorted(
        (
            p
            for p in pods
            if p.namespace == svc.namespace
            and p.status.pod_ip
            and not finished(p)
            and matches(svc.spec.selector, p.metadata.labels)
        ),
        key=lambda p: (p.status.pod_ip, p.name),
    )


def _endpoint_ports(key: PortKey) -> list[EndpointPort]:
    return [
        EndpointPort(name=n, port=p, protocol=proto, app_protocol=ap)  # type: ignore[arg-type]
        for n, p, proto, ap in key
    ]


def build_endpoints(svc: Service, pods: list[Pod]) -> Endpoints:
    publish = svc.spec.publish_not_ready_addresses
    groups: dict[PortKey, EndpointSubset] = {}
    for pod in selected_pods(svc, pods):
        if terminating(pod) and not publish:
            continue
        key = pod_ports(svc, pod)
        if svc.spec.ports and not key:
            continue  # none of the service's ports exists in this pod
        sub = groups.setdefault(key, EndpointSubset(ports=_endpoint_ports(key)))
        addr = EndpointAddress(
            ip=pod.status.pod_ip or "",
            hostname=_hostname(svc, pod),
            node_name=pod.spec.node_name,
            target_ref=_ref(pod),
        )
        (sub.addresses if publish or pod.ready else sub.not_ready_addresses).append(addr)
    return Endpoints(
        metadata=ObjectMeta(
            name=svc.name,
            namespace=svc.namespace,
            labels=dict(svc.metadata.labels),
            owner_references=_owner(svc),
        ),
        subsets=[groups[k] for k in sorted(groups, key=repr)],
    )


def slice_name(svc: Service, key: PortKey, first: bool) -> str:
    if first:
        return svc.name
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:6]
    return f"{svc.name[:56]}-{digest}"


def build_slices(svc: Service, pods: list[Pod]) -> list[EndpointSlice]:
    publish = svc.spec.publish_not_ready_addresses
    groups: dict[PortKey, list[Endpoint]] = {}
    for pod in selected_pods(svc, pods):
        key = pod_ports(svc, pod)
        if svc.spec.ports and not key:
            continue
        ready, term = pod.ready, terminating(pod)
        groups.setdefault(key, []).append(
            Endpoint(
                addresses=[pod.status.pod_ip or ""],
                conditions=EndpointConditions(
                    ready=publish or (ready and not term),
                    serving=publish or ready,
                    terminating=term,
                ),
                hostname=_hostname(svc, pod),
                node_name=pod.spec.node_name,
                target_ref=_ref(pod),
            )
        )
    keys = sorted(groups, key=repr) or [()]
    return [
        EndpointSlice(
            metadata=ObjectMeta(
                name=slice_name(svc, key, i == 0),
                namespace=svc.namespace,
                labels={SERVICE_NAME_LABEL: svc.name, MANAGED_BY_LABEL: MANAGED_BY},
                owner_references=_owner(svc),
            ),
            endpoints=groups.get(key, []),
            ports=_endpoint_ports(key),
        )
        for i, key in enumerate(keys)
    ]


def _content(obj: TypedObject) -> dict:
    d = obj.dump()
    md = d.pop("metadata", {})
    d["labels"] = md.get("labels", {})
    d["owners"] = md.get("ownerReferences", [])
    return d


async def write_if_changed(store: Store, want: TypedObject, have: TypedObject | None) -> bool:
    """Create or CAS-update `want` unless `have` already says the same. True if written."""
    if have is not None and _content(have) == _content(want):
        return False
    if have is None:
        try:
            await store.create(want)
            return True
        except AlreadyExists:
            raise Conflict(want.key_name) from None
    want.metadata.uid = have.metadata.uid
    want.metadata.creation_timestamp = have.metadata.creation_timestamp
    want.metadata.resource_version = have.metadata.resource_version
    await store.update(want)
    return True


class EndpointsController:
    def __init__(self, store: Store, informers: InformerFactory | None = None) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own_informers = informers is None
        self.queue = WorkQueue()
        self.services: Informer[Service] = self.informers.informer(Service)
        self.pods: Informer[Pod] = self.informers.informer(Pod)
        self.services.add_index(BY_NAMESPACE, by_namespace)
        self.pods.add_index(BY_NAMESPACE, by_namespace)
        self.services.on_change(self._service_changed)
        self.pods.on_change(self._pod_changed)

    def _service_changed(self, old: Service | None, new: Service | None) -> None:
        svc = new or old
        if svc is not None:
            self.queue.add(svc.key_name)

    def _pod_changed(self, old: Pod | None, new: Pod | None) -> None:
        pod = new or old
        if pod is None:
            return
        labels = [p.metadata.labels for p in (old, new) if p is not None]
        for svc in self.services.by_index(BY_NAMESPACE, pod.namespace or ""):
            if any(matches(svc.spec.selector, lb) for lb in labels):
                self.queue.add(svc.key_name)

    async def sync(self, key: str) -> float | None:
        ns, _, name = key.partition("/")
        svc = await self.store.get(Service, name, ns)
        if svc is None:
            await self._cleanup(name, ns)
            return None
        if not svc.spec.selector or svc.spec.type == "ExternalName":
            return None
        pods = self.pods.by_index(BY_NAMESPACE, ns)
        want_ep = build_endpoints(svc, pods)
        want_slices = build_slices(svc, pods)
        try:
            await write_if_changed(self.store, want_ep, await self.store.get(Endpoints, name, ns))
            keep = set()
            for s in want_slices:
                keep.add(s.name)
                await write_if_changed(
                    self.store, s, await self.store.get(EndpointSlice, s.name, ns)
                )
        except (Conflict, NotFound):
            return 0.0  # someone wrote in between: recompute from fresh state
        for s in await self._managed_slices(name, ns):
            if s.name not in keep:
                await self.store.delete(EndpointSlice, s.name, ns)
        return None

    async def _managed_slices(self, service: str, ns: str) -> list[EndpointSlice]:
        slices, _ = await self.store.list(EndpointSlice, ns)
        return [
            s
            for s in slices
            if s.metadata.labels.get(SERVICE_NAME_LABEL) == service
            and s.metadata.labels.get(MANAGED_BY_LABEL) == MANAGED_BY
        ]

    async def _cleanup(self, name: str, ns: str) -> None:
        ep = await self.store.get(Endpoints, name, ns)
        if ep is not None and any(r.kind == "Service" for r in ep.metadata.owner_references):
            await self.store.delete(Endpoints, name, ns)
        for s in await self._managed_slices(name, ns):
            await self.store.delete(EndpointSlice, s.name, ns)

    async def run(self) -> None:
        async with started(self.informers, stop=self._own_informers), Supervisor() as sv:
            await self.pods.wait_synced()
            await self.services.wait_synced()
            sv.start(run_worker(self.queue, self.sync, "endpoints"), "endpoints-worker")
            await sv.wait()
