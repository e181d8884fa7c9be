"""The control plane at the service benchmarks' size: 10,000 Services, 30,000 pods.

Every figure is measured next to plain etcd writes of the same objects in the
same run (a Store writing them with 50 in flight: the floor of any client):

1. apply:    `corral apply -f` of N Services (a process, as a user runs it) vs
             the same N objects written by plain puts.
2. converge: with `corral controllers` running (a process, every controller
             in it, as `corral up` runs it), from the start of `corral apply` until every Service
             has a ClusterIP, its Endpoints and its EndpointSlice list all of
             its pods (seen through a watch) vs plain puts of the objects the
             controllers wrote (the N Services with their VIP, N Endpoints, N
             EndpointSlices).
3. get:      `corral get svc` over the N (a process, output to a pipe) vs
             `etcdctl get --prefix` of the same keys.
4. memory:   the controllers process's VmRSS with everything synced.

The pods are simulated: written to etcd with an IP and Ready, bound to no
node (so the node lifecycle controller leaves them alone) and owned by nothing.

    python -m bench.services [--services 10000] [--pods-per-service 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

from bench.fill import commit_all
from corral.api.objects import Pod, Service
from corral.api.store import PREFIX, Store, object_key
from corral.cluster.etcd import LocalEtcd, free_port

PEER_IN_FLIGHT = 50


def service_doc(i: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "labels": {"app": f"app-{i}"}},
        "spec": {
            "selector": {"app": f"app-{i}"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def pod(i: int, j: int, k: int) -> Pod:
    return Pod.model_validate(
        {
            "metadata": {"name": f"svc-{i}-{j}", "labels": {"app": f"app-{i}", "tier": "bench"}},
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "command": ["sleep", "infinity"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                    }
                ]
            },
            "status": {
                "phase": "Running",
                "podIP": f"10.{244 + k // 65000}.{k // 250 % 260}.{k % 250 + 1}",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    )


async def plain_puts(store: Store, items: list[tuple[str, bytes]]) -> float:
    """Seconds to write `items` with PEER_IN_FLIGHT puts in flight."""
    gate = asyncio.Semaphore(PEER_IN_FLIGHT)

    async def put(key: str, value: bytes) -> None:
        async with gate:
            await store.put_raw(key, value)

    t0 = time.perf_counter()
    await asyncio.gather(*(put(k, v) for k, v in items))
    return time.perf_counter() - t0


async def write_pods(store: Store, n_services: int, per: int) -> int:
    pods = [pod(i, j, i * per + j) for i in range(n_services) for j in range(per)]
    await commit_all(store, pods, size=1500)
    return len(pods)


def env_for(url: str) -> dict[str, str]:
    """The commands' environment. Bytecode caching stays on (as for any user): with
    PYTHONDONTWRITEBYTECODE set, each process would compile corral's modules again."""
    env = dict(os.environ, CORRAL_ETCD=url)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def corral(url: str, *args: str, stdout: int | None = subprocess.DEVNULL) -> tuple[float, str]:
    env = env_for(url)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "corral", *args],
        env=env,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"corral {' '.join(args)} failed: {r.stderr[-2000:]}")
    return took, r.stdout or ""


