"""The API server against etcd itself, in one run: list, watch fan-out, apply.

- **list**: `kubectl get pods -A` (the Table) of N pods through `corral apiserver` vs
  `etcdctl get --prefix` of the same keys with their values (median of 3 each).
- **watch fan-out**: W clients watch pods through the API server; C pods change one
  after another; for every change, the time from the etcd write to each watcher's
  event (p50/p99 over all deliveries); and etcd's own watcher gauge, which must stay
  at one per kind however many clients watch.
- **apply**: `kubectl apply -f` of one file holding S Services (created) vs writing the
  same Services to etcd in transactions (`Store.commit`, what `corral apply` does).

The API server runs as its own process (`corral apiserver`), etcd too; the bench's
own clients run in this process.

    python -m bench.apiserver [--pods 10000] [--watchers 1000] [--changes 1000]
                              [--services 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import aiohttp

from bench.fill import fill
from corral.api.objects import Pod, Service
from corral.api.store import Store
from corral.cluster import pki
from corral.cluster.etcd import LocalEtcd, free_port
from tests.apiserver_helpers import write_kubeconfig

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33"


def pod(i: int) -> Pod:
    return Pod.model_validate(
        {
            "metadata": {"name": f"p-{i}", "namespace": "default", "labels": {"app": "bench"}},
            "spec": {"containers": [{"name": "c", "command": ["sleep", "1"]}]},
        }
    )


def service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"s-{i}", "namespace": "default"},
        "spec": {"ports": [{"port": 80}]},
    }


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, env=env, timeout=1800)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]}: {r.stderr.decode()[-500:]}")
    return took


def watchers_in_etcd(metrics_url: str) -> int:
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                return int(float(line.split()[1]))
    return -1


async def fan_out(
    api: str,
    ctx: ssl.SSLContext,
    url: str,
    metrics: str,
    watchers: int,
    changes: int,
    spacing: float,
) -> Any:
    """p50/p99 seconds from each pod's write to its event at every watcher."""
    store = Store(url)
    await store.connect()
    written: dict[str, float] = {}
    delays: list[float] = []
    ready = 0
    all_ready = asyncio.Event()
    done = asyncio.Event()
    want = watchers * changes
    conn = aiohttp.TCPConnector(limit=0, ssl=ctx)
    session = aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None))
    _, start_rev, _ = await store.range_raw("/corral/v1/pods/", "/corral/v1/pods0", 1, 0)

    async def watch() -> None:
        nonlocal ready
        q = f"/api/v1/namespaces/default/pods?watch=1&resourceVersion={start_rev}"
        async with session.get(api + q) as r:
            ready += 1
            if ready == watchers:
                all_ready.set()
            async for line in r.content:  # bytes only: the client must not be the bottleneck
                if b'"MODIFIED"' not in line or b'"round":"1"' not in line:
                    continue
                at = line.find(b'"name":"p-')
                name = line[at + 8 : line.find(b'"', at + 8)].decode()
                if name in written:
                    delays.append(time.perf_counter() - written[name])
                    if len(delays) >= want:
                        done.set()
                        return

    tasks = [asyncio.create_task(watch()) for _ in range(watchers)]
    await asyncio.wait_for(all_ready.wait(), 300)
    await asyncio.sleep(1.0)
    etcd_watchers = await asyncio.to_thread(watchers_in_etcd, metrics)
    for i in range(changes):
        name = f"p-{i}"

        def bump(p: Pod) -> Pod:
            p.metadata.labels["round"] = "1"
            return p

        written[name] = time.perf_counter()
        await store.modify(Pod, name, "default", bump)
        await asyncio.sleep(spacing)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 300)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await session.close()
    await store.close()
    delays.sort()
    return delays, etcd_watchers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.apiserver")
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--changes", type=int, default=1000)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument(
        "--spacing", type=float, default=0.02, help="seconds between pod changes (default 0.02)"
    )
    args = ap.parse_args(argv)
    if not os.access(KUBECTL, os.X_OK):
        print(f"bench.apiserver needs {KUBECTL}", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="corral-bench-api-")
    etcd = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    etcd.start()
    proc = None
    try:
        url = etcd.client_urls[0]
        paths = pki.ensure(os.path.join(tmp, "pki"), [])
        pki.issue_server(paths.dir, "apiserver", "kube-apiserver", ["127.0.0.1"], ("localhost",))
        pki.issue_client(paths.dir, "admin", "admin", ("system:masters",))
        port, mport = free_port(), free_port()
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "corral", "--etcd", url, "apiserver",
                "--bind-address", "127.0.0.1", "--secure-port", str(port),
                "--tls-cert-file", paths.cert("apiserver"),
                "--tls-private-key-file", paths.key("apiserver"),
                "--client-ca-file", paths.ca, "--endpoint-reconciler-type", "none",
                "--metrics-addr", f"127.0.0.1:{mport}", "--debug-socket", "off",
            ],
            stdout=open(os.path.join(tmp, "apiserver.log"), "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        api = f"https://127.0.0.1:{port}"
        kubeconfig = os.path.join(tmp, "kubeconfig")
        write_kubeconfig(kubeconfig, api, paths)
        env = {"PATH": os.environ["PATH"], "HOME": tmp, "KUBECONFIG": kubeconfig}
        for _ in range(100):
            if subprocess.run([KUBECTL, "get", "ns"], capture_output=True, env=env).returncode == 0:
                break
            time.sleep(0.2)
        ctx = ssl.create_default_context(cafile=paths.ca)
        ctx.load_cert_chain(paths.cert("admin"), paths.key("admin"))

        print(f"writing {args.pods} pods ...", flush=True)
        asyncio.run(fill(url, [pod(i) for i in range(args.pods)]))
        etcdctl = ["etcdctl", "--endpoints", url, "get", "--prefix", "/corral/v1/pods/"]
        lists = [timed([KUBECTL, "get", "pods", "-A"], env) for _ in range(3)]
        raw = [timed(etcdctl) for _ in range(3)]
        a, b = statistics.median(lists), statistics.median(raw)
        print(
            f"list {args.pods} pods: kubectl get pods -A {a:.2f} s, etcdctl get --prefix "
            f"{b:.2f} s, ratio {a / b:.2f} (target <= 3)"
        )

        metrics = f"{url}/metrics"
        delays, etcd_watchers = asyncio.run(
            fan_out(
                api, ctx, url, metrics, args.watchers, min(args.changes, args.pods), args.spacing
            )
        )
        n = len(delays)
        if n:
            p50, p99 = delays[n // 2], delays[min(n - 1, int(n * 0.99))]
            print(
                f"watch fan-out: {args.watchers} watchers x {args.changes} changes "
                f"({1 / args.spacing:.0f}/s), {n} "
                f"deliveries: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms (target p99 "
                f"<= 100 ms); etcd's watchers while they watched: {etcd_watchers}"
            )

        svc_file = os.path.join(tmp, "services.json")
        with open(svc_file, "w") as f:
            items = [service(i) for i in range(args.services)]
            json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
        applied = timed([KUBECTL, "apply", "-f", svc_file], env)
        objs = [
            Service.model_validate(service(i) | {"metadata": {"name": f"t-{i}"}})
            for i in range(args.services)
        ]
        plain = asyncio.run(fill(url, objs))
        print(
            f"apply {args.services} Services: kubectl apply {applied:.1f} s, etcd transactions "
            f"{plain:.2f} s, ratio {applied / plain:.1f} (target <= 2)"
        )
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
