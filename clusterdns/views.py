"""What the DNS server keeps of a Service, an EndpointSlice or a user's v1 Endpoints.

The server's informers are raw ones (`InformerFactory.raw`) whose decoders keep
only the fields DNS reads, in small frozen slotted objects: at 10,000 Services
the pydantic objects a typed informer caches took ~55 MiB, these ~5. The
records were validated when they were written (every writer goes through the
store's typed API); a record that does not have the expected shape is skipped
as undecodable (the informer counts and logs it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from corral.api.objects import EndpointSlice, Service
from corral.common.labels import SERVICE_NAME_LABEL

Port = tuple[str | None, int, str]  # (name, port, protocol)
Address = tuple[tuple[str, ...], bool, str | None]  # (IPs, ready, hostname)

_intern = sys.intern


def _port(p: dict[str, Any]) -> Port:
    name = p.get("name")
    return (_intern(name) if name else None, int(p["port"]), _intern(p.get("protocol") or "TCP"))


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]  # empty while none is allocated; ("None",) headless
    external_name: str | None
    ports: tuple[Port, ...]
    publish_not_ready: bool

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def headless(self) -> bool:
        return self.cluster_ips[:1] == ("None",)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServiceInfo:
        md, spec = d["metadata"], d.get("spec") or {}
        ips = list(spec.get("clusterIPs") or [])
        ip = spec.get("clusterIP")
        if ip and ip not in ips:
            ips.insert(0, ip)
        return cls(
            _intern(md.get("namespace") or "default"),
            md["name"],
            _intern(spec.get("type") or "ClusterIP"),
            tuple(i for i in ips if i),
            spec.get("externalName"),
            tuple(_port(p) for p in spec.get("ports") or []),
            bool(spec.get("publishNotReadyAddresses")),
        )

    @classmethod
    def of(cls, svc: Service) -> ServiceInfo:
        return cls.from_dict(svc.dump())


@dataclass(frozen=True, slots=True)
class SliceInfo:
    namespace: str
    name: str
    service: str | None  # its kubernetes.io/service-name label
    address_type: str
    endpoints: tuple[Address, ...]
    ports: tuple[Port, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SliceInfo:
        md = d["metadata"]
        eps = []
        for e in d.get("endpoints") or []:
            ready = (e.get("conditions") or {}).get("ready") is not False  # absent: ready
            host = e.get("hostname")
            eps.append((tuple(e["addresses"]), ready, _intern(host) if host else None))
        return cls(
            _intern(md.get("namespace") or "default"),
            md["name"],
            (md.get("labels") or {}).get(SERVICE_NAME_LABEL),
            _intern(d.get("addressType") or "IPv4"),
            tuple(eps),
            tuple(_port(p) for p in d.get("ports") or []),
        )

    @classmethod
    def of(cls, s: EndpointSlice) -> SliceInfo:
        return cls.from_dict(s.dump())


@dataclass(frozen=True, slots=True)
class EndpointsInfo:
    """A v1 Endpoints: `subsets` as slices (what mirroring would make); `managed` when
    the endpoints controller wrote it (its slices say the same, so none are kept)."""

    namespace: str
    name: str
    managed: bool
    subsets: tuple[SliceInfo, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EndpointsInfo:
        md = d["metadata"]
        ns, name = _intern(md.get("namespace") or "default"), md["name"]
        if any(r.get("kind") == "Service" for r in md.get("ownerReferences") or []):
            return cls(ns, name, True, ())
        subsets = []
        for i, sub in enumerate(d.get("subsets") or []):
            eps = [
                ((a["ip"],), ready, a.get("hostname"))
                for ready, key in ((True, "addresses"), (False, "notReadyAddresses"))
                for a in sub.get(key) or []
            ]
            ports = tuple(_port(p) for p in sub.get("ports") or [])
            subsets.append(SliceInfo(ns, f"{name}-{i}", name, "IPv4", tuple(eps), ports))
        return cls(ns, name, False, tuple(subsets))


def _decoder(cls: Any) -> Any:
    def decode(value: bytes) -> Any:
        try:
            return cls.from_dict(json.loads(value))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    decode.__qualname__ = f"decode_{cls.__name__}"
    return decode


decode_service = _decoder(ServiceInfo)
decode_slice = _decoder(SliceInfo)
decode_endpoints = _decoder(EndpointsInfo)