async def converged(
    store: Store, n: int, per: int, start_rev: int, started: float
) -> dict[str, float]:
    """Watch from `start_rev` until all n Services have a VIP, Endpoints with `per`
    ready addresses and a slice with `per` ready endpoints; when each kind got there."""
    ip: set[str] = set()
    ep: set[str] = set()
    sl: set[str] = set()
    when: dict[str, float] = {}
    svc_p, ep_p, sl_p = (f"{PREFIX}/{k}/" for k in ("services", "endpoints", "endpointslices"))
    async for ev in store.watch_prefix_raw(f"{PREFIX}/", start_rev):
        if ev.value is None or not ev.key.startswith((svc_p, ep_p, sl_p)):
            continue
        d = json.loads(ev.value)
        name = d["metadata"]["name"]
        if ev.key.startswith(svc_p):
            if d["spec"].get("clusterIP"):
                ip.add(name)
        elif ev.key.startswith(ep_p):
            addrs = sum(len(s.get("addresses", [])) for s in d.get("subsets", []))
            (ep.add if addrs == per else ep.discard)(name)
        elif ev.key.startswith(sl_p):
            ready = sum(1 for e in d.get("endpoints", []) if e["conditions"].get("ready"))
            (sl.add if ready == per else sl.discard)(name)
        for what, s in (("clusterIP", ip), ("endpoints", ep), ("slices", sl)):
            if what not in when and len(s) == n:
                when[what] = time.perf_counter() - started
        if len(when) == 3:
            return when
    raise AssertionError("watch ended")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("corral controllers exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("corral controllers not ready in time")


async def run(url: str, args: argparse.Namespace, tmp: str) -> None:
    n, per = args.services, args.pods_per_service
    manifest = os.path.join(tmp, "services.yaml")
    docs = [service_doc(i) for i in range(n)]
    with open(manifest, "w") as f:
        yaml.safe_dump_all(docs, f)
    svcs = [Service.model_validate(d) for d in docs]
    for s in svcs:
        Store.prepare_create(s)
    svc_items = [(object_key(Service, s.name, s.namespace), Store.encode(s)) for s in svcs]
    corral(url, "--version")  # warm: bytecode written, page cache filled
    async with Store(url) as store:
        await store.delete_prefix_raw("/corral/")
        t0 = time.perf_counter()
        npods = await write_pods(store, n, per)
        print(f"setup: {npods} pods written in {time.perf_counter() - t0:.1f} s", flush=True)

        # 1. apply vs plain puts
        peer_apply = await plain_puts(store, svc_items)
        await store.delete_prefix_raw(f"{PREFIX}/services/")
        ours_apply, _ = corral(url, "apply", "-f", manifest)
        await store.delete_prefix_raw(f"{PREFIX}/services/")

        # 2. convergence with the controllers running
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corral",
                "controllers",
                "--controllers",
                args.controllers,
                "--metrics-addr",
                f"127.0.0.1:{port}",
                "--debug-socket",
                "off",
                "--seed",
                "1",
            ],
            env=env_for(url),
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(tmp, "controllers.log"), "w"),  # noqa: SIM115
        )
        try:
            wait_ready(port, proc)
            rss_idle = rss_kib(proc.pid)
            spy = None
            if args.py_spy:  # sample the controllers while they converge
                spy = subprocess.Popen(
                    [
                        *(args.py_spy_bin, "record", "-p", str(proc.pid), "-f", "raw"),
                        *("-r", "50", "-o", args.py_spy, "--nonblocking"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                await asyncio.sleep(1)
            rev = await store.revision()
            started = time.perf_counter()
            watch = asyncio.create_task(converged(store, n, per, rev + 1, started))
            apply_busy, _ = await asyncio.to_thread(corral, url, "apply", "-f", manifest)
            when = await asyncio.wait_for(watch, timeout=600)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(timeout=30)
            await asyncio.sleep(2)  # let the controllers settle before reading memory
            rss = rss_kib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

        # 3. get svc vs etcdctl
        gets = sorted(corral(url, "get", "svc", stdout=None)[0] for _ in range(3))
        _, out = corral(url, "get", "svc", stdout=None)
        rows = len(out.splitlines()) - 1
        etcdctl = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(
                ["etcdctl", "--endpoints", url, "get", "--prefix", f"{PREFIX}/services/"],
                env=dict(os.environ, ETCDCTL_API="3"),
                stdout=subprocess.DEVNULL,
                check=True,
            )
            etcdctl.append(time.perf_counter() - t0)
        etcdctl.sort()

        # 2'. the peer of convergence: plain puts of what the controllers wrote
        written: list[tuple[str, bytes]] = []
        for kind in ("services", "endpoints", "endpointslices"):
            kvs, _ = await store.list_raw(f"{PREFIX}/{kind}/")
            written += [(kv.key, kv.value) for kv in kvs]
            await store.delete_prefix_raw(f"{PREFIX}/{kind}/")
        peer_converge = await plain_puts(store, written)
        await store.delete_prefix_raw("/corral/")

    last = max(when.values())
    print(f"\n{n} Services, {npods} pods (simulated), one etcd, 2 cores\n")
    print(f"{'':44}{'corral':>10}{'peer':>10}{'ratio':>8}")
    print(
        f"{'1. apply -f (process) vs plain puts, s':44}"
        f"{ours_apply:10.2f}{peer_apply:10.2f}{ours_apply / peer_apply:8.2f}"
    )
    print(
        f"{'2. all converged after apply vs puts, s':44}"
        f"{last:10.2f}{peer_converge:10.2f}{last / peer_converge:8.2f}"
    )
    print(
        f"   (clusterIP {when['clusterIP']:.2f} s, endpoints {when['endpoints']:.2f} s, "
        f"slices {when['slices']:.2f} s; {len(written)} objects; "
        f"apply with controllers running {apply_busy:.2f} s)"
    )
    print(
        f"{'3. get svc (process, median) vs etcdctl, s':44}"
        f"{gets[1]:10.2f}{etcdctl[1]:10.2f}{gets[1] / etcdctl[1]:8.2f}   ({rows} rows)"
    )
    print(
        f"{'4. controllers VmRSS, MiB':44}{rss / 1024:10.0f}"
        f"   (idle before the apply, pods synced: {rss_idle / 1024:.0f} MiB)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--pods-per-service", type=int, default=3)
    ap.add_argument(
        "--controllers",
        default="replication,endpoints,serviceips,nodelifecycle",
        help="which controllers the process runs (default: all, as `corral up` does)",
    )
    ap.add_argument("--py-spy", metavar="FILE", help="record the controllers (collapsed stacks)")
    ap.add_argument("--py-spy-bin", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (controllers.log)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="corral-bench-services-")
    etcd = LocalEtcd(data_dir=os.path.join(tmp, "data"), log_path=os.path.join(tmp, "etcd.log"))
    etcd.start()
    try:
        asyncio.run(run(etcd.url, args, tmp))
    finally:
        etcd.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
