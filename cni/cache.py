"""The CNI result cache in libcni's on-disk format (`cniCacheV1`).

`<cache_dir>/results/<network>-<containerID>-<ifname>` holds the conflist bytes
(base64, as Go marshals []byte), the CNI_ARGS, capability args and the ADD
result, so a later DEL or CHECK (by us, or by cnitool/containerd reading the same
directory) gets the prevResult and the exact config the attachment was made with.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from corral.common.files import write_atomic

CACHE_KIND = "cniCacheV1"


@dataclass
class CachedAttachment:
    network: str
    container_id: str
    ifname: str
    config: bytes
    cni_args: list[tuple[str, str]] = field(default_factory=list)
    capability_args: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": CACHE_KIND,
            "containerId": self.container_id,
            "config": base64.b64encode(self.config).decode(),
            "ifName": self.ifname,
            "networkName": self.network,
        }
        if self.cni_args:
            d["cniArgs"] = [list(a) for a in self.cni_args]
        if self.capability_args:
            d["capabilityArgs"] = self.capability_args
        if self.result is not None:
            d["result"] = self.result
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CachedAttachment:
        if d.get("kind") != CACHE_KIND:
            raise ValueError(f"not a {CACHE_KIND} record (kind={d.get('kind')!r})")
        return cls(
            network=d["networkName"],
            container_id=d["containerId"],
            ifname=d["ifName"],
            config=base64.b64decode(d.get("config") or ""),
            cni_args=[(a[0], a[1]) for a in d.get("cniArgs") or []],
            capability_args=d.get("capabilityArgs") or {},
            result=d.get("result"),
        )


class ResultCache:
    def __init__(self, cache_dir: str) -> None:
        self.dir = os.path.join(cache_dir, "results")

    def path(self, network: str, container_id: str, ifname: str) -> str:
        return os.path.join(self.dir, f"{network}-{container_id}-{ifname}")

    def put(self, entry: CachedAttachment) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        p = self.path(entry.network, entry.container_id, entry.ifname)
        write_atomic(p, json.dumps(entry.to_json()), 0o600)

    def get(self, network: str, container_id: str, ifname: str) -> CachedAttachment | None:
        try:
            with open(self.path(network, container_id, ifname)) as f:
                return CachedAttachment.from_json(json.load(f))
        except (OSError, ValueError, KeyError):
            return None

    def delete(self, network: str, container_id: str, ifname: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(network, container_id, ifname))

    def entries(self) -> list[CachedAttachment]:
        """Every readable record (what GC walks after a restart)."""
        out = []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        for name in names:
            if name.endswith(".tmp"):
                continue
            try:
                with open(os.path.join(self.dir, name)) as f:
                    out.append(CachedAttachment.from_json(json.load(f)))
            except (OSError, ValueError, KeyError):
                continue
        return out
