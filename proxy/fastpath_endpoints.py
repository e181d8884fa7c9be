"""Feeding the overlay fast path's `proxy_endpoints` map from the rules a mode writes.

The fast path (ebpf/overlay_fastpath.c) leaves packets whose source is a
service endpoint to the kernel, so conntrack un-DNATs the replies of service
flows. A mode that DNATs (the iptables rules, also kept by the eBPF mode)
keeps the node agent's pinned map holding the endpoints its rules DNAT to:

- `before(views, changed, full)`, ahead of the restore: the endpoints the new
  rules DNAT to go in first, so the first reply already takes the kernel path;
- `after()`, once the restore is in: an endpoint no rule uses any more leaves
  only once conntrack holds no DNATed flow of it (established connections to
  a NotReady endpoint go on; if their replies took the fast path they would
  reach the client with the pod's address and hang). While any is draining,
  `draining` is true and the proxy asks for a sync every canary period.

Deltas come from the changed services only, with a count per endpoint (two
services may share one); full syncs re-read the map. No pin (the kernel
datapath, or the agent still loading): skipped, tried again on the next sync
that adds endpoints or is full. Blocking; the one place the proxy talks to
ebpf/proxy_endpoints.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from corral.proxy.core import ServiceView, dnat_targets

log = logging.getLogger(__name__)

Endpoint = tuple[str, int, str]  # (IP, port, protocol)
DRAIN_BLIND = 600.0  # seconds a gone endpoint stays in the map when conntrack cannot say


def endpoints_of(views: Mapping[str, ServiceView]) -> set[Endpoint]:
    """Every (IP, port, protocol) the rules DNAT to: what the fast path leaves to the kernel."""
    out = set()
    for v in views.values():
        for sp in v.ports:
            out.update((e.ip, e.port, sp.protocol) for e in dnat_targets(sp, v.endpoints_of(sp)))
    return out


class FastPathEndpoints:
    """Keeps node `node`'s pinned `proxy_endpoints` map in step with the DNAT rules.

    `live_flows` returns the (IP, port, PROTO) of the reply side of every
    DNATed flow conntrack holds (None: conntrack cannot say); the iptables
    mode passes its kernel's `dnat_replies`.
    """

    def __init__(self, node: str, live_flows: Callable[[], set[Endpoint] | None]) -> None:
        self.node = node
        self.live_flows = live_flows
        self._map: Any = None  # an open ebpf.proxy_endpoints.EndpointsMap
        self._have: set[Endpoint] | None = None  # what the map holds, as far as we know
        self._ep_of: dict[str, set[Endpoint]] = {}  # service -> endpoints its rules DNAT to
        self._ep_count: Counter[Endpoint] = Counter()
        self._gone: set[Endpoint] = set()  # left the rules in the last `before`
        # no rule DNATs to these any more, but conntrack may still hold their flows:
        # they stay in the map until it does not (endpoint -> since)
        self._draining: dict[Endpoint, float] = {}
        self.note = "not tried"

    @property
    def draining(self) -> bool:
        return bool(self._draining)

    def delta(
        self, views: Mapping[str, ServiceView], changed: Iterable[str], full: bool
    ) -> tuple[set[Endpoint], set[Endpoint]]:
        """Endpoints the rules start and stop DNATing to, from the changed services only."""
        if full:
            self._ep_of.clear()
            self._ep_count.clear()
            keys = set(views)
        else:
            keys = set(changed)
        added: set[Endpoint] = set()
        gone: set[Endpoint] = set()
        for k in keys:
            v = views.get(k)
            new = endpoints_of({k: v}) if v is not None else set()
            old = self._ep_of.pop(k, set())
            for e in new - old:
                self._ep_count[e] += 1
                if self._ep_count[e] == 1:
                    added.add(e)
            for e in old - new:
                self._ep_count[e] -= 1
                if self._ep_count[e] <= 0:
                    del self._ep_count[e]
                    gone.add(e)
            if new:
                self._ep_of[k] = new
        return added, gone

    def before(self, views: Mapping[str, ServiceView], changed: Iterable[str], full: bool) -> None:
        """Ahead of a restore: the endpoints its rules will DNAT to are in the map."""
        added, gone = self.delta(views, changed, full)
        self._gone |= gone
        self._update(added, set(), reread=full)

    def after(self, full: bool) -> None:
        """After the restore: endpoints no rule uses leave, once their flows are gone."""
        gone, self._gone = self._gone, set()
        self._update(set(), gone, reread=False, prune=full, after=True)

    def _open(self) -> bool:
        from corral.ebpf.proxy_endpoints import EndpointsMap

        try:
            self._map = EndpointsMap.open(self.node)
        except OSError as e:
            self.note = f"cannot open the fast path's map: {e}"
            log.warning("%s", self.note)
            return False
        if self._map is None:
            self.note = "no fast path map pinned (kernel datapath, or not loaded yet)"
            return False
        log.info(
            "fast path map %s opened: replies of service flows stay on the kernel path",
            self._map.path,
        )
        return True

    def _update(
        self,
        add: set[Endpoint],
        gone: set[Endpoint],
        reread: bool,
        prune: bool = False,
        after: bool = False,
    ) -> None:
        """Put `add` in the map and, `after` a restore, take out those of `gone` (and of
        the ones not wanted, with `prune`) that conntrack holds no flows of. `reread`
        reads the map first and adds every wanted endpoint it lacks."""
        if self._map is None:
            if not add and not reread:
                return  # not open: the next sync that adds tries again
            if not self._open():
                return
            reread = True
        try:
            if reread or self._have is None:
                self._have = self._map.entries()
                add = add | (set(self._ep_count) - self._have)
            for e in add:
                self._draining.pop(e, None)
            if prune:
                gone = gone | (self._have - set(self._ep_count))
            gone = self._drained(gone) if after else set()
            self._map.update(add, gone)
            self._have = (self._have | add) - gone
        except OSError as e:
            # the agent may have reloaded with a new pin: reopen next time
            self.close()
            raise RuntimeError(f"fast path endpoints map: {e}") from e
        self.note = f"map id {self._map.id}"
        if add or gone:
            log.debug("fast path endpoints: +%d -%d", len(add), len(gone))

    def _drained(self, gone: set[Endpoint]) -> set[Endpoint]:
        """Of the endpoints no rule uses any more (`gone` and those already draining),
        the ones conntrack holds no DNATed flow of: only those may leave the map."""
        now = time.monotonic()
        for e in gone:
            self._draining.setdefault(e, now)
        for e in [e for e in self._draining if e in self._ep_count]:
            del self._draining[e]  # wanted again
        if not self._draining:
            return set()
        live = self.live_flows()
        if live is None:  # conntrack cannot say: keep them a while, then let go
            done = {e for e, t in self._draining.items() if now - t > DRAIN_BLIND}
        else:
            done = {e for e in self._draining if e not in live}
        for e in done:
            del self._draining[e]
        return done

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._map = self._have = None

    def debug(self) -> dict[str, Any]:
        return {"fastPathMap": self.note, "fastPathDraining": len(self._draining)}


def clear(node: str) -> list[str]:
    """Empty node `node`'s map (`corral proxy --cleanup`; blocking)."""
    from corral.ebpf.proxy_endpoints import EndpointsMap

    with contextlib.suppress(OSError, ValueError):
        m = EndpointsMap.open(node)
        if m is not None:
            gone = m.entries()
            m.update((), gone)
            m.close()
            return [f"fast path map: {len(gone)} endpoint(s)"]
    return []
