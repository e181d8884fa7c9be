"""The eBPF mode: pods' service connections translated at connect()/sendmsg() in BPF.

On the same core as the iptables mode (the daemon hands both the same views
and changed keys). Two parts:

- `SockLB` (ebpf/proxy_sock.py): sock_addr programs on the node's cgroup2
  directory translate VIP:port to a backend for every pod process of the
  node: one hash lookup whatever the number of services, no conntrack NAT,
  the backend's own address on the wire (so the overlay fast path carries it
  unchanged). A sync writes only the changed services' map entries, in
  batches.
- the iptables mode's rules, kept for what no socket hook of the node's
  cgroup sees: NodePort and service traffic arriving from other nodes or the
  underlay, the node's own (host-network) processes, connected UDP sockets
  (see ebpf/proxy_sock.c) and SCTP. Pods' TCP and unconnected UDP never
  reach those rules: their packets already carry the backend's address.

The programs are compiled in the background (`load()`, about a second of CPU,
run by the daemon in an executor); until they are attached the iptables
rules serve pods too, so nothing waits for BCC. A restarted proxy finds the
previous run's programs attached and maps pinned: traffic is translated all
through the restart, and the new load replaces the programs atomically and
diffs against what the maps hold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from corral.ebpf import loader, proxy_sock
from corral.proxy.core import ServiceView, usable
from corral.proxy.iptables import IptablesMode, Kernel, SyncResult

log = logging.getLogger(__name__)


def preflight() -> str | None:
    """Why the eBPF mode cannot run here (what is missing and how to fix it), or None."""
    why = loader.unavailable()
    if why:
        return why
    why = proxy_sock.cgroup2_missing()
    if why:
        return why
    try:
        loader.ensure_bpffs()
    except OSError as e:
        return f"no BPF filesystem at {loader.BPFFS} ({e}): mount -t bpf bpf {loader.BPFFS}"
    return None


def node_cgroup(node: str) -> str:
    """The node's cgroup2 directory, where the programs attach (every pod lives below)."""
    from corral.node.cgroups import node_unified_dir

    return node_unified_dir(node)


def sock_entries(
    views: Mapping[str, ServiceView], names: Iterable[str]
) -> dict[str, dict[proxy_sock.SvcKey, proxy_sock.Entry]]:
    """The socket programs' records of these services (a name without a view: none)."""
    out: dict[str, dict[proxy_sock.SvcKey, proxy_sock.Entry]] = {}
    for name in names:
        view, got = views.get(name), out.setdefault(name, {})
        for sp in view.ports if view is not None else ():
            if sp.protocol in proxy_sock.PROTOCOLS:
                eps = usable(view.endpoints_of(sp))  # type: ignore[union-attr]
                backends = tuple(sorted({(e.ip, e.port) for e in eps}))
                entry = proxy_sock.Entry(backends[: proxy_sock.MAX_BACKENDS], sp.affinity_timeout)
                got[(sp.cluster_ip, sp.port, sp.protocol)] = entry
    return out


def explain(e: Exception) -> str:
    text = str(e)
    if "Operation not permitted" in text or "EPERM" in text:
        text += (
            " (the eBPF mode needs root with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN; "
            "use --mode iptables where that is not allowed)"
        )
    return text


