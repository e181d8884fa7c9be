"""The nftables mode: service views -> one nf_tables table of corral's own, in-process.

A `ProxyMode` (proxy/mode.py) on the same core as the iptables mode, with
kube-proxy's nftables layout (proxy/nftrules.py): verdict maps dispatch a VIP
or nodePort to its service chain in one lookup, and a sync is exactly one
libnftables transaction (`import nftables`, Debian's python3-nftables over
libnftables.so: no process per sync). A partial sync carries only the changed
services' chains, sets and map elements; a full one (the first, every sync
period, after a failure) rewrites every chain and map of the table in the
same one transaction, so packets never see a half-written table and a
restarted proxy replaces its predecessor's rules without a gap. Affinity sets
that stay are never recreated: their clients stay remembered.

What the iptables mode does around its restore is reused as is: the fast
path's endpoint map is fed before and after each transaction
(proxy/fastpath_endpoints.py) and UDP flows whose endpoint went away are
deleted with conntrack (IptablesMode._clear_udp).

Blocking: the proxy component calls these methods in an executor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from corral.node import netns
from corral.proxy import nftrules as N
from corral.proxy import rules as R
from corral.proxy.core import ServiceView
from corral.proxy.fastpath_endpoints import FastPathEndpoints
from corral.proxy.iptables import IptablesMode, Netfilter
from corral.proxy.mode import ModeContext, SyncResult, record_written

log = logging.getLogger(__name__)


class NftError(RuntimeError):
    """libnftables refused a command (the message is nft's own)."""


# what --mode auto and `unavailable` try (never committed: libnftables' dry run)
PROBE = """add table ip corral-probe
add map ip corral-probe m { type ipv4_addr . inet_proto . inet_service : verdict; }
add set ip corral-probe s { type ipv4_addr; flags dynamic,timeout; }
add chain ip corral-probe c
add chain ip corral-probe pre { type nat hook prerouting priority dstnat; }
add chain ip corral-probe in { type filter hook input priority filter - 10; }
add rule ip corral-probe pre ip daddr . meta l4proto . th dport vmap @m
add rule ip corral-probe pre fib daddr type local ip daddr != 127.0.0.0/8 jump c
add rule ip corral-probe c update @s { ip saddr timeout 10s }
add rule ip corral-probe c numgen random mod 2 vmap { 0 : goto c, 1 : goto c }
add rule ip corral-probe c meta l4proto tcp dnat to 10.0.0.1:80
add rule ip corral-probe in meta l4proto tcp reject with tcp reset
"""


class Nft:
    """One libnftables context in the proxy's network namespace (None: this one).

    A context's netlink socket belongs to the namespace it was made in, so a
    test's proxy is made inside the test's namespace and used from any thread."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self._lock = threading.Lock()  # a context is not thread-safe (canary vs sync)
        self.ctx = self._new_ctx()
        self.transactions = 0

    def _new_ctx(self) -> Any:
        import nftables

        if self.namespace:
            with netns.entered(self.namespace):
                ctx = nftables.Nftables()
        else:
            ctx = nftables.Nftables()
        ctx.set_json_output(True)
        ctx.set_handle_output(False)
        return ctx

    def forget_cache(self) -> None:
        """A fresh context: libnftables keeps the objects of its last transaction in its
        cache (a full sync's whole ruleset: hundreds of MB at 10k services)."""
        with self._lock:
            self.ctx = self._new_ctx()
            _malloc_trim()

    def _dump(self, kind: str, **attrs: str) -> list[Any]:
        """A kernel dump of tables or rules filtered by `attrs`, straight over nfnetlink.

        libnftables fills its whole cache before a `list` (every chain, and for `list
        chain` every set's elements: seconds at 10k services), so the canary and the
        existence checks ask the kernel directly (pyroute2's nftables messages). A
        socket per call: pyroute2's synchronous sockets answer only the thread that
        made them (from another one a dump comes back empty), and the executor's
        threads vary."""
        from pyroute2.netlink.nfnetlink import nftsocket as S

        msg_class, msg_type = {
            "table": (S.nft_table_msg, S.NFT_MSG_GETTABLE),
            "rule": (S.nft_rule_msg, S.NFT_MSG_GETRULE),
        }[kind]
        if self.namespace:
            with netns.entered(self.namespace):
                sock = S.NFTSocket()
        else:
            sock = S.NFTSocket()
        msg = msg_class()
        msg["nfgen_family"] = 2  # NFPROTO_IPV4
        msg["attrs"] = [(f"NFTA_{kind.upper()}_{k.upper()}", v) for k, v in attrs.items()]
        try:
            with self._lock:  # not in the middle of our own transaction
                return list(sock.request_get(msg, msg_type))
        except Exception as e:  # pyroute2 raises NetlinkError and others
            if getattr(e, "code", None) == 2:  # ENOENT: no such table or chain
                return []
            raise NftError(f"nfnetlink dump of {kind}s: {e}") from e
        finally:
            sock.close()

    def cmd(self, text: str) -> str:
        with self._lock:
            rc, out, err = self.ctx.cmd(text)
        if rc != 0:
            raise NftError(err.strip() or f"nft: exit {rc}")
        return out

    def apply(self, text: str) -> None:
        """One transaction: every command in `text` takes effect, or none does."""
        if text:
            self.cmd(text)
            self.transactions += 1

    def dry_run(self, text: str) -> str | None:
        """The kernel's verdict on `text` without committing it: None, or the error."""
        with self._lock:
            self.ctx.set_dry_run(True)
            try:
                rc, _out, err = self.ctx.cmd(text)
            finally:
                self.ctx.set_dry_run(False)
        return None if rc == 0 else (err.strip() or f"exit {rc}")

    def items(self, what: str, terse: bool = False) -> list[dict[str, Any]]:
        """The objects `list <what>` returns (JSON), without the metainfo; `terse`: sets
        without their elements."""
        if terse:
            with self._lock:
                self.ctx.set_terse_output(True)
                try:
                    rc, out, err = self.ctx.cmd(f"list {what}")
                finally:
                    self.ctx.set_terse_output(False)
            if rc != 0:
                raise NftError(err.strip() or f"nft: exit {rc}")
        else:
            out = self.cmd(f"list {what}")
        return [o for o in json.loads(out).get("nftables", []) if "metainfo" not in o]

    def has_table(self, table: str) -> bool:
        return any(m.get_attr("NFTA_TABLE_NAME") == table for m in self._dump("table"))

    def names(self, table: str, kind: str) -> set[str]:
        """Names of the chains ("chain") or sets ("set"; maps are "map") in `table`."""
        out = set()
        for o in self.items(f"{kind}s {N.FAMILY}", terse=True):
            v = o.get(kind)
            if v and v["table"] == table:
                out.add(v["name"])
        return out

    def chain_rules(self, table: str, chain: str) -> int:
        """How many rules `chain` holds (0: none, or no such chain or table)."""
        got = self._dump("rule", table=table, chain=chain)
        return sum(1 for m in got if m.get_attr("NFTA_RULE_CHAIN") == chain)

    def delete_table(self, table: str) -> bool:
        if not self.has_table(table):
            return False
        self.apply(f"delete table {N.FAMILY} {table}")
        return True

    def table(self, table: str) -> list[dict[str, Any]]:
        """The whole table as JSON objects (chains, rules, sets, maps with elements): the
        debug dump's, on demand (seconds at 10k services). The listing's cache goes
        with it."""
        try:
            return self.items(f"table {N.FAMILY} {table}")
        except NftError:
            return []
        finally:
            self.forget_cache()


def _malloc_trim() -> None:
    """Give the freed cache back to the system (glibc keeps it in its arenas)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Conntrack:
    """What IptablesMode._clear_udp reads of its mode: the netfilter commands."""

    def __init__(self, netfilter: Netfilter) -> None:
        self.netfilter = netfilter


class NftablesMode:
    """Programs services into the node's `ip corral-<node>` table; keeps what it wrote
    so partial syncs carry only differences."""

    name: ClassVar[str] = "nftables"
    privileges: ClassVar[str] = "proxy"
    auto_rank: ClassVar[int] = 15  # over iptables; the eBPF mode (20) adds socket LB
    includes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        cluster_cidr: str,
        node: str,
        nft: Nft | None = None,
        netfilter: Netfilter | None = None,
        fast_path: FastPathEndpoints | None = None,
    ) -> None:
        self.cluster_cidr = cluster_cidr
        self.node = node
        self.table = N.table_name(node)
        self.nft = nft or Nft()
        self.netfilter = netfilter or Netfilter(self.nft.namespace)
        self.fast_path = fast_path
        self.rules: dict[str, N.ServiceRules] = {}  # what the kernel holds, per service
        self.written: dict[str, ServiceView] = {}
        self.chains: set[str] | None = None  # owned chains in the kernel (None: unknown)
        self.sets: set[str] | None = None  # affinity sets in the kernel (None: unknown)
        self.hairpin: Counter[str] = Counter()  # endpoint address -> service ports using it
        self.synced = False
        self.last_text = ""  # the last transaction (debugging, tests)

    # ------------------------------------------------------------ the registry's side

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import nftables  # noqa: F401
        except ImportError:
            return (
                "no libnftables Python bindings (Debian python3-nftables); run scripts/bootstrap.sh"
            )
        try:
            why = Nft().dry_run(PROBE)
        except (OSError, NftError) as e:
            why = str(e)
        if why:
            return f"libnftables cannot program this kernel: {why.splitlines()[0]}"
        return None

    @classmethod
    def for_node(cls, ctx: ModeContext) -> NftablesMode:
        nf = Netfilter()
        return cls(ctx.cluster_cidr, ctx.node, Nft(), nf, FastPathEndpoints(ctx.node,
                   nf.dnat_replies))  # fmt: skip

    @classmethod
    def cleanup_node(cls, node: str, namespace: str | None = None) -> list[str]:
        table = N.table_name(node)
        try:
            nft = Nft(namespace)
            if nft.delete_table(table):
                return [f"nftables table {N.FAMILY} {table}"]
        except ImportError:
            pass  # no bindings: this mode never ran here
        except NftError as e:
            log.warning("cannot remove nftables table %s: %s", table, e)
        return []

    # ------------------------------------------------------------ running

    async def run(self, ask_full_sync: Callable[[], None]) -> None:
        return None

    def sync(
        self, full: bool, views: Mapping[str, ServiceView], changed: Iterable[str]
    ) -> SyncResult:
        t0 = time.monotonic()
        changed = set(changed)
        if self.chains is None or self.sets is None:
            full = True
        keys = set(views) | set(self.written) if full else changed
        new = {k: self._rules_of(k, views.get(k), full) for k in keys}
        if not full:
            try:
                tx = N.partial(self.table, {k: self.rules.get(k) for k in keys}, new, self.hairpin)
            except N.VerdictChanged:
                full = True
                keys = set(views) | set(self.written)
                new = {k: self._rules_of(k, views.get(k), True) for k in keys}
        if self.fast_path is not None:
            self.fast_path.before(views, changed, full)
        old_views = {k: self.written.get(k) for k in keys}
        if full:
            if self.chains is None or self.sets is None:
                self.chains, self.sets = self._read_kernel()
            per = {k: r for k, r in new.items() if r is not None}
            tx = N.full(self.table, per, self.cluster_cidr, self.chains, self.sets)
        before_chains = set(self.chains or ())
        text = tx.text()
        self.last_text = text
        try:
            self.nft.apply(text)
        except NftError:
            self.chains = self.sets = None  # re-read on the (full) retry (hairpin too)
            raise
        finally:
            if full:
                self.nft.forget_cache()
        if full:
            self.rules = {k: r for k, r in new.items() if r is not None}
            self.hairpin = N.hairpin_counts(self.rules)
            self.chains = {c for r in self.rules.values() for c in r.chains}
            self.sets = {s for r in self.rules.values() for s in r.sets}
        else:
            assert self.chains is not None and self.sets is not None
            for k, r in new.items():
                old = self.rules.pop(k, None)
                if old is not None:
                    self.chains -= set(old.chains)
                    self.sets -= old.sets
                if r is not None:
                    self.rules[k] = r
                    self.chains |= set(r.chains)
                    self.sets |= r.sets
        flushes = self._clear_udp(old_views, views, before_chains)
        record_written(self, keys, views, full)
        return SyncResult(
            full=full,
            services=len(keys),
            lines=tx.rule_count,
            seconds=time.monotonic() - t0,
            conntrack_flushes=flushes,
        )

    def _rules_of(self, key: str, view: ServiceView | None, full: bool) -> N.ServiceRules | None:
        """A service's rules; a full sync reuses those of a view it wrote unchanged (the
        tracker keeps unchanged views as they were: the periodic full sync at 10k
        services skips ~0.4 s of rule generation)."""
        if view is None:
            return None
        have = self.rules.get(key)
        if full and have is not None:
            was = self.written.get(key)
            if was is view or was == view:
                return have
        return N.service_rules(view, self.cluster_cidr)

    def _read_kernel(self) -> tuple[set[str], set[str]]:
        """Owned chains and sets the table holds (a restarted proxy's predecessor's)."""
        if not self.nft.has_table(self.table):
            return set(), set()
        chains = {c for c in self.nft.names(self.table, "chain") if N.owned_chain(c)}
        sets = {s for s in self.nft.names(self.table, "set") if N.owned_set(s)}
        return chains, sets

    def _clear_udp(
        self,
        old: Mapping[str, ServiceView | None],
        views: Mapping[str, ServiceView],
        kernel_chains: set[str],
    ) -> int:
        """The iptables mode's UDP clean-up; it asks whether the kernel held a service
        port's chain under the iptables mode's name, so translate ours."""
        held = set()
        for v in [*old.values(), *(views.get(k) for k in old)]:
            for sp in v.ports if v is not None else ():
                # only UDP ports matter there (hashing every port cost 0.8 s at 10k)
                if sp.protocol == "UDP" and N.svc_chain(sp) in kernel_chains:
                    held.add(R.svc_chain(sp))
        return IptablesMode._clear_udp(_Conntrack(self.netfilter), old, views, held)  # type: ignore[arg-type]

    # ------------------------------------------------------------ the rest of ProxyMode

    def ready(self) -> bool:
        return self.synced

    def wants_sync(self) -> bool:
        return self.fast_path is not None and self.fast_path.draining

    def canary_ok(self) -> bool:
        """The fixed chains hold their rules: a deleted table or a flushed table or chain
        shows here (a hand-deleted map element is put back by the next full sync)."""
        if not self.synced:
            return True
        want = {c: 1 for c in N.BASE} | {c: len(r) for c, r in N.FIXED.items()}
        try:
            return all(self.nft.chain_rules(self.table, c) == n for c, n in want.items())
        except NftError as e:
            log.warning("proxy canary could not read the table: %s", e)
            return True  # cannot judge: the next check will

    def forget_kernel(self) -> None:
        self.chains = self.sets = None

    def close(self) -> None:
        if self.fast_path is not None:
            self.fast_path.close()

    def cleanup(self) -> list[str]:
        """Remove the table (everything this mode made); what was removed."""
        done = []
        if self.nft.delete_table(self.table):
            done.append(f"nftables table {N.FAMILY} {self.table}")
        self.rules.clear()
        self.written.clear()
        self.chains = self.sets = None
        return done

    def debug(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kernel": {"nftables": describe(self.nft.table(self.table), self.table)},
            "nftables": {
                "table": f"{N.FAMILY} {self.table}",
                "transactions": self.nft.transactions,
                "chains": len(self.chains or ()),
                "sets": len(self.sets or ()),
            },
        }
        if self.fast_path is not None:
            out.update(self.fast_path.debug())
        return out


def describe(objs: list[dict[str, Any]], table: str) -> dict[str, Any]:
    """The table as `corral net` reads it (netdebug/explain.py): chain -> rules (each
    nft's JSON expression list), map -> {key: verdict}, set -> {client: seconds left}."""
    chains: dict[str, list[Any]] = {}
    maps: dict[str, dict[str, str]] = {}
    sets: dict[str, dict[str, Any]] = {}
    for o in objs:
        if "chain" in o:
            chains.setdefault(o["chain"]["name"], [])
        elif "rule" in o:
            r = o["rule"]
            chains.setdefault(r["chain"], []).append(r["expr"])
        elif "map" in o:
            m = o["map"]
            maps[m["name"]] = {_key(e[0]): _verdict(e[1]) for e in m.get("elem", [])}
        elif "set" in o:
            s = o["set"]
            entries: dict[str, Any] = {}
            for e in s.get("elem", []):
                el = e.get("elem", e) if isinstance(e, dict) else e
                if isinstance(el, dict):
                    entries[str(el.get("val"))] = el.get("expires")
                else:
                    entries[str(el)] = None
            sets[s["name"]] = {"timeout": s.get("timeout"), "entries": entries}
    return {"table": f"{N.FAMILY} {table}", "chains": chains, "maps": maps, "sets": sets}


def _key(k: Any) -> str:
    if isinstance(k, dict) and "concat" in k:
        return " . ".join(str(x) for x in k["concat"])
    return str(k)


def _verdict(v: Any) -> str:
    if isinstance(v, dict):
        for verb in ("goto", "jump"):
            if verb in v:
                return f"{verb} {v[verb]['target']}"
        return next(iter(v), "")
    return str(v)
