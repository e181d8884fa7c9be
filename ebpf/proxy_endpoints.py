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
import errno
import os
import socket
from collections.abc import Iterable

from corral.ebpf import loader

MAP = "proxy_endpoints"
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}

Endpoint = tuple[str, int, str]  # (IP, port, protocol name)


class _Key(ctypes.Structure):
    _fields_ = [
        ("ip", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


def _lib() -> ctypes.CDLL:
    lib = loader._bpf()
    if not getattr(lib, "_corral_map_calls", False):
        vp = ctypes.c_void_p
        lib.bpf_map_update_elem.argtypes = [ctypes.c_int, vp, vp, ctypes.c_uint64]
        lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, vp]
        lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, vp, vp]
        lib._corral_map_calls = True
    return lib


def key(ep: Endpoint) -> _Key:
    ip, port, proto = ep
    return _Key(loader.ip_key(ip), socket.htons(port), PROTOCOLS[proto], 0)


def decode(k: _Key) -> Endpoint:
    proto = {v: n for n, v in PROTOCOLS.items()}.get(k.proto, str(k.proto))
    return (socket.inet_ntoa(k.ip.to_bytes(4, "little")), socket.ntohs(k.port), proto)


def pin_path(node: str) -> str:
    return os.path.join(loader.pin_dir(node), MAP)


class EndpointsMap:
    """An open pinned proxy_endpoints map."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        info = loader.map_info(fd)
        if (info.key_size, info.value_size) != (ctypes.sizeof(_Key), 1):
            os.close(fd)
            raise OSError(
                errno.EINVAL, f"{path}: key/value sizes {info.key_size}/{info.value_size}"
            )
        self.id = int(info.id)

    @classmethod
    def open(cls, node: str) -> EndpointsMap | None:
        path = pin_path(node)
        if not os.path.exists(path):
            return None
        fd = _lib().bpf_obj_get(path.encode())
        if fd < 0:
            raise OSError(-fd, f"bpf_obj_get {path}: {os.strerror(-fd)}")
        return cls(fd, path)

    def entries(self) -> set[Endpoint]:
        lib, out = _lib(), set()
        cur, nxt = None, _Key()
        while lib.bpf_map_get_next_key(self.fd, ctypes.byref(cur) if cur else None,
                                       ctypes.byref(nxt)) == 0:  # fmt: skip
            out.add(decode(nxt))
            cur, nxt = nxt, _Key()
        return out

    def update(self, add: Iterable[Endpoint], remove: Iterable[Endpoint]) -> None:
        lib, one = _lib(), ctypes.c_uint8(1)
        for ep in add:
            k = key(ep)
            rc = lib.bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(one), 0)
            if rc < 0:
                raise OSError(-rc, f"{self.path}: update {ep}: {os.strerror(-rc)}")
        for ep in remove:
            k = key(ep)
            rc = lib.bpf_map_delete_elem(self.fd, ctypes.byref(k))
            if rc < 0 and -rc != errno.ENOENT:
                raise OSError(-rc, f"{self.path}: delete {ep}: {os.strerror(-rc)}")

    def sync(self, want: set[Endpoint]) -> tuple[int, int]:
        """Make the map hold exactly `want`; (added, removed)."""
        have = self.entries()
        add, remove = want - have, have - want
        self.update(add, remove)
        return len(add), len(remove)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
