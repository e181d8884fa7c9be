"""The fast path's `proxy_endpoints` map, seen from `corral proxy` (a separate process).

ebpf/overlay_fastpath.c declares the map with CORRAL_PINNED, so the node agent's
load pins it at /sys/fs/bpf/corral/<node>/proxy_endpoints; the proxy opens the
pin (no BCC, no compile: libbpf's bpf_obj_get and map calls) and keeps it
holding exactly the service endpoints (IP, port, protocol) it programs. The
fast path leaves packets from those to the kernel, where conntrack un-DNATs
the replies of service flows. Key layout (struct proxy_ep): u32 IP and u16
port in network order, u8 protocol, u8 pad; value u8 1.

No pin (the kernel datapath, or the agent has not loaded the fast path yet):
`open()` returns None and the proxy tries again on its next sync.
"""

from __future__ import annotations

import ctypes
import os
import socket

from corral.ebpf import loader
from corral.ebpf.pinned_map import HASH, BpfMap, MapSpec, PinnedSet, ip_key, ip_of

MAP = "proxy_endpoints"
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}

Endpoint = tuple[str, int, str]  # (IP, port, protocol name)


class Key(ctypes.Structure):
    """struct proxy_ep"""

    _fields_ = [
        ("ip", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


SPEC = MapSpec(MAP, HASH, Key, ctypes.c_uint8, 65536)


def key(ep: Endpoint) -> Key:
    ip, port, proto = ep
    return Key(ip_key(ip), socket.htons(port), PROTOCOLS[proto], 0)


def decode(k: Key) -> Endpoint:
    proto = {v: n for n, v in PROTOCOLS.items()}.get(k.proto, str(k.proto))
    return (ip_of(k.ip), socket.ntohs(k.port), proto)


def pin_path(node: str) -> str:
    return os.path.join(loader.pin_dir(node), MAP)


class EndpointsMap(PinnedSet[Endpoint]):
    """An open pinned proxy_endpoints map."""

    @classmethod
    def open(cls, node: str) -> EndpointsMap | None:
        m = BpfMap.open(pin_path(node), SPEC)
        return None if m is None else cls(m, key, decode)
