"""The node-side half of `corral net trace` and `capture`: run on a node, speak JSON lines.

    python -m corral.netdebug.agent sniff --iface eth0 [--iface ...] [--netns PATH]
        [--src IP] [--dst IP[,IP]] [--sport N] [--count N] [--timeout S] [--vni V] [--raw]
    python -m corral.netdebug.agent connect --netns PATH --dst IP --port N --proto tcp
        --sport N [--timeout S]
    python -m corral.netdebug.agent resolve --netns PATH --name NAME --server IP
    python -m corral.netdebug.agent conntrack --src IP --dst IP --dport N --sport N

`corral net` starts it through the node's access (nsenter on the local cluster,
`--via` elsewhere), so the same code runs wherever the node is. `sniff` prints
`{"ready": true}` once its sockets are open, then one decoded packet per line.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from typing import Any


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    sys.stdout.flush()


def _enter(path: str | None) -> None:
    if path:
        from corral.node import netns

        netns.enter_thread(path)


def cmd_sniff(a: argparse.Namespace) -> int:
    _enter(a.netns)
    import logging

    import scapy.layers.inet
    import scapy.layers.vxlan  # noqa: F401
    from scapy.config import conf
    from scapy.layers.l2 import Ether
    from scapy.sendrecv import AsyncSniffer

    logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

    from corral.netdebug import decode

    conf.verb = 0
    dst = set(a.dst.split(",")) if a.dst else None
    seen = 0
    done = False

    def on(pkt: Any) -> None:
        nonlocal seen, done
        if done:
            return
        if not isinstance(pkt, Ether):  # scapy may not know a namespace's interfaces
            t, on_iface = pkt.time, getattr(pkt, "sniffed_on", None)
            pkt = Ether(bytes(pkt))
            pkt.time, pkt.sniffed_on = t, on_iface
        rec = decode.decode(pkt)
        if rec is None:
            return
        if (a.src or dst or a.sport) and not decode.matches(rec, a.src, dst, a.sport):
            return
        if a.vni is not None and rec.get("vni") != a.vni:
            return
        if a.host and a.host not in (
            (rec.get("inner") or {}).get("src"),
            (rec.get("inner") or {}).get("dst"),
        ):
            return
        rec["iface"] = getattr(pkt, "sniffed_on", None) or a.iface[0]
        rec["time"] = float(pkt.time)
        if a.raw:
            rec["raw"] = bytes(pkt).hex()
        _emit(rec)
        seen += 1
        if a.count and seen >= a.count:
            done = True

    sn = AsyncSniffer(
        iface=a.iface if len(a.iface) > 1 else a.iface[0],
        prn=on,
        store=False,
        filter=a.filter or None,
        started_callback=lambda: _emit({"ready": True}),
    )
    sn.start()
    deadline = time.monotonic() + a.timeout if a.timeout else None
    try:
        while not done and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
            if not sn.running:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if sn.running:
            sn.stop()
    return 0


def cmd_connect(a: argparse.Namespace) -> int:
    _enter(a.netns)
    t0 = time.monotonic()
    out: dict[str, Any] = {"proto": a.proto, "dst": a.dst, "port": a.port, "sport": a.sport}
    if a.proto == "icmp":
        from scapy.config import conf
        from scapy.layers.inet import ICMP, IP
        from scapy.sendrecv import sr1

        conf.verb = 0
        r = sr1(IP(dst=a.dst) / ICMP(id=a.sport, seq=1), timeout=a.timeout)
        out["result"] = (
            "reply"
            if r is not None and r.haslayer(ICMP) and r[ICMP].type == 0
            else (
                "no reply"
                if r is None
                else f"ICMP type {r[ICMP].type}"
                if r.haslayer(ICMP)
                else "other"
            )
        )
        if r is not None:
            out["from"] = r.src
    else:
        kind = socket.SOCK_STREAM if a.proto == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(a.timeout)
        try:
            s.bind(("0.0.0.0", a.sport))
            if a.proto == "tcp":
                s.connect((a.dst, a.port))
                out["result"] = "connected"
            else:
                s.sendto(b"corral-net-trace\n", (a.dst, a.port))
                try:
                    s.recvfrom(2048)
                    out["result"] = "answered"
                except TimeoutError:
                    out["result"] = "sent (no answer)"
        except ConnectionRefusedError:
            out["result"] = "refused"
        except TimeoutError:
            out["result"] = "timed out"
        except OSError as e:
            out["result"] = f"error: {e.strerror or e}"
        finally:
            s.close()
    out["seconds"] = round(time.monotonic() - t0, 3)
    _emit(out)
    return 0


def cmd_resolve(a: argparse.Namespace) -> int:
    _enter(a.netns)
    import dns.exception
    import dns.resolver

    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [a.server]
    r.timeout = r.lifetime = a.timeout
    try:
        ans = r.resolve(a.name, "A", search=False)
        _emit(
            {
                "name": a.name,
                "server": a.server,
                "answers": [x.address for x in ans],
                "ttl": ans.rrset.ttl,
            }
        )
    except dns.resolver.NXDOMAIN:
        _emit({"name": a.name, "server": a.server, "error": "NXDOMAIN"})
    except dns.exception.Timeout:
        _emit({"name": a.name, "server": a.server, "error": "no cluster DNS answered"})
    except dns.exception.DNSException as e:
        _emit({"name": a.name, "server": a.server, "error": f"{type(e).__name__}: {e}"})
    return 0


def cmd_conntrack(a: argparse.Namespace) -> int:
    """The probe's own flow (by its source port): which backend the DNAT chose."""
    argv = ["conntrack", "-L", "-p", a.proto, "--orig-src", a.src, "--orig-dst", a.dst]
    if a.proto != "icmp":
        argv += ["--orig-port-dst", str(a.dport), "--orig-port-src", str(a.sport)]
    p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    flows = []
    for ln in p.stdout.splitlines():
        fields = [w.split("=", 1) for w in ln.split() if "=" in w]
        srcs = [v for k, v in fields if k == "src"]
        sports = [v for k, v in fields if k == "sport"]
        if len(srcs) >= 2:
            flows.append(
                {
                    "backend": srcs[1],
                    "backendPort": int(sports[1]) if len(sports) > 1 else None,
                    "line": ln,
                }
            )
    _emit({"flows": flows, "error": None if flows or p.returncode == 0 else p.stderr.strip()})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corral.netdebug.agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sniff")
    s.add_argument("--iface", action="append", required=True)
    s.add_argument("--netns")
    s.add_argument("--filter")
    s.add_argument("--src")
    s.add_argument("--dst")
    s.add_argument("--sport", type=int)
    s.add_argument("--vni", type=int)
    s.add_argument("--host", help="only packets from or to this (inner) address")
    s.add_argument("--count", type=int, default=0)
    s.add_argument("--timeout", type=float, default=0)
    s.add_argument("--raw", action="store_true")
    s.set_defaults(fn=cmd_sniff)
    s = sub.add_parser("connect")
    s.add_argument("--netns")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--proto", default="tcp")
    s.add_argument("--sport", type=int, required=True)
    s.add_argument("--timeout", type=float, default=3)
    s.set_defaults(fn=cmd_connect)
    s = sub.add_parser("resolve")
    s.add_argument("--netns")
    s.add_argument("--name", required=True)
    s.add_argument("--server", required=True)
    s.add_argument("--timeout", type=float, default=2)
    s.set_defaults(fn=cmd_resolve)
    s = sub.add_parser("conntrack")
    s.add_argument("--src", required=True)
    s.add_argument("--dst", required=True)
    s.add_argument("--dport", type=int, default=0)
    s.add_argument("--sport", type=int, default=0)
    s.add_argument("--proto", default="tcp")
    s.set_defaults(fn=cmd_conntrack)
    a = p.parse_args(argv)
    try:
        return int(a.fn(a))
    except (OSError, ValueError) as e:
        _emit({"error": f"{type(e).__name__}: {e}"})
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
