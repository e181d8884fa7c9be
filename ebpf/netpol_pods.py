"""The fast path's `netpol_pods` map, seen from the NetworkPolicy component.

ebpf/overlay_fastpath.c declares it CORRAL_PINNED, so the node agent's load pins
it at /sys/fs/bpf/corral/<node>/netpol_pods. It holds the IPv4 address (network
order) of every local pod a NetworkPolicy isolates; the fast path leaves every
packet from or to such a pod to the kernel, whose netfilter rules judge it
(netpolicy/rules.py). Value u8 1.

No pin (the kernel datapath, or the fast path is not loaded yet): `open()`
returns None and the component tries again on its next sync.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

from corral.ebpf import loader
from corral.ebpf.pinned_map import HASH, BpfMap, MapSpec, ip_key, ip_of

MAP = "netpol_pods"
SPEC = MapSpec(MAP, HASH, ctypes.c_uint32, ctypes.c_uint8, 65536)


def pin_path(node: str) -> str:
    return os.path.join(loader.pin_dir(node), MAP)


class PolicedMap:
    """An open pinned netpol_pods map."""

    def __init__(self, m: BpfMap) -> None:
        self.map, self.path = m, m.where

    @classmethod
    def open(cls, node: str) -> PolicedMap | None:
        m = BpfMap.open(pin_path(node), SPEC)
        return None if m is None else cls(m)

    def entries(self) -> set[str]:
        return {ip_of(k) for k in self.map}

    def update(self, add: Iterable[str], remove: Iterable[str]) -> None:
        self.map.update_batch([(ip_key(ip), 1) for ip in add])
        self.map.delete_batch([ip_key(ip) for ip in remove])

    def sync(self, want: set[str]) -> tuple[int, int]:
        """Make the map hold exactly `want`; (added, removed)."""
        have = self.entries()
        add, remove = want - have, have - want
        self.update(add, remove)
        return len(add), len(remove)

    def close(self) -> None:
        self.map.close()
