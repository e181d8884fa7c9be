"""`corral net capture --node N [--pod P] [--vni V] [-w FILE]`: the overlay, decoded live.

Captures on the node's underlay interface and its pods' host veths, never on
`cni0` or `corral.<VNI>`: the eBPF fast path moves pod traffic between the pod's
veth and the underlay directly, so those two see nothing of it. VXLAN is decoded
(VNI, outer and inner addresses, inner protocol and ports), one line per packet.
`-o json` prints one document (every packet) when the capture ends. The
node-side agent (`corral.netdebug.agent sniff --raw`) sends each packet's bytes
too, so `-w FILE` writes a pcap here, on the operator's machine.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from collections.abc import Callable
from typing import Any

from corral.netdebug import check, decode
from corral.netdebug.access import NodeAccess
from corral.netdebug.model import ClusterView
from corral.netdebug.render import Out, Progress, dump_json


class CaptureError(RuntimeError):
    pass


def interfaces(
    cv: ClusterView, dumps: check.NodeDumps, pod: str | None
) -> tuple[list[str], str | None]:
    """(interfaces to watch, the pod's IP): the underlay plus the pods' veths (or one pod's)."""
    ov = check._component(dumps.node, "overlay")
    ul = (ov.get("underlay") or {}).get("iface")
    if not ul:
        raise CaptureError(
            f"{dumps.node and dumps.node.get('node')}: the agent reports no underlay"
        )
    veths = check.pod_veths(dumps.node)
    if pod:
        p = cv.pod(pod)
        if p is None or not p.status.pod_ip:
            raise CaptureError(f"--pod {pod}: no such pod with an IP (corral get pods -o wide)")
        link = veths.get(str(p.status.pod_ip))
        if link is None:
            raise CaptureError(f"--pod {pod}: its IP {p.status.pod_ip} has no veth on this node")
        return [ul, link["name"]], str(p.status.pod_ip)
    return [ul, *sorted(v["name"] for v in veths.values())], None


def run(
    cv: ClusterView,
    acc: NodeAccess,
    args: argparse.Namespace,
    collect: Callable[..., dict[str, check.NodeDumps]],
) -> int:
    d = collect({acc.name: acc}, ("node",))[acc.name]
    if d.node is None:
        raise CaptureError(f"{acc.name} unreachable: {d.node_error}")
    ifaces, pod_ip = interfaces(cv, d, args.pod)
    argv = [acc.python, "-m", "corral.netdebug.agent", "sniff"]
    for i in ifaces:
        argv += ["--iface", i]
    if pod_ip:
        argv += ["--host", pod_ip]
    if args.vni is not None:
        argv += ["--vni", str(args.vni)]
    if args.count:
        argv += ["--count", str(args.count)]
    if args.duration:
        argv += ["--timeout", str(args.duration)]
    if args.write:
        argv.append("--raw")
    names = {str(p.status.pod_ip): p.name for p in cv.pods if p.status.pod_ip}
    names |= {ip: n for n in cv.nodes if (ip := cv.node_ip(n))}
    proc = acc.popen(argv)
    out = Out()
    packets: list[Any] = []
    n = 0
    json_out = args.output == "json"
    records = []
    try:
        with Progress(f"starting the capture on {acc.name}") as prog:
            first = proc.stdout.readline() if proc.stdout else ""
            prog.step("ready")
        if '"ready"' not in first:
            err = (proc.stderr.read() if proc.stderr else "").strip()
            raise CaptureError(f"capture on {acc.name} did not start: {err or first.strip()}")
        if not json_out:
            out.line(out.c(f"capturing on {acc.name}: {', '.join(ifaces)} (Ctrl-C to stop)", "dim"))
        assert proc.stdout is not None
        for ln in proc.stdout:
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if "error" in rec:
                raise CaptureError(f"capture on {acc.name}: {rec['error']}")
            if pod_ip and not _involves(rec, pod_ip):
                continue
            n += 1
            raw = rec.pop("raw", None)
            if raw and args.write:
                from scapy.layers.l2 import Ether

                pkt = Ether(bytes.fromhex(raw))
                pkt.time = rec.get("time", time.time())
                packets.append(pkt)
            if json_out:
                records.append(rec)
            else:
                out.line(decode.line(rec) + _names(rec, names, out))
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(3)
            except Exception:
                proc.kill()
        if args.write:
            from scapy.utils import wrpcap

            wrpcap(args.write, packets)
    if json_out:
        dump_json({"node": acc.name, "interfaces": ifaces, "packets": records})
    elif args.write:
        out.line(out.c(f"{len(packets)} packet(s) written to {args.write}", "dim"))
    return 0


def _names(rec: dict[str, Any], names: dict[str, str], out: Out) -> str:
    """`  (client > web-4l4cz)`: who the inner addresses are, as etcd knows them."""
    i = rec.get("inner") or {}
    src, dst = names.get(i.get("src", "")), names.get(i.get("dst", ""))
    if not (src or dst):
        return ""
    return out.c(f"  ({src or i.get('src')} > {dst or i.get('dst')})", "dim")


def _involves(rec: dict[str, Any], ip: str) -> bool:
    i = rec.get("inner") or {}
    return ip in (i.get("src"), i.get("dst"))
