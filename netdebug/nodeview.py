"""A node's own view of its network, as its daemons' debug sockets report it.

The node agent and the proxy call these from their `debug_state()`; `corral net`
compares the result with etcd. Everything here only reads. The shapes are plain
JSON so a `corral net` of another version (or an operator with `jq`) can read
them.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any

from corral.node import iptables, netns
from corral.node.podveth import parse_pod_alias

IFF_UP = 1
NUD_NAMES = {
    0x01: "incomplete",
    0x02: "reachable",
    0x04: "stale",
    0x08: "delay",
    0x10: "probe",
    0x20: "failed",
    0x40: "noarp",
    0x80: "permanent",
}


def _attached(ipr: Any, index: int) -> list[str]:
    from corral.ebpf import loader

    return loader.attached(ipr, index)


def links(ipr: Any) -> list[dict[str, Any]]:
    """Every link: name, index, kind, MTU, up, MAC, corral's tc programs, pod tag."""
    out = []
    for link in ipr.get_links():
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        alias = link.get_attr("IFLA_IFALIAS")
        tag = parse_pod_alias(alias)
        entry: dict[str, Any] = {
            "name": link.get_attr("IFLA_IFNAME"),
            "index": link["index"],
            "kind": kind,
            "mtu": link.get_attr("IFLA_MTU"),
            "up": bool(link["flags"] & IFF_UP),
            "mac": link.get_attr("IFLA_ADDRESS"),
            "programs": _attached(ipr, link["index"]),
        }
        if tag is not None:
            entry["pod"] = {"ip": tag[0], "mac": tag[1]}
        out.append(entry)
    return out


def overlay(ipr: Any, device: str) -> dict[str, Any]:
    """The VXLAN device, and the routes, neighbours and FDB entries on it (all of them,
    not only corral's: a stray entry is what a debugger wants to see)."""
    from corral.overlay.vxlan import MAIN_TABLE, RTNH_F_ONLINK, RTPROT_CORRAL

    found = ipr.link_lookup(ifname=device)
    out: dict[str, Any] = {"device": None, "routes": [], "neighbours": [], "fdb": []}
    if found:
        index = found[0]
        link = ipr.get_links(index)[0]
        data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        out["device"] = {
            "name": device,
            "index": index,
            "mac": link.get_attr("IFLA_ADDRESS"),
            "mtu": link.get_attr("IFLA_MTU"),
            "up": bool(link["flags"] & IFF_UP),
            "vni": data.get_attr("IFLA_VXLAN_ID") if data is not None else None,
            "local": data.get_attr("IFLA_VXLAN_LOCAL") if data is not None else None,
            "port": data.get_attr("IFLA_VXLAN_PORT") if data is not None else None,
            "addresses": sorted(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(family=socket.AF_INET, index=index)
            ),
        }
        out["neighbours"] = sorted(
            (
                {
                    "ip": n.get_attr("NDA_DST"),
                    "mac": n.get_attr("NDA_LLADDR"),
                    "state": NUD_NAMES.get(n["state"], str(n["state"])),
                }
                for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=index)
                if n["ifindex"] == index
            ),
            key=lambda n: str(n["ip"]),
        )
        out["fdb"] = sorted(
            (
                {"mac": f.get_attr("NDA_LLADDR"), "dst": f.get_attr("NDA_DST")}
                for f in ipr.fdb("dump", ifindex=index)
                if f["ifindex"] == index and f.get_attr("NDA_DST")
            ),
            key=lambda f: str(f["mac"]),
        )
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    out["routes"] = sorted(
        (
            {
                "dst": f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}",
                "gateway": r.get_attr("RTA_GATEWAY"),
                "dev": names.get(r.get_attr("RTA_OIF")),
                "onlink": bool(r["flags"] & RTNH_F_ONLINK),
                "corral": r["proto"] == RTPROT_CORRAL,
                "type": r["type"],
            }
            for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
        ),
        key=lambda r: r["dst"],
    )
    return out


def fastpath_maps(fp: Any) -> dict[str, Any]:
    """The fast path's maps as the programs read them (ebpf/overlay_fastpath.py's FastPath)."""
    return fp.describe() if fp is not None else {}


# ------------------------------------------------------------ the proxy's netfilter


def iptables_chains(namespace: str | None, table: str, prefix: str = "CORRAL-") -> dict[str, Any]:
    """chain -> its rules (`-A ...` lines) for chains named `prefix*`, and the hook
    rules (in built-in chains) that jump to them."""
    p = iptables.run(namespace, ["iptables-save", "-t", table], check=False)
    chains: dict[str, list[str]] = {}
    hooks: dict[str, list[str]] = {}
    if p.returncode != 0:
        return {"error": p.stderr.strip(), "chains": {}, "hooks": {}}
    for ln in p.stdout.splitlines():
        if ln.startswith(":"):
            name = ln[1:].split()[0]
            if name.startswith(prefix):
                chains.setdefault(name, [])
        elif ln.startswith("-A "):
            name = ln.split()[1]
            if name.startswith(prefix):
                chains.setdefault(name, []).append(ln)
            elif f"-j {prefix}" in ln:
                hooks.setdefault(name, []).append(ln)
    return {"chains": chains, "hooks": hooks}


def ipsets(namespace: str | None, prefix: str = "CORRAL-") -> dict[str, Any]:
    """set -> {"timeout": set default, "entries": {ip: seconds left}} from `ipset save`."""
    argv = ["ipset", "save"]
    p = subprocess.run(
        netns.command(namespace, argv) if namespace else argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    out: dict[str, Any] = {}
    if p.returncode != 0:
        return {"error": p.stderr.strip()}
    for ln in p.stdout.splitlines():
        w = ln.split()
        if len(w) < 2 or not w[1].startswith(prefix):
            continue
        if w[0] == "create":
            t = w[w.index("timeout") + 1] if "timeout" in w else None
            out.setdefault(w[1], {"entries": {}})["timeout"] = int(t) if t else None
        elif w[0] == "add" and len(w) >= 3:
            left = int(w[w.index("timeout") + 1]) if "timeout" in w else None
            out.setdefault(w[1], {"entries": {}})["entries"][w[2]] = left
    return out