class EbpfMode:
    name = "ebpf"

    def __init__(
        self,
        cluster_cidr: str,
        node: str,
        sock: proxy_sock.SockLB | None = None,
        kernel: Kernel | None = None,
    ) -> None:
        self.node = node
        self.iptables = IptablesMode(cluster_cidr, kernel)
        self.behind = _Behind(self.iptables)
        self.sock = sock or proxy_sock.SockLB(node, node_cgroup(node))
        self.loaded = False
        self.attached = False
        self.entries_written = 0
        self.last_map_seconds = 0.0

    def load(self) -> None:
        """Compile and load the programs (blocking, ~1 s); raises BPFUnavailable."""
        t0 = time.monotonic()
        self.sock.load()
        self.loaded = True
        log.info("eBPF proxy programs compiled and loaded in %.2fs", time.monotonic() - t0)

    def sync(
        self, full: bool, views: Mapping[str, ServiceView], changed: Iterable[str]
    ) -> SyncResult:
        changed = set(changed)
        # the maps first: pods' new connections follow a change in milliseconds, whatever
        # the iptables restore of the same change costs afterwards
        t0, n = time.monotonic(), 0
        if self.loaded:
            every = full or not self.attached
            records = sock_entries(views, views if every else changed)
            n = self.sock.sync(records, None if every else changed)
            if not self.attached:
                how = self.sock.attach()
                self.attached = True
                log.info(
                    "eBPF proxy programs on %s (%s); maps pinned under %s",
                    self.sock.cgroup,
                    ", ".join(f"{k} {v}" for k, v in sorted(how.items())),
                    loader.pin_dir(self.node),
                )
            self.entries_written += n
        self.last_map_seconds = time.monotonic() - t0
        # the rules (which serve pods too until the programs are on) follow behind
        self.behind.submit(full, views, changed)
        return SyncResult(full, len(changed), n, self.last_map_seconds)

    def ready(self) -> bool:
        """Services are served: the programs are on, or the first iptables sync is done."""
        return self.attached or self.behind.runs > 0

    def canary_ok(self) -> bool:
        if self.attached and not self.sock.attached_ok():
            log.warning("eBPF proxy programs gone from %s: reattaching", self.sock.cgroup)
            self.attached = False
            return False
        if self.behind.runs == 0 or self.behind.busy:
            return True  # the rules are being written behind: nothing to judge yet
        return self.iptables.canary_ok()

    def forget_kernel(self) -> None:
        self.behind.wait_idle()  # not under a running iptables sync
        self.iptables.forget_kernel()
        self.sock.have = None

    def cleanup(self) -> list[str]:
        return self.iptables.cleanup() + proxy_sock.remove_all(self.node, self.sock.cgroup)

    def debug(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "attached": self.attached,
            "cgroup": self.sock.cgroup,
            "pins": loader.pin_dir(self.node),
            "servicePorts": len(self.sock.have or {}),
            "entriesWritten": self.entries_written,
            "batches": self.sock.batches,
            "iptablesBehind": self.behind.debug(),
        }


class _Behind:
    """The iptables half of a loaded eBPF mode, on its own thread.

    Pods depend on the maps only, so a restore that takes a second at 10k
    services must not hold up the next map update: syncs hand their views
    here and return; the thread coalesces whatever arrived meanwhile into one
    iptables sync (the union of changed keys, full if any asked), and retries
    a failure as a full sync.
    """

    def __init__(self, mode: IptablesMode) -> None:
        self.mode = mode
        self._cv = threading.Condition()
        self._views: Mapping[str, ServiceView] | None = None
        self._changed: set[str] = set()
        self._full = False
        self._thread: threading.Thread | None = None
        self.busy = False
        self.runs = self.errors = 0
        self.last: SyncResult | None = None

    def submit(self, full: bool, views: Mapping[str, ServiceView], changed: set[str]) -> None:
        with self._cv:
            self._views, self._full = views, self._full or full
            self._changed |= changed
            self._cv.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="proxy-iptables", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        from corral.daemon import metrics

        while True:
            with self._cv:
                while self._views is None:
                    self._cv.wait()
                views, full, changed = self._views, self._full, self._changed
                self._views, self._full, self._changed = None, False, set()
                self.busy = True
            try:
                self.last = self.mode.sync(full, views, changed)
                self.runs += 1
            except Exception as e:  # logged, counted and retried
                self.errors += 1
                metrics.PROXY_SYNC_ERRORS.inc()
                log.warning("iptables rules of the eBPF mode: %s; retrying as a full sync", e)
                time.sleep(0.5)
                with self._cv:
                    if self._views is None:
                        self._views = views
                    self._full = True
                    self._changed |= changed
            finally:
                with self._cv:
                    self.busy = self._views is not None
                    self._cv.notify_all()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Until nothing is pending or running (tests, the bench)."""
        end = time.monotonic() + timeout
        with self._cv:
            while self.busy or self._views is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def debug(self) -> dict[str, Any]:
        last = self.last
        return {
            "runs": self.runs,
            "errors": self.errors,
            "busy": self.busy,
            "lastSeconds": None if last is None else round(last.seconds, 4),
        }
