"""Which datapath carries pod traffic between nodes, and the eBPF fast path's upkeep.

`datapath` ("auto": the eBPF fast path of ebpf/overlay_fastpath.py when BCC can
load it, else the kernel's path; "bpf": the fast path or fail; "kernel": the
kernel's path only, any corral programs removed). The methods taking `ipr` are
blocking and run on the overlay agent's netlink thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from corral.common.metrics import counter_family
from corral.ebpf import overlay_fastpath as fastpath
from corral.node.context import Datapath
from corral.overlay import guard
from corral.overlay.vxlan import Remote

log = logging.getLogger("corral.overlay.agent")


class DatapathKeeper:
    """The fast path once loaded (None until then, or for good with the kernel's path)."""

    def __init__(self, mode: Datapath, node: str, ns: str | None) -> None:
        self.mode = mode
        self.node = node
        self.ns = ns
        self.fastpath: fastpath.FastPath | None = None
        self.why = "datapath kernel was asked for"  # why the kernel's path carries traffic

    def prepare(self, ipr: Any) -> list[str]:
        """Before the first pass: `kernel` removes any programs; `bpf` fails if it cannot load."""
        if self.mode == "kernel":
            return fastpath.detach_all(ipr)
        if self.mode == "bpf" and (why := fastpath.unavailable()):
            raise fastpath.BPFUnavailable(f"datapath bpf: {why} (or use --datapath auto)")
        return []

    def load(self) -> bool:
        """Compile and load the programs (a second of CPU; blocking). False: the kernel's
        path stays, `why` says why."""
        if self.mode == "kernel":
            return False
        fp = fastpath.FastPath(node=self.node)  # pins proxy_endpoints for corral proxy
        try:
            fp.load()
        except fastpath.BPFUnavailable as e:
            (log.error if self.mode == "bpf" else log.warning)(
                "eBPF fast path off, the kernel's path carries all pod traffic: %s", e
            )
            self.why = str(e)
            return False
        self.fastpath = fp
        return True

    def sync(
        self,
        ipr: Any,
        want: fastpath.Settings,
        remotes: list[Remote],
        encapsulated: list[Remote],
        on_link: Callable[[str], bool],
        reattach: bool,
    ) -> list[str]:
        """Bring the fast path's maps and hooks in line with the node's state."""
        fp = self.fastpath
        assert fp is not None
        if fp.settings != want:
            fp.configure(want)
        changes = fp.sync_peer_ips(guard.peer_ips(remotes))  # before from_uplink goes on
        changes += fp.sync_peers(encapsulated, on_link)
        changes += fp.sync_pods(ipr, verify=True)
        changes += fp.attach_all(ipr) if reattach else fp.attach_fixed(ipr)
        return changes

    def doc(self) -> dict[str, Any]:
        """`datapath.json`: which datapath carries pod traffic, and how much."""
        fp = self.fastpath
        out: dict[str, Any] = {"datapath": "kernel", "why": self.why}
        if fp is not None:
            out = {
                "datapath": "bpf",
                "pods": fp.pod_count,
                "peers": fp.peer_count,
                "packets": fp.stats(),
            }
        out["dropped"] = guard.drops(self.ns, fp)
        return out

    def metrics(self) -> list[Any]:
        """The fast path's packet counters (BPF map, summed over CPUs), read at scrape time."""
        fp = self.fastpath
        if fp is None:
            return []
        return [
            counter_family(
                "corral_fastpath_packets",
                "Packets the eBPF fast path handled since it was loaded, by counter",
                "counter",
                fp.stats(),
            )
        ]

    def debug_state(self) -> dict[str, Any]:
        fp = self.fastpath
        return {
            "datapath": "bpf" if fp is not None else "kernel",
            "datapathWhy": None if fp is not None else self.why,
            "fastpathPods": fp.pod_count if fp is not None else 0,
        }

    def close(self) -> None:
        """The attached programs keep working until replaced."""
        if self.fastpath is not None:
            self.fastpath.close()
