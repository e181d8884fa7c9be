"""`corral status`: the health of the local cluster's etcd, nodes, daemons and DNS,
and the queries `up` waits on (`node_ready`, `dns_health`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from corral.api.objects import Node
from corral.api.store import Store, StoreError, TLSFiles
from corral.cluster import daemons, dnsworkload, local
from corral.cluster import state as st
from corral.cluster.etcd import health as etcd_health
from corral.cluster.local import ClusterError
from corral.cluster.state import ClusterState
from corral.node import netns


@dataclass
class NodeHealth:
    name: str
    ip: str
    netns: bool
    holder: bool
    daemons: dict[str, bool]  # daemon -> its process is alive
    ready: str
    healthz: dict[str, str] = field(default_factory=dict)  # daemon -> "ok" or why not


@dataclass
class Health:
    name: str
    etcd_urls: list[str]
    etcd_ok: bool
    etcd_error: str
    nodes: list[NodeHealth]
    relay: bool | None = None  # None: no relay (local etcd, or no loopback endpoint)
    etcd_members: dict[str, bool] = field(default_factory=dict)  # local members' health
    dns: dnsworkload.DNSHealth | None = None  # None: not deployed (or etcd unreachable)

    @property
    def ok(self) -> bool:
        return (
            self.etcd_ok
            and all(self.etcd_members.values())
            and self.relay is not False
            and (self.dns is None or self.dns.answering)
            and all(
                n.netns
                and n.holder
                and all(n.daemons.values())
                and all(v == "ok" for v in n.healthz.values())
                and (n.ready == "True" or "node" not in n.daemons)
                for n in self.nodes
            )
        )


def status(name: str = st.DEFAULT_NAME, state_dir: str | None = None) -> Health:
    s = local.load_state(name, state_dir)
    if s is None:
        sdir = local.state_dir_for(name, state_dir)
        raise ClusterError(
            f"no local cluster named {name!r} (no state in {sdir}); "
            f"start one with `corral up{'' if name == st.DEFAULT_NAME else ' --name ' + name}`"
        )
    tls = s.tls("cli")
    ok, err = etcd_healthy(s.etcd_urls, tls)
    members = {}
    if not s.etcd_external and len(s.etcd_members) > 1:
        members = {
            m.name: etcd_health(f"https://127.0.0.1:{m.client_port}", tls, timeout=2)[0]
            for m in s.etcd_members
        }
    ready: dict[str, str] = {}
    dns = None
    if ok:
        try:
            ready = node_ready(s)
            dns = asyncio.run(dns_health(s))
        except (StoreError, OSError) as e:
            ok, err = False, str(e)
    out = []
    healthz = _healthz_all(s)
    for n in s.nodes:
        ds = {r.role.removeprefix("daemon:"): r.alive() for r in s.daemons if r.node == n.name}
        out.append(
            NodeHealth(
                name=n.name,
                ip=n.ip,
                netns=netns.exists(n.netns),
                holder=n.holder is not None and n.holder.alive(),
                daemons=ds,
                ready=ready.get(n.name, "?"),
                healthz={d: h for (d, node), h in healthz.items() if node == n.name},
            )
        )
    return Health(
        name=s.name,
        etcd_urls=s.etcd_urls,
        etcd_ok=ok,
        etcd_error=err,
        nodes=out,
        relay=None if s.relay is None else s.relay.alive(),
        etcd_members=members,
        dns=dns,
    )


def node_ready(s: ClusterState) -> dict[str, str]:
    """Ready condition status per node name, from etcd ('Missing' when no Node)."""

    async def go() -> dict[str, str]:
        async with Store(s.etcd_urls, timeout=3.0, tls=s.tls("cli")) as store:
            objs, _ = await store.list(Node)
        by = {o.name: o for o in objs}
        out = {}
        for n in s.nodes:
            o = by.get(n.name)
            c = o.status.condition("Ready") if o else None
            out[n.name] = c.status if c else ("Unknown" if o else "Missing")
        return out

    return asyncio.run(go())


async def dns_health(s: ClusterState) -> dnsworkload.DNSHealth | None:
    async with Store(s.etcd_urls, timeout=3.0, tls=s.tls("cli")) as store:
        return await dnsworkload.health(store)


def etcd_healthy(urls: list[str], tls: TLSFiles | None = None) -> tuple[bool, str]:
    err = "no endpoint"
    for u in urls:
        ok, why = etcd_health(u, tls, timeout=2)
        if ok:
            return True, ""
        err = f"{u}: {why}"
    return False, err


def daemon_healthz(url: str, timeout: float = 2.0) -> str:
    """ "ok", or why the daemon at `url` (its /healthz) is not healthy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "?verbose", timeout=timeout) as r:
            r.read()
            return "ok"
    except urllib.error.HTTPError as e:
        lines = e.read().decode(errors="replace").splitlines()
        failed = [ln.removeprefix("[-]") for ln in lines if ln.startswith("[-]")]
        return "; ".join(failed) or f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"no answer from {url} ({getattr(e, 'reason', e)})"


def _healthz_all(s: ClusterState) -> dict[tuple[str, str], str]:
    """(daemon, node) -> daemon_healthz, asked of every daemon with a port, in parallel."""
    asks = {}
    for r in s.daemons:
        d = daemons.by_name(r.role.removeprefix("daemon:"))
        n = s.node(r.node or "")
        if d is not None and n is not None and (url := d.url(n.ip)) and r.alive():
            asks[(d.name, n.name)] = url
    if not asks:
        return {}
    with concurrent.futures.ThreadPoolExecutor(min(8, len(asks))) as pool:
        results = pool.map(daemon_healthz, asks.values())
        return dict(zip(asks, results, strict=True))
