"""subnet.json, as the overlay writes it (see docs/overlay.md): this node's pod range."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from typing import Any

from corral.cni.config import Net4, Range

log = logging.getLogger("corral.cni.server")


class NodeSubnet:
    """subnet.json as written by the overlay, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.data: dict[str, Any] | None = None
        self.range: Range | None = None
        self.network: Net4 | None = None

    def refresh(self) -> bool:
        """Re-read if changed; True if the content changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            changed = self.data is not None
            self._stamp, self.data, self.range, self.network = None, None, None, None
            return changed
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        try:
            with open(self.path) as f:
                data = json.load(f)
            net = ipaddress.IPv4Network(data["subnet"])
            network = ipaddress.IPv4Network(data.get("network") or data["subnet"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s until it is valid: %s", self.path, e)
            return False  # half-written or bad: keep the previous view, retry later
        self._stamp, self.data, self.network = stamp, data, network
        self.range = Range(net, net[1], net[-2], net[1])
        return True

    @property
    def mtu(self) -> int:
        return int((self.data or {}).get("mtu") or 1500)
