"""A stand-in for `corral dns` in the whole-cluster tests of how cluster DNS is run.

It takes `corral dns`'s command line (`[--etcd URLS --etcd-cafile F --etcd-certfile F
--etcd-keyfile F] dns --listen ADDR:PORT --metrics-addr ADDR:PORT`), reads etcd with
the certificate it is given (so it proves the DNS pods' credentials, reachability
and health plumbing), and answers A for `<svc>.<ns>.svc.<zone>` of every ClusterIP
Service from a poll of etcd, NXDOMAIN for other names in the zone, SERVFAIL for the
rest and before its first sync. UDP and TCP; /healthz, /readyz (after the first
sync) and /metrics over HTTP. Nothing more: the real server is `corral dns`.

Run as a script (`python dns_standin.py ...`): its folder, not the repository root,
is then on sys.path, so `dns` is dnspython, not corral's own `dns/` folder.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from corral.api.objects import NetworkConfig, Service
from corral.api.store import Store, TLSFiles

TABLE: dict[str, str] = {}  # lower-case FQDN with the trailing dot -> ClusterIP
ZONE = ["cluster.local."]
SYNCED = threading.Event()


def answer(wire: bytes) -> bytes | None:
    try:
        q = dns.message.from_wire(wire)
    except Exception:
        return None
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    if not q.question:
        r.set_rcode(dns.rcode.FORMERR)
        return r.to_wire()
    question = q.question[0]
    name = question.name.to_text().lower()
    table, zone = TABLE, ZONE[0]
    if not SYNCED.is_set():
        r.set_rcode(dns.rcode.SERVFAIL)
    elif name in table:
        if question.rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(question.name, 5, "IN", "A", table[name]))
    elif name == zone or name.endswith("." + zone):
        r.set_rcode(dns.rcode.NXDOMAIN)
    else:
        r.set_rcode(dns.rcode.SERVFAIL)  # no forwarding in the stand-in
    return r.to_wire()


def serve_udp(addr: tuple[str, int]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(addr)
    while True:
        data, peer = s.recvfrom(4096)
        out = answer(data)
        if out is not None:
            s.sendto(out, peer)


def serve_tcp(addr: tuple[str, int]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(64)
    while True:
        c, _ = s.accept()
        with c:
            c.settimeout(2)
            try:
                n = int.from_bytes(c.recv(2), "big")
                data = b""
                while len(data) < n:
                    chunk = c.recv(n - len(data))
                    if not chunk:
                        break
                    data += chunk
                out = answer(data)
                if out is not None:
                    c.sendall(len(out).to_bytes(2, "big") + out)
            except OSError:
                pass


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        ok = path in ("/healthz", "/metrics") or (path == "/readyz" and SYNCED.is_set())
        body = b"ok\n" if ok else b"[-]sync: not synced yet\n"
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


async def sync(args: argparse.Namespace) -> None:
    global TABLE
    tls = None
    if args.etcd_cafile:
        tls = TLSFiles(args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile)
    async with Store(args.etcd.split(","), tls=tls) as store:
        while True:
            try:
                cfg = await store.get(NetworkConfig, "cluster")
                zone = (cfg.spec.cluster_domain if cfg else "cluster.local").lower() + "."
                services, _ = await store.list(Service)
                TABLE = {
                    f"{s.name}.{s.namespace}.svc.{zone}": s.spec.cluster_ip
                    for s in services
                    if s.spec.cluster_ip and s.spec.cluster_ip != "None"
                }
                ZONE[0] = zone
                if not SYNCED.is_set():
                    print(f"synced: {len(TABLE)} services in {zone}", flush=True)
                SYNCED.set()
            except Exception as e:  # etcd away: keep the last table, say why
                print(f"sync failed: {type(e).__name__}: {e}", flush=True)
            await asyncio.sleep(0.5)


def hostport(v: str, port: int) -> tuple[str, int]:
    host, _, p = v.rpartition(":") if ":" in v else (v, "", str(port))
    return host, int(p)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--etcd", required=True)
    p.add_argument("--etcd-cafile")
    p.add_argument("--etcd-certfile")
    p.add_argument("--etcd-keyfile")
    p.add_argument("command", choices=["dns"])
    p.add_argument("--listen", action="append", default=[])
    p.add_argument("--metrics-addr", default="127.0.0.1:10275")
    args = p.parse_args()
    for listen in args.listen or ["0.0.0.0:53"]:
        addr = hostport(listen, 53)
        threading.Thread(target=serve_udp, args=(addr,), daemon=True).start()
        threading.Thread(target=serve_tcp, args=(addr,), daemon=True).start()
    httpd = http.server.ThreadingHTTPServer(hostport(args.metrics_addr, 10275), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    asyncio.run(sync(args))


if __name__ == "__main__":
    main()
