"""Cluster DNS: dnsperf against `corral dns` and against unbound, same names, one run.

Both servers hold the same N service A records (`svc-<i>.default.svc.cluster.local`):
corral reads N ClusterIP Services from a private etcd; unbound gets them as
`local-data` in a static `cluster.local` zone (so unknown names are NXDOMAIN,
as corral's are). The query file has every name once plus 10% names that do
not exist, shuffled. Each server runs pinned to CPU 0 (`taskset`), unbound
with one thread; dnsperf runs on CPU 1. Rounds alternate between the servers;
the ratio is corral's median QPS over unbound's. Beside it, each server's CPU time
per answered query (utime + stime over the run / queries completed), which a
loaded machine disturbs less than the rate: the ratio there is unbound's over
corral's, so above 1.0 means corral spends less.

Memory: each server's VmRSS with the records loaded; corral's also on an empty
etcd, so the cost of the N Services shows apart from the interpreter's, beside
CoreDNS's published estimate of (services + pods) / 1000 + 54 MB.

    python -m bench.dns [--services 10000] [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from bench.fill import fill
from corral.api.objects import Service
from corral.cluster.etcd import LocalEtcd, free_port

ZONE = "cluster.local"


def vip(i: int) -> str:
    return f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def services(n: int) -> list[Service]:
    return [
        Service.model_validate(
            {
                "metadata": {"name": f"svc-{i}", "namespace": "default"},
                "spec": {
                    "clusterIP": vip(i),
                    "clusterIPs": [vip(i)],
                    "ports": [{"name": "http", "port": 80}],
                },
            }
        )
        for i in range(n)
    ]


async def write(url: str, n: int) -> None:
    await fill(url, services(n), size=600)


def query_file(path: str, n: int, seed: int = 53) -> int:
    rng = random.Random(seed)
    lines = [f"svc-{i}.default.svc.{ZONE} A" for i in range(n)]
    lines += [f"nosvc-{i}.default.svc.{ZONE} A" for i in range(n // 10)]
    rng.shuffle(lines)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def unbound_conf(path: str, tmp: str, port: int, n: int) -> None:
    with open(path, "w") as f:
        f.write(
            "server:\n"
            f"  interface: 127.0.0.1\n  port: {port}\n  do-ip6: no\n"
            '  do-daemonize: no\n  num-threads: 1\n  username: ""\n  chroot: ""\n'
            f'  directory: "{tmp}"\n  pidfile: ""\n  use-syslog: no\n  logfile: ""\n'
            "  verbosity: 0\n  access-control: 127.0.0.0/8 allow\n"
            f'  local-zone: "{ZONE}." static\n'
        )
        for i in range(n):
            f.write(f'  local-data: "svc-{i}.default.svc.{ZONE}. 5 IN A {vip(i)}"\n')


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ready(mport: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def answers(port: int, name: str) -> bool:
    r = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=1", "+tries=5", name],
        capture_output=True,
        text=True,
    )
    return bool(r.stdout.strip())


@contextlib.contextmanager
def corral_dns(url: str, port: int, cpu: str, log: str) -> Iterator[subprocess.Popen]:
    mport = free_port()
    cmd = ["taskset", "-c", cpu, sys.executable, "-m", "corral", "--etcd", url, "dns"]
    cmd += ["--listen", f"127.0.0.1:{port}", "--metrics-addr", f"127.0.0.1:{mport}"]
    cmd += ["--debug-socket", "off", "--upstream", "127.0.0.1:9"]
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not ready(mport):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"corral dns did not become ready (see {log})")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def unbound(conf: str, port: int, cpu: str, log: str) -> Iterator[subprocess.Popen]:
    with open(log, "a") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, "unbound", "-d", "-c", conf], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 120
        while not answers(port, f"svc-0.default.svc.{ZONE}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"unbound did not answer (see {log})")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(port: int, queries: str, seconds: int, cpu: str) -> tuple[float, float, int]:
    """(queries per second, % lost, queries completed) of one dnsperf run."""
    r = subprocess.run(
        [
            *("taskset", "-c", cpu, "dnsperf", "-s", "127.0.0.1", "-p", str(port)),
            *("-d", queries, "-l", str(seconds), "-q", "200", "-t", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    qps = re.search(r"Queries per second:\s+([\d.]+)", r.stdout)
    lost = re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", r.stdout)
    done = re.search(r"Queries completed:\s+(\d+)", r.stdout)
    if qps is None or done is None:
        raise RuntimeError(f"dnsperf failed: {r.stdout}{r.stderr}")
    return float(qps.group(1)), float(lost.group(1)) if lost else 0.0, int(done.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10, help="each dnsperf run (default 10)")
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--client-cpu", default="1")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args(argv)
    for tool in ("dnsperf", "unbound", "taskset", "dig"):
        if shutil.which(tool) is None:
            print(f"bench.dns needs {tool} (scripts/bootstrap.sh installs it)", file=sys.stderr)
            return 1
    n = args.services
    tmp = tempfile.mkdtemp(prefix="corral-bench-dns-")
    log = os.path.join(tmp, "servers.log")
    etcd = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    etcd.start()
    try:
        queries = os.path.join(tmp, "queries")
        total = query_file(queries, n)
        cport, uport = free_port(), free_port()
        conf = os.path.join(tmp, "unbound.conf")
        unbound_conf(conf, tmp, uport, n)
        with corral_dns(etcd.url, cport, args.server_cpu, log) as p:
            time.sleep(1)
            empty_rss = rss_kib(p.pid)
        t0 = time.perf_counter()
        asyncio.run(write(etcd.url, n))
        print(f"wrote {n} Services in {time.perf_counter() - t0:.1f} s; {total} queries/file")
        ours: list[float] = []
        theirs: list[float] = []
        lost: dict[str, list[float]] = {"corral": [], "unbound": []}
        cpu_us: dict[str, list[float]] = {"corral": [], "unbound": []}
        with (
            corral_dns(etcd.url, cport, args.server_cpu, log) as cp,
            unbound(conf, uport, args.server_cpu, log) as up,
        ):
            time.sleep(1)
            corral_rss, unbound_rss = rss_kib(cp.pid), rss_kib(up.pid)
            dnsperf(cport, queries, 2, args.client_cpu)  # warm both up
            dnsperf(uport, queries, 2, args.client_cpu)
            for r in range(args.rounds):
                for name, port, pid, into in (
                    ("corral", cport, cp.pid, ours),
                    ("unbound", uport, up.pid, theirs),
                ):
                    c0 = cpu_seconds(pid)
                    qps, pct, done = dnsperf(port, queries, args.seconds, args.client_cpu)
                    us = (cpu_seconds(pid) - c0) / max(done, 1) * 1e6
                    into.append(qps)
                    lost[name].append(pct)
                    cpu_us[name].append(us)
                    print(
                        f"round {r + 1}: {name:8} {qps:10.0f} QPS  lost {pct:.2f}%  "
                        f"{us:.2f} us of server CPU per query",
                        flush=True,
                    )
            corral_rss_after = rss_kib(cp.pid)
        mo, mt = statistics.median(ours), statistics.median(theirs)
        per = (corral_rss - empty_rss) / 1024 * 10_000 / n
        coredns = (n / 1000 + 54) if n else 54
        print()
        print(f"{'':34}{'corral':>12}{'unbound':>12}{'ratio':>8}")
        print(f"{'QPS (median of rounds)':34}{mo:12.0f}{mt:12.0f}{mo / mt:8.2f}")
        cu, cb = statistics.median(cpu_us["corral"]), statistics.median(cpu_us["unbound"])
        print(f"{'server CPU us per query (median)':34}{cu:12.2f}{cb:12.2f}{cb / cu:8.2f}")
        rng_o = f"{min(ours):.0f}-{max(ours):.0f}"
        rng_t = f"{min(theirs):.0f}-{max(theirs):.0f}"
        print(f"{'QPS (range)':34}{rng_o:>12}{rng_t:>12}")
        lo, lt = max(lost["corral"]), max(lost["unbound"])
        print(f"{'lost % (max of rounds)':34}{lo:12.2f}{lt:12.2f}")
        mo_rss, mt_rss = corral_rss / 1024, unbound_rss / 1024
        print(f"{'VmRSS, MiB, with the records':34}{mo_rss:12.1f}{mt_rss:12.1f}")
        print(f"{'corral VmRSS on an empty etcd, MiB':34}{empty_rss / 1024:12.1f}")
        print(f"{'corral VmRSS after the rounds, MiB':34}{corral_rss_after / 1024:12.1f}")
        print(f"{'corral MiB per 10,000 services':34}{per:12.1f}")
        print(f"{'CoreDNS published estimate, MB':34}{coredns:12.1f}  ((services+pods)/1000 + 54)")
    finally:
        etcd.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
