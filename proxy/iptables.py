"""The iptables mode: service views -> nat/filter chains, affinity sets, conntrack.

Every sync is at most one `ipset restore` creating the affinity sets new rules
need, exactly one `iptables-restore --noflush` (through `corral.node.iptables`,
the one path; the host's binary, so nft and legacy backends both work), then
one `ipset restore` destroying the sets nothing references any more, and
`conntrack -D` for UDP flows whose endpoint went away. A partial sync rewrites
the chains of the services that changed and, of the dispatch chains (the top
CORRAL-SERVICES, the VIP buckets of the changed services, CORRAL-NODEPORTS,
the filter REJECTs), only those whose rules changed; a full one rewrites
everything, re-checks the hook rules and deletes owned chains and sets nobody
wants.
When the proxy runs it on a node (`for_node`), the fast path's endpoint map is
fed around each restore (proxy/fastpath_endpoints.py).
Blocking: the proxy component calls these methods in an executor.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from corral.node import iptables, netns
from corral.proxy import fastpath_endpoints
from corral.proxy import rules as R
from corral.proxy.core import ServiceView, usable
from corral.proxy.fastpath_endpoints import FastPathEndpoints
from corral.proxy.mode import ModeContext, SyncResult, record_written

log = logging.getLogger(__name__)


def parse_dnat_replies(text: str) -> set[tuple[str, int, str]]:
    """`conntrack -L` lines -> (reply source IP, port, PROTO): the second src=/sport=."""
    out = set()
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        src = [w[4:] for w in words if w.startswith("src=")]
        sport = [w[6:] for w in words if w.startswith("sport=")]
        if len(src) >= 2 and len(sport) >= 2 and sport[1].isdigit():
            out.add((src[1], int(sport[1]), words[0].upper()))
    return out


@dataclass
class Netfilter:
    """The netfilter commands a sync runs (iptables-restore, ipset, conntrack), in the
    proxy's network namespace (None: this one)."""

    namespace: str | None = None
    calls: list[str] = field(default_factory=list)  # what ran, for tests and debugging

    def _argv(self, argv: list[str]) -> list[str]:
        return netns.command(self.namespace, argv) if self.namespace else argv

    def restore(self, text: str) -> None:
        self.calls.append("iptables-restore")
        # tens of thousands of chains take minutes with iptables-nft on a small machine
        iptables.restore(self.namespace, text, timeout=max(60.0, len(text) / 20000))

    def ipset(self, text: str) -> None:
        self.calls.append("ipset-restore")
        p = subprocess.run(
            self._argv(["ipset", "restore"]),
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if p.returncode != 0:
            raise RuntimeError(f"ipset restore failed: {p.stderr.strip()}")

    def ipset_names(self) -> set[str]:
        p = subprocess.run(
            self._argv(["ipset", "list", "-n"]), capture_output=True, text=True, check=False
        )
        if p.returncode != 0:
            raise RuntimeError(f"ipset list failed: {p.stderr.strip()}")
        return {n for n in p.stdout.split() if n.startswith(R.SET_PREFIX)}

    def chains(self, table: str) -> set[str] | None:
        """Chain names in `table` (None: no such table yet)."""
        p = iptables.run(self.namespace, ["iptables-save", "-t", table], check=False)
        if p.returncode != 0:
            return None
        return {ln[1:].split()[0] for ln in p.stdout.splitlines() if ln.startswith(":")}

    def has_rule(self, table: str, chain: str, rule: list[str]) -> bool:
        return iptables.has_rule(self.namespace, table, chain, rule)

    def canary_ok(self) -> bool:
        for table in ("nat", "filter"):
            have = iptables.chain_rules(self.namespace, table, R.CANARY)
            if not have:
                return False
        return True

    def conntrack_delete(self, args: list[str]) -> None:
        self.calls.append("conntrack " + " ".join(args))
        p = subprocess.run(
            self._argv(["conntrack", "-D", *args]),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        # exit 1 with "0 flow entries have been deleted" is no error
        if p.returncode != 0 and "flow entries" not in p.stderr:
            log.warning("conntrack -D %s failed: %s", " ".join(args), p.stderr.strip())

    def dnat_replies(self) -> set[tuple[str, int, str]] | None:
        """(IP, port, PROTO) of the reply side of every DNATed flow conntrack holds:
        the endpoints that still have connections. None when conntrack cannot say."""
        p = subprocess.run(
            self._argv(["conntrack", "-L", "--dst-nat"]),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if p.returncode != 0:
            log.warning("conntrack -L --dst-nat failed: %s", p.stderr.strip())
            return None
        return parse_dnat_replies(p.stdout)

    def remove_hook(self, table: str, hook: str, rule: list[str]) -> bool:
        changed = False
        while self.has_rule(table, hook, rule):
            iptables.run(self.namespace, ["iptables", "-t", table, "-D", hook, *rule])
            changed = True
        return changed


class IptablesMode:
    """Programs services into netfilter; keeps what it wrote so partial syncs stay small.

    A `ProxyMode` (proxy/mode.py). With `fast_path`, the fast path's endpoint map is
    fed before and after each restore."""

    name: ClassVar[str] = "iptables"
    privileges: ClassVar[str] = "proxy"
    auto_rank: ClassVar[int] = 10
    includes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        cluster_cidr: str,
        netfilter: Netfilter | None = None,
        fast_path: FastPathEndpoints | None = None,
    ) -> None:
        self.cluster_cidr = cluster_cidr
        self.netfilter = netfilter or Netfilter()
        self.fast_path = fast_path
        self.rules: dict[str, R.ServiceRules] = {}
        self.written: dict[str, ServiceView] = {}  # what the kernel holds, per service
        self.chains: set[str] | None = None  # owned chains in the kernel (None: unknown)
        self.sets: set[str] | None = None  # affinity sets in the kernel (None: unknown)
        self.index = R.Index()  # which services have portals (per bucket), nodePorts, ...
        self.dispatch: dict[R.Chain, list[str]] = {}  # dispatch chains as last written
        self.synced = False

    @classmethod
    def unavailable(cls) -> str | None:
        return None  # iptables-restore, ipset and conntrack are what bootstrap.sh installs

    @classmethod
    def for_node(cls, ctx: ModeContext) -> IptablesMode:
        nf = Netfilter()
        return cls(ctx.cluster_cidr, nf, FastPathEndpoints(ctx.node, nf.dnat_replies))

    @classmethod
    def cleanup_node(cls, node: str) -> list[str]:
        return cls("0.0.0.0/0").cleanup() + fastpath_endpoints.clear(node)

    async def run(self, ask_full_sync: Callable[[], None]) -> None:
        return None  # nothing in the background: syncs do everything

    def ready(self) -> bool:
        return self.synced

    def wants_sync(self) -> bool:
        return self.fast_path is not None and self.fast_path.draining

    def close(self) -> None:
        if self.fast_path is not None:
            self.fast_path.close()

    def debug(self) -> dict[str, Any]:
        from corral.node import nodeview

        ns = self.netfilter.namespace
        out: dict[str, Any] = {
            "kernel": {
                "nat": nodeview.iptables_chains(ns, "nat"),
                "filter": nodeview.iptables_chains(ns, "filter"),
                "ipsets": nodeview.ipsets(ns),
            }
        }
        if self.fast_path is not None:
            out.update(self.fast_path.debug())
        return out

    def _set_rules(self, key: str, view: ServiceView | None) -> None:
        old = self.rules.pop(key, None)
        if old is not None:
            self.index.discard(key, old)
        if view is None:
            return
        r = R.service_rules(view, self.cluster_cidr)
        self.rules[key] = r
        self.index.add(key, r)

    def sync(
        self, full: bool, views: Mapping[str, ServiceView], changed: Iterable[str]
    ) -> SyncResult:
        t0 = time.monotonic()
        k = self.netfilter
        changed = set(changed)
        if self.chains is None or self.sets is None:
            full = True
        if self.fast_path is not None:
            # the fast path hands a new endpoint's replies to conntrack before a rule
            # DNATs to it, and a gone one's only after no rule does any more
            self.fast_path.before(views, changed, full)
        keys = set(views) | set(self.written) if full else changed
        old = {key: self.written.get(key) for key in keys}
        prev_chains = {c for key in keys if key in self.rules for c in self.rules[key].chains}
        touched = {self.rules[key].bucket for key in keys if key in self.rules}
        if full:
            self.rules.clear()
            self.index = R.Index()
        for key in keys:
            self._set_rules(key, views.get(key))
        touched |= {self.rules[key].bucket for key in keys if key in self.rules}
        buckets = None if full else {b for b in touched if b is not None}
        want = R.dispatch_rules(self.rules, buckets, self.index)
        # a partial sync writes a dispatch chain only when its rules changed
        changed_only = {c: v for c, v in want.items() if self.dispatch.get(c) != v}
        dispatch = want if full else changed_only
        members = self.index.members
        for b in [b for b, ks in members.items() if not ks]:
            del members[b]
        wanted_sets: dict[str, int] = {}
        for key in self.index.sets:
            wanted_sets.update(self.rules[key].sets)
        hooks = None
        if full:
            if self.chains is None:
                have = k.chains("nat") or set()
                self.chains = {c for c in have if R.owned_chain(c)}
            if self.sets is None:
                self.sets = k.ipset_names()
            hooks = {
                (table, hook): k.has_rule(table, hook, rule)
                for table, hks in (("nat", R.NAT_HOOKS), ("filter", R.FILTER_HOOKS))
                for hook, rule in hks.items()
            }
            wanted_chains = {c for r in self.rules.values() for c in r.chains}
            wanted_chains |= {R.bucket_chain(b) for b in members}
            delete = self.chains - wanted_chains
        else:
            now_chains = {c for key in keys if key in self.rules for c in self.rules[key].chains}
            delete = prev_chains - now_chains
        # owned chains the kernel held before this restore (read on the first sync)
        before_chains = set(self.chains)
        # Only missing sets: `create -exist` fails on a set made with another timeout,
        # and a set's own timeout does not matter (the SET rule gives each entry its own).
        new_sets = {s: t for s, t in wanted_sets.items() if s not in self.sets}
        if new_sets:
            k.ipset(
                "".join(
                    f"create {s} hash:ip timeout {t} -exist\n" for s, t in sorted(new_sets.items())
                )
            )
            self.sets |= set(new_sets)
        rs = R.build(self.rules, None if full else keys, dispatch, delete, hooks, fixed=full)
        if rs.text:
            k.restore(rs.text)
        # what the kernel holds now
        emptied = {c for (_t, c), v in dispatch.items() if not v and R.owned_chain(c)}
        made = {c for key in keys if key in self.rules for c in self.rules[key].chains}
        made |= {c for (t, c), v in dispatch.items() if t == "nat" and R.owned_chain(c) and v}
        self.chains = (self.chains - delete - emptied) | made
        if full:
            self.dispatch = {c: v for c, v in dispatch.items() if v or not R.owned_chain(c[1])}
        else:
            for c, v in dispatch.items():
                if v or not R.owned_chain(c[1]):
                    self.dispatch[c] = v
                else:
                    self.dispatch.pop(c, None)
        stale_sets = self.sets - set(wanted_sets)
        if stale_sets:
            k.ipset("".join(f"destroy {s}\n" for s in sorted(stale_sets)))
            self.sets -= stale_sets
        flushes = self._clear_udp(old, views, before_chains)
        record_written(self, keys, views, full)
        return SyncResult(
            full=full,
            services=len(keys),
            lines=rs.lines,
            seconds=time.monotonic() - t0,
            conntrack_flushes=flushes,
            sets_created=len(new_sets),
            sets_destroyed=len(stale_sets),
            chains_deleted=len(delete | emptied),
        )

    def _clear_udp(
        self,
        old: Mapping[str, ServiceView | None],
        views: Mapping[str, ServiceView],
        kernel_chains: set[str],
    ) -> int:
        """Delete UDP flows to endpoints that went away; stale VIP flows when 0 -> >0.

        A service port whose SVC chain the kernel already held (a restarted
        proxy finds its predecessor's) had endpoints: its flows are live and
        DNATed, and deleting them would send replies in flight to nobody.
        """
        n = 0
        for key, before in old.items():
            after = views.get(key)
            if before is None and after is None:
                continue
            ports_before = {sp.id: sp for sp in before.ports} if before else {}
            for sp in after.ports if after else ():
                if sp.protocol != "UDP":
                    continue
                now = {e.ip for e in usable(after.endpoints_of(sp))}
                prev_sp = ports_before.get(sp.id)
                was = (
                    {e.ip for e in usable(before.endpoints_of(prev_sp))}
                    if before and prev_sp
                    else set()
                )
                if now and not was and R.svc_chain(sp) not in kernel_chains:
                    self.netfilter.conntrack_delete(
                        ["-p", "udp", "--orig-dst", sp.cluster_ip, "--orig-port-dst", str(sp.port)]
                    )
                    n += 1
                for ip in sorted(was - now):
                    self.netfilter.conntrack_delete(
                        ["-p", "udp", "--orig-dst", sp.cluster_ip, "--dst-nat", ip]
                    )
                    n += 1
                    if sp.node_port:
                        self.netfilter.conntrack_delete(
                            ["-p", "udp", "--orig-port-dst", str(sp.node_port), "--dst-nat", ip]
                        )
                        n += 1
                    for eip in sp.external_ips:
                        self.netfilter.conntrack_delete(
                            ["-p", "udp", "--orig-dst", eip, "--dst-nat", ip]
                        )
                        n += 1
            # ports (or the whole service) gone: their flows go with them
            after_ids = {sp.id for sp in after.ports} if after else set()
            for sid, sp in ports_before.items():
                if sp.protocol == "UDP" and sid not in after_ids and before is not None:
                    for ip in sorted({e.ip for e in usable(before.endpoints_of(sp))}):
                        self.netfilter.conntrack_delete(
                            ["-p", "udp", "--orig-dst", sp.cluster_ip, "--dst-nat", ip]
                        )
                        n += 1
        return n

    def canary_ok(self) -> bool:
        return self.netfilter.canary_ok()

    def forget_kernel(self) -> None:
        """Someone changed the tables by hand: the next (full) sync re-reads what is there."""
        self.chains = self.sets = None
        self.dispatch.clear()

    def cleanup(self) -> list[str]:
        """Remove every chain, hook and set the proxy made; what was removed."""
        k = self.netfilter
        done: list[str] = []
        for table, hooks in (("nat", R.NAT_HOOKS), ("filter", R.FILTER_HOOKS)):
            for hook, rule in hooks.items():
                if k.remove_hook(table, hook, rule):
                    done.append(f"{table} {hook} jump")
        by_table: dict[str, set[str]] = {}
        for table, fixed in (("nat", R.FIXED_NAT), ("filter", R.FIXED_FILTER)):
            have = k.chains(table) or set()
            mine = {c for c in have if c in fixed or R.owned_chain(c)}
            by_table[table] = mine
            done += [f"{table} chain {c}" for c in sorted(mine)]
        text = R.cleanup_text(by_table)
        if text:
            k.restore(text)
        sets = k.ipset_names()
        if sets:
            k.ipset("".join(f"destroy {s}\n" for s in sorted(sets)))
            done += [f"ipset {s}" for s in sorted(sets)]
        self.rules.clear()
        self.written.clear()
        self.index = R.Index()
        self.dispatch.clear()
        self.chains = self.sets = None
        return done
