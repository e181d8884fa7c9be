"""`corral dns` as a real process: dig, /readyz and /metrics, bad flags, and 10,000
malformed packets that must not disturb it."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query

from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd
from corral.daemon.privileges import KEEP, mask
from tests.dns_helpers import endpoint_slice, free_port, malformed, service
from tests.etcd_helpers import on_store

ROOT = Path(__file__).resolve().parent.parent
SVC = "web.default.svc.cluster.local"


def corral(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral", *args]


@contextlib.contextmanager
def dns_process(etcd_url: str, *extra: str) -> Iterator[tuple[subprocess.Popen, int, int]]:
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        corral(
            "--etcd",
            etcd_url,
            "dns",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-addr",
            f"127.0.0.1:{mport}",
            "--debug-socket",
            "off",
            "--upstream",
            f"127.0.0.1:{free_port()}",
            "--forward-timeout",
            "0.2",
            *extra,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # the repository root on sys.path: dnspython must still be dnspython
    )
    try:
        deadline = time.monotonic() + 60
        while http(mport, "/readyz")[0] != 200:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "corral dns never became ready"
            time.sleep(0.1)
        yield proc, port, mport
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def dig(port: int, *args: str) -> str:
    r = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=2", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def put_services(url: str) -> None:
    async def go(s: Store) -> None:
        await s.create(service("web", ip="10.96.0.20", ports=[{"name": "http", "port": 80}]))
        await s.create(service("ext", external="www.example.net"))
        await s.create(service("db", headless=True))
        await s.create(endpoint_slice("db", [("10.244.1.5", True, "db-0")]))

    on_store(url, go)


def test_dnspython_is_not_shadowed_from_the_repository_root() -> None:
    r = subprocess.run(
        [sys.executable, "-c", "import dns, dns.message; print(dns.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert not r.stdout.strip().startswith(str(ROOT / "dns")), r.stdout


def test_dig_metrics_and_readiness(etcd_url: str) -> None:
    put_services(etcd_url)
    with dns_process(etcd_url, "--ttl", "11") as (proc, port, mport):
        assert dig(port, "+short", SVC).split() == ["10.96.0.20"]
        out = dig(port, SVC)  # dig's own EDNS cookie: the full path
        assert "status: NOERROR" in out and "flags: qr aa rd ra" in out
        assert re.search(r"\s11\s+IN\s+A\s+10\.96\.0\.20", out), out
        assert dig(port, "+short", "+tcp", SVC).split() == ["10.96.0.20"]
        assert dig(port, "+short", "SRV", f"_http._tcp.{SVC}").split() == [
            "0",
            "100",
            "80",
            f"{SVC}.",
        ]
        assert dig(port, "+short", "-x", "10.96.0.20").split() == [f"{SVC}."]
        nx = dig(port, "nothere.default.svc.cluster.local")
        assert "status: NXDOMAIN" in nx and re.search(r"IN\s+SOA\s+ns\.dns\.cluster\.local\.", nx)
        nodata = dig(port, "AAAA", SVC)
        assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata and "SOA" in nodata
        assert "status: SERVFAIL" in dig(port, "example.org")  # upstream down
        assert dig(port, "+short", "TXT", "dns-version.cluster.local").split() == ['"1.1.0"']
        assert dig(port, "+short", "NS", "cluster.local").split() == ["ns.dns.cluster.local."]
        assert dig(port, "+short", "SOA", "cluster.local").split()[:2] == [
            "ns.dns.cluster.local.",
            "hostmaster.cluster.local.",
        ]
        assert dig(port, "+short", "CNAME", "ext.default.svc.cluster.local").split() == [
            "www.example.net."
        ]
        db = "db-0.db.default.svc.cluster.local"
        assert dig(port, "+short", db).split() == ["10.244.1.5"]
        assert dig(port, "+short", "-x", "10.244.1.5").split() == [f"{db}."]
        code, text = http(mport, "/metrics")
        assert code == 200
        assert 'corral_dns_queries_total{rcode="NOERROR",type="A"}' in text
        assert 'corral_dns_queries_total{rcode="NXDOMAIN",type="A"}' in text
        assert "corral_dns_synced 1.0" in text
        assert 'corral_dns_request_duration_seconds_bucket{le="+Inf",path="fast"}' in text
        assert "corral_dns_index_services 3.0" in text
        assert "corral_dns_cache_hits_total" in text
        assert http(mport, "/healthz")[0] == 200
        assert proc.poll() is None
        if os.geteuid() == 0:  # root keeps only what port 53 needs
            with open(f"/proc/{proc.pid}/status") as f:
                eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
            assert eff == mask(KEEP["dns"] or frozenset())


def test_bad_flags_are_clear_errors(etcd_url: str) -> None:
    for args, words in (
        (["--listen", "nowhere:53"], "--listen"),
        (["--ttl", "-1"], "--ttl"),
        (["--zone", "Not A Zone"], "--zone"),
        (["--upstream", "300.1.1.1"], "--upstream"),
        (["--pods", "maybe"], "--pods"),
    ):
        r = subprocess.run(
            corral("--etcd", etcd_url, "dns", *args),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_ten_thousand_malformed_packets(etcd_url: str) -> None:
    put_services(etcd_url)
    rng = random.Random(1414)
    with dns_process(etcd_url) as (proc, port, mport):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        answered = 0
        for i in range(10_000):
            with contextlib.suppress(BlockingIOError):
                s.sendto(malformed(rng), ("127.0.0.1", port))
            if i % 50 == 0:
                time.sleep(0.001)
                while True:
                    try:
                        s.recv(65535)
                        answered += 1
                    except (BlockingIOError, ConnectionRefusedError):
                        break
        s.close()
        for _ in range(50):  # garbage over TCP too, in length-prefixed frames and not
            with socket.create_connection(("127.0.0.1", port), timeout=5) as t:
                junk = malformed(rng)
                t.sendall((struct.pack("!H", len(junk)) + junk) if rng.random() < 0.7 else junk)
                t.shutdown(socket.SHUT_WR)
                with contextlib.suppress(OSError):
                    t.recv(65535)
        assert proc.poll() is None
        q = dns.message.make_query(SVC, "A")
        r = dns.query.udp(q, "127.0.0.1", port=port, timeout=5)
        assert [x.to_text() for rr in r.answer for x in rr] == ["10.96.0.20"]
        assert dig(port, "+short", "+tcp", SVC).split() == ["10.96.0.20"]
        _, text = http(mport, "/metrics")
        dropped = _sample(text, "corral_dns_malformed_dropped_total")
        formerr = _sample(text, "corral_dns_malformed_formerr_total")
        assert dropped > 0 and formerr > 0, (dropped, formerr)
        assert http(mport, "/healthz")[0] == 200
        assert answered > 0


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_stops_cleanly_on_sigterm(etcd: LocalEtcd) -> None:
    with dns_process(etcd.url) as (proc, _port, _mport):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert os.path.exists(ROOT / "clusterdns" / "__init__.py")
