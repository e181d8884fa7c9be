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

At scale (10,000 Services, 30,000 pods) nothing is read per Service from etcd:
Services, pods, Endpoints and EndpointSlices all come from the process's
informers. A pod change finds its Services through an index of Services by
selector pair (`ns/key=value`), and a Service finds its pods through the pods'
label index (the rarest selector pair first), so neither scans the other kind.
Workers take batches of Services and write what changed in transactions of up
to 128 objects: a create only if absent, an update or delete only at the
revision it was computed from. A transaction that fails is written again
Service by Service; one that still fails is looked at again once the
informers have caught up. What the controller wrote itself is remembered until
its watch event arrives, so a batch never works from a cache older than its
own last write.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from corral.api.informer import (
    BY_LABEL,
    Informer,
    InformerFactory,
    by_label,
    label_pair,
    selected,
    started,
)
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
from corral.api.selectors import matches
from corral.api.store import AlreadyExists, Conflict, Store, batched
from corral.common.labels import ENDPOINTSLICE_MANAGED_BY_LABEL, SERVICE_NAME_LABEL
from corral.common.supervisor import Supervisor
from corral.control.podlifecycle import finished, terminating
from corral.control.workqueue import WorkQueue, run_batch_worker

log = logging.getLogger(__name__)

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


# The small models below are built with `model_construct` (no validation): every
# value comes from a Pod or Service that was validated when it was read (pod IPs
# are IPAddress fields, names DNS labels), and at 10,000 Services re-validating
# them was a fifth of the controller's CPU. The Endpoints/EndpointSlice around
# them is still validated (pydantic takes model instances as they are).


