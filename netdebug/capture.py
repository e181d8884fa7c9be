"""`corral net capture --node N [--pod P] [--vni V] [-w FILE]`: the overlay, decoded live.

Captures on the node's underlay interface and its pods' host veths, never on
`cni0` or `corral.<VNI>`: the eBPF fast path moves pod traffic between the pod's
veth and the underlay directly, so those two see nothing of it. VXLAN is decoded
(VNI, outer and inner addresses, inner protocol and ports), one line per packet.
`-o json` prints one document (every packet), written as packets arrive. The
node-side agent (`corral.netdebug.agent sniff --raw`) sends each packet's bytes
too, so `-w FILE` writes a pcap here, on the operator's machine, one packet at a
time as tcpdump does: nothing is held in memory, and SIGTERM or SIGHUP stop the
capture as Ctrl-C does, with the file closed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

from corral.netdebug import check, decode
from corral.netdebug.access import NodeAccess
from corral.netdebug.model import ClusterView
from corral.netdebug.render import JsonStream, Out, Progress
from corral.netdebug.trace import agent_argv

DLT_EN10MB = 1  # pcap link type: Ethernet


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


class Stopped(Exception):
    """SIGTERM or SIGHUP arrived: stop as Ctrl-C does (the pcap is closed, not lost)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise `Stopped` in the main thread, as SIGINT raises
    KeyboardInterrupt, so a `timeout`, a supervisor or a closed terminal ends the
    capture through its `finally`; one that lands after that is swallowed here."""

    def raise_stopped(signum: int, frame: object) -> None:
        raise Stopped(signal.Signals(signum).name)

    before = {s: signal.signal(s, raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    except (KeyboardInterrupt, Stopped):
        pass
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and the stop signals wait while a packet is written (they land right
    after it), so the pcap never ends in half a record."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *STOP_SIGNALS})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def sniffer_argv(
    acc: NodeAccess, ifaces: list[str], pod_ip: str | None, args: argparse.Namespace
) -> list[str]:
    """The node-side sniffer: it applies the filters, `-c` and `--duration` itself."""
    return agent_argv(
        acc, "sniff", iface=ifaces, host=pod_ip, vni=args.vni, count=args.count or None,
        timeout=args.duration or None, raw=bool(args.write),
    )  # fmt: skip


class PcapFile:
    """`-w FILE`: each packet is appended and flushed as it arrives (nothing is kept here),
    so the file is whole up to the last packet whenever the capture stops."""

    def __init__(self, path: str) -> None:
        from scapy.utils import PcapWriter

        self.path = path
        self.count = 0
        self._w = PcapWriter(path, linktype=DLT_EN10MB, sync=True)
        self._w.write_header(None)  # an empty capture is still a valid pcap

    def write(self, raw_hex: str, when: float) -> None:
        from scapy.layers.l2 import Ether

        pkt = Ether(bytes.fromhex(raw_hex))
        pkt.time = when
        self._w.write(pkt)
        self.count += 1

    def close(self) -> None:
        self._w.close()


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
    names = {str(p.status.pod_ip): p.name for p in cv.pods if p.status.pod_ip}
    names |= {ip: n for n in cv.nodes if (ip := cv.node_ip(n))}
    json_out = args.output == "json"
    out = Out()
    with stop_on_signals():
        proc = acc.popen(sniffer_argv(acc, ifaces, pod_ip, args))
        pcap = PcapFile(args.write) if args.write else None
        doc = JsonStream({"node": acc.name, "interfaces": ifaces}, "packets") if json_out else None
        try:
            _await_ready(proc, acc.name)
            if not json_out:
                out.line(
                    out.c(f"capturing on {acc.name}: {', '.join(ifaces)} (Ctrl-C to stop)", "dim")
                )
            assert proc.stdout is not None
            for ln in proc.stdout:
                rec = _record(ln, acc.name)
                if rec is None or (pod_ip and not _involves(rec, pod_ip)):
                    continue
                raw = rec.pop("raw", None)
                if raw and pcap is not None:
                    with signals_held():
                        pcap.write(raw, rec.get("time", time.time()))
                if doc is not None:
                    doc.item(rec)
                else:
                    out.line(decode.line(rec) + _names(rec, names, out))
        finally:
            with signals_held():  # a second Ctrl-C or SIGTERM waits for the files to close
                _stop(proc)
                if pcap is not None:
                    pcap.close()
                if doc is not None:
                    doc.close()
    if pcap is not None and not json_out:
        out.line(out.c(f"{pcap.count} packet(s) written to {pcap.path}", "dim"))
    return 0


def _await_ready(proc: subprocess.Popen, node: str) -> None:
    with Progress(f"starting the capture on {node}") as prog:
        first = proc.stdout.readline() if proc.stdout else ""
        prog.step("ready")
    if '"ready"' not in first:
        err = (proc.stderr.read() if proc.stderr else "").strip()
        raise CaptureError(f"capture on {node} did not start: {err or first.strip()}")


def _record(line: str, node: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if "error" in rec:
        raise CaptureError(f"capture on {node}: {rec['error']}")
    return rec


def _stop(proc: subprocess.Popen) -> None:
    """The node-side sniffer stops on SIGINT as on its own `--count`/`--timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
