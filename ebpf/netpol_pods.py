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

from corral.ebpf import loader
from corral.ebpf.pinned_map import HASH, BpfMap, MapSpec, PinnedSet, ip_key, ip_of

MAP = "netpol_pods"
SPEC = MapSpec(MAP, HASH, ctypes.c_uint32, ctypes.c_uint8, 65536)


def pin_path(node: str) -> str:
    return os.path.join(loader.pin_dir(node), MAP)


class PolicedMap(PinnedSet[str]):
    """An open pinned netpol_pods map: the addresses of the pods a policy isolates."""

    @classmethod
    def open(cls, node: str) -> PolicedMap | None:
        m = BpfMap.open(pin_path(node), SPEC)
        return None if m is None else cls(m, ip_key, ip_of)