def _ref(pod: Pod) -> ObjectReference:
    return ObjectReference.model_construct(
        kind="Pod", namespace=pod.namespace, name=pod.name, uid=pod.metadata.uid
    )


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
        EndpointPort.model_construct(name=n, port=p, protocol=proto, app_protocol=ap)
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
        sub = groups.setdefault(
            key,
            EndpointSubset.model_construct(
                addresses=[], not_ready_addresses=[], ports=_endpoint_ports(key)
            ),
        )
        addr = EndpointAddress.model_construct(
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
            Endpoint.model_construct(
                addresses=[pod.status.pod_ip or ""],
                conditions=EndpointConditions.model_construct(
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
                labels={SERVICE_NAME_LABEL: svc.name, ENDPOINTSLICE_MANAGED_BY_LABEL: MANAGED_BY},
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


BY_SELECTOR = "selector"
BY_SERVICE = "service"


def by_selector(svc: Service) -> list[str]:
    """A Service under each pair of its selector (`ns/key=value`)."""
    return [label_pair(svc.namespace, k, v) for k, v in (svc.spec.selector or {}).items()]


def by_service(s: EndpointSlice) -> list[str]:
    """A slice this controller manages, under its Service (`ns/name`)."""
    labels = s.metadata.labels
    name = labels.get(SERVICE_NAME_LABEL)
    if name and labels.get(ENDPOINTSLICE_MANAGED_BY_LABEL) == MANAGED_BY:
        return [f"{s.namespace}/{name}"]
    return []


def _inputs(svc: Service) -> tuple:
    """What of a Service its endpoints depend on (not its VIP, node ports or status)."""
    sp = svc.spec
    return (
        svc.metadata.uid,
        svc.metadata.labels,
        sp.type,
        sp.selector,
        sp.publish_not_ready_addresses,
        [(p.name, p.port, p.protocol, p.app_protocol, p.target_port) for p in sp.ports],
    )


@dataclass
class Changes:
    """What one Service's endpoints need: written in one transaction, or not at all."""

    key: str
    creates: list[TypedObject] = field(default_factory=list)
    updates: list[TypedObject] = field(default_factory=list)
    deletes: list[tuple[type[TypedObject], str, str | None, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.creates) + len(self.updates) + len(self.deletes)

    @property
    def nbytes(self) -> int:
        """An upper estimate of the encoded size (encoding twice cost more than it saved)."""
        return sum(_size_estimate(o) for o in (*self.creates, *self.updates)) + 128 * len(
            self.deletes
        )


def _size_estimate(o: TypedObject) -> int:
    if isinstance(o, Endpoints):
        n = sum(len(s.addresses) + len(s.not_ready_addresses) for s in o.subsets)
    elif isinstance(o, EndpointSlice):
        n = len(o.endpoints)
    else:
        return len(Store.encode(o))
    return 1024 + 512 * n


class _Written:
    """What this controller wrote, per cache key, until its informer has caught up."""

    def __init__(self, informer: Informer[Any]) -> None:
        self.informer = informer
        self.mine: dict[str, tuple[int, TypedObject | None]] = {}  # key -> (revision, obj)
        informer.on_change(self._seen)

    def _seen(self, old: TypedObject | None, new: TypedObject | None) -> None:
        obj = new or old
        if obj is None:
            return
        mine = self.mine.get(obj.key_name)
        if mine is None:
            return
        # A delete (ours or anyone's) or a version at least as new as ours: the cache
        # knows best from here. (An older delete arriving before our create only
        # costs a failed create, retried once the create's event is in.)
        if new is None or int(new.metadata.resource_version or 0) >= mine[0]:
            del self.mine[obj.key_name]

    def forget(self, key: str) -> None:
        self.mine.pop(key, None)

    def get(self, key: str) -> TypedObject | None:
        """The newest of the cache and our own last write."""
        mine = self.mine.get(key)
        cached = self.informer.cache.get(key)
        if mine is None:
            return cached
        if cached is not None and int(cached.metadata.resource_version or 0) >= mine[0]:
            del self.mine[key]
            return cached
        return mine[1]

    def record(self, key: str, revision: int, obj: TypedObject | None) -> None:
        self.mine[key] = (revision, obj)


class EndpointsController:
    WORKERS = 4  # batch workers on one queue (each holds different Services)
    BATCH = 64  # Services per batch; their objects go in transactions of <= 128

    def __init__(self, store: Store, informers: InformerFactory | None = None) -> None:
        self.store = store
        self.informers = informers or InformerFactory(store)
        self._own_informers = informers is None
        self.queue = WorkQueue()
        self.services: Informer[Service] = self.informers.informer(Service)
        self.pods: Informer[Pod] = self.informers.informer(Pod)
        self.endpoints: Informer[Endpoints] = self.informers.informer(Endpoints)
        self.slices: Informer[EndpointSlice] = self.informers.informer(EndpointSlice)
        self.services.add_index(BY_SELECTOR, by_selector)
        self.pods.add_index(BY_LABEL, by_label)
        self.slices.add_index(BY_SERVICE, by_service)
        self._eps = _Written(self.endpoints)
        self._slices = _Written(self.slices)
        self.services.on_change(self._service_changed)
        self.pods.on_change(self._pod_changed)
        self.endpoints.on_change(self._output_changed)
        self.slices.on_change(self._output_changed)
        self._slice_names: dict[str, set[str]] = {}  # ns/service -> slices we wrote
        self.writes = 0  # objects written (created, updated or deleted)
        self.conflicts = 0  # transactions whose compare failed

    def _service_changed(self, old: Service | None, new: Service | None) -> None:
        if old is not None and new is not None and _inputs(old) == _inputs(new):
            return  # its VIP or node ports were filled in: the endpoints stay as they are
        svc = new or old
        if svc is not None:
            self.queue.add(svc.key_name)

    def _output_changed(self, old: TypedObject | None, new: TypedObject | None) -> None:
        """Someone deleted what we manage while its Service lives: it is synced again.
        (Only deletes: reacting to every update would re-plan each of our own writes.)"""
        if old is None or new is not None:
            return
        if isinstance(old, EndpointSlice):
            keys = by_service(old)
        elif any(r.kind == "Service" for r in old.metadata.owner_references):
            keys = [old.key_name]
        else:
            return
        for key in keys:
            if key in self.services.cache:
                self.queue.add(key)

    def _pod_changed(self, old: Pod | None, new: Pod | None) -> None:
        labels = [p.metadata.labels for p in (old, new) if p is not None]
        ns = (new or old).namespace  # type: ignore[union-attr]
        candidates: set[str] = set()
        for lb in labels:
            for k, v in lb.items():
                candidates |= self.services.index_keys(BY_SELECTOR, label_pair(ns, k, v))
        for key in candidates:
            svc = self.services.cache.get(key)
            if svc is not None and any(matches(svc.spec.selector, lb) for lb in labels):
                self.queue.add(key)

    # ---------------------------------------------------------------- planning

    def _upsert(self, ch: Changes, want: TypedObject, have: TypedObject | None) -> None:
        if have is not None and _content(have) == _content(want):
            return
        if have is None:
            ch.creates.append(want)
            return
        want.metadata.uid = have.metadata.uid
        want.metadata.creation_timestamp = have.metadata.creation_timestamp
        want.metadata.resource_version = have.metadata.resource_version
        ch.updates.append(want)

    def _managed_slices(self, key: str) -> list[EndpointSlice]:
        ns = key.partition("/")[0]
        names = {k.partition("/")[2] for k in self.slices.index_keys(BY_SERVICE, key)}
        names |= self._slice_names.get(key, set())
        out = []
        for n in sorted(names):
            s = self._slices.get(f"{ns}/{n}")
            if s is not None and by_service(s) == [key]:  # type: ignore[arg-type]
                out.append(s)
        return out  # type: ignore[return-value]

    def plan(self, key: str) -> Changes:
        ns, _, name = key.partition("/")
        ch = Changes(key)
        svc = self.services.get(name, ns)
        if svc is None:
            ep = self._eps.get(key)
            if ep is not None and any(r.kind == "Service" for r in ep.metadata.owner_references):
                ch.deletes.append((Endpoints, name, ns, int(ep.metadata.resource_version or 0)))
            for s in self._managed_slices(key):
                ch.deletes.append(
                    (EndpointSlice, s.name, ns, int(s.metadata.resource_version or 0))
                )
            return ch
        if not svc.spec.selector or svc.spec.type == "ExternalName":
            return ch
        pods = selected(self.pods, ns, svc.spec.selector)
        self._upsert(ch, build_endpoints(svc, pods), self._eps.get(key))
        keep = set()
        for s in build_slices(svc, pods):
            keep.add(s.name)
            self._upsert(ch, s, self._slices.get(f"{ns}/{s.name}"))
        for s in self._managed_slices(key):
            if s.name not in keep:
                ch.deletes.append(
                    (EndpointSlice, s.name, ns, int(s.metadata.resource_version or 0))
                )
        return ch

    # ---------------------------------------------------------------- writing

    async def _commit(self, changes: list[Changes]) -> bool:
        creates = [o for c in changes for o in c.creates]
        updates = [o for c in changes for o in c.updates]
        deletes = [d for c in changes for d in c.deletes]
        try:
            rev = await self.store.commit(creates=creates, updates=updates, deletes=deletes)
        except Conflict:
            self.conflicts += 1
            return False
        for o in (*creates, *updates):
            if isinstance(o, Endpoints):
                self._eps.record(o.key_name, rev, o)
            else:
                self._slices.record(o.key_name, rev, o)
                for svc_key in by_service(o):  # type: ignore[arg-type]
                    self._slice_names.setdefault(svc_key, set()).add(o.name)
        for c in changes:
            for kind, name, ns, _ in c.deletes:
                if kind is Endpoints:
                    self._eps.record(f"{ns}/{name}", rev, None)
                else:
                    self._slices.record(f"{ns}/{name}", rev, None)
                    self._slice_names.get(c.key, set()).discard(name)
            if not self._slice_names.get(c.key, True):
                del self._slice_names[c.key]
        self.writes += len(creates) + len(updates) + len(deletes)
        return True

    async def sync_batch(self, keys: list[str]) -> dict[str, float]:
        """Plan each Service from the informers; write the changes in batched
        transactions, falling back to one Service per transaction. {key: delay}."""
        again: dict[str, float] = {}
        plans = [ch for ch in (self.plan(k) for k in keys) if ch.size]
        for batch in batched(plans, size=lambda c: c.nbytes, ops=lambda c: c.size):
            if await self._commit(batch):
                continue
            for ch in batch:
                if len(batch) == 1 or not await self._commit([ch]):
                    again[ch.key] = 0.1  # written meanwhile: plan again once the cache has it
                    for o in (*ch.creates, *ch.updates):  # from the cache, not our memory
                        (self._eps if isinstance(o, Endpoints) else self._slices).forget(o.key_name)
                    for kind, name, ns, _ in ch.deletes:
                        (self._eps if kind is Endpoints else self._slices).forget(f"{ns}/{name}")
        return again

    async def sync(self, key: str) -> float | None:
        """One Service (tests, and callers outside the workers)."""
        return (await self.sync_batch([key])).get(key)

    async def run(self) -> None:
        async with started(self.informers, stop=self._own_informers), Supervisor() as sv:
            for inf in (self.pods, self.services, self.endpoints, self.slices):
                await inf.wait_synced()
            for i in range(self.WORKERS):
                sv.start(
                    run_batch_worker(self.queue, self.sync_batch, "endpoints", self.BATCH),
                    f"endpoints-worker-{i}",
                )
            await sv.wait()
