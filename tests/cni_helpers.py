"""Test set-up for the CNI plugins: a node namespace running the CNI daemon, pods, clients.

A `CNINode` is a network namespace with its own run/conf/bin/cache dirs under a
tmp dir and a `corral node --components cni --netns` process for it. CNI calls are made
the way a runtime makes them: the libcni Go client (tests/libcni_client, built
once per session) or the installed shim, both run inside the node namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from corral.common.files import write_atomic
from corral.node import netlink, netns
from tests import kit

REF_PLUGINS = "/usr/lib/cni"
CLIENT_SRC = Path(__file__).parent / "libcni_client"
ROOT = Path(__file__).parent.parent


def in_thread(fn: Any, *args: Any) -> Any:
    """Run fn on a fresh thread: pyroute2's sync API refuses to run inside an event loop."""
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(fn, *args).result()


def wait_until(pred: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    return kit.wait_for(pred, what, timeout)


@pytest.fixture(scope="session")
def libcni_client() -> Iterator[str]:
    """The libcni Go client, built once per session (cached by source hash)."""
    yield build_libcni_client()


def build_libcni_client() -> str:
    """Build tests/libcni_client with Debian's Go and libcni (offline); reuse a built one."""
    src = (CLIENT_SRC / "main.go").read_bytes()
    out_dir = Path(tempfile.gettempdir()) / "corral-libcni-client"
    binary = out_dir / f"client-{hashlib.sha256(src).hexdigest()[:12]}"
    if not binary.exists():
        out_dir.mkdir(exist_ok=True)
        tmp = out_dir / f".build-{os.getpid()}"
        env = dict(
            os.environ,
            GO111MODULE="off",
            GOPATH="/usr/share/gocode",
            GOCACHE=str(out_dir / "gocache"),
            GOFLAGS="",
        )
        subprocess.run(
            ["go", "build", "-o", str(tmp), "."],
            cwd=CLIENT_SRC,
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(tmp, binary)
    return str(binary)


class CNINode:
    """A node namespace with its own CNI dirs and a CNI daemon inside."""

    def __init__(self, etcd_url: str, client: str, shim: str = "python") -> None:
        self.shim = shim
        self.id = secrets.token_hex(3)
        self.name = f"cnin-{self.id}"
        self.etcd_url = etcd_url
        self.client = client
        self.tmp = Path(tempfile.mkdtemp(prefix=f"corral-cni-{self.id}-"))
        self.run_dir, self.conf_dir = self.tmp / "run", self.tmp / "net.d"
        self.bin_dir, self.cache_dir = self.tmp / "bin", self.tmp / "cache"
        for d in (self.run_dir, self.conf_dir, self.bin_dir, self.cache_dir):
            d.mkdir()
        self.socket = str(self.run_dir / "cni.sock")
        self.pods: list[str] = []
        self.proc: subprocess.Popen | None = None
        in_thread(netns.add, self.name)
        netns.run(self.name, ["ip", "link", "set", "lo", "up"])

    # ------------------------------------------------------------ daemon

    def start(self) -> None:
        log = open(self.tmp / "daemon.log", "ab")  # noqa: SIM115 - owned by the process
        argv = [
            sys.executable,
            "-m",
            "corral",
            "node",
            "--components",
            "cni",
            "--etcd",
            self.etcd_url,
            "--name",
            self.name,
            "--run-dir",
            str(self.run_dir),
            "--state-dir",
            str(self.tmp / "state"),
            "--cni-conf-dir",
            str(self.conf_dir),
            "--cni-bin-dir",
            str(self.bin_dir),
            "--cni-cache-dir",
            str(self.cache_dir),
            "--netns",
            self.name,
            "--underlay-iface",
            "lo",  # the node namespace has no default route to find one from
            "--metrics-addr",
            "off",
            "--cni-shim",
            self.shim,
        ]
        if os.environ.get("CORRAL_CNI_DEBUG"):  # per-call timings in daemon.log
            argv.append("-vv")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT)
        log.close()
        wait_until(lambda: self._answers() or self._died(), 60, "the CNI daemon socket")
        assert self.proc.poll() is None, self.log()

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _answers(self) -> bool:
        import socket

        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)
        self.proc = None

    def log(self) -> str:
        try:
            return (self.tmp / "daemon.log").read_text()[-4000:]
        except OSError:
            return ""

    def write_subnet(
        self, subnet: str = "10.244.1.0/24", mtu: int = 1450, ip_masq: bool = True
    ) -> None:
        data = {
            "network": "10.244.0.0/16",
            "subnet": subnet,
            "mtu": mtu,
            "ipMasq": ip_masq,
            "node": self.name,
        }
        write_atomic(str(self.run_dir / "subnet.json"), json.dumps(data))

    # ------------------------------------------------------------ pods and calls

    def pod(self) -> str:
        name = f"cnip-{self.id}-{len(self.pods)}"
        in_thread(netns.add, name)
        self.pods.append(name)
        return netns.path(name)

    def cni_path(self) -> str:
        return f"{self.bin_dir}:{REF_PLUGINS}"

    def libcni(
        self,
        cmd: str,
        cid: str,
        pod: str,
        ifname: str = "eth0",
        conf_dir: Path | None = None,
        net: str = "corral",
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> tuple[int, Any]:
        """Run the libcni client in the node: (exit code, parsed stdout or None)."""
        argv = [
            self.client,
            cmd,
            str(conf_dir or self.conf_dir),
            net,
            cid,
            pod,
            ifname,
            str(self.cache_dir),
        ]
        e = dict(os.environ, CNI_PATH=self.cni_path(), **(env or {}))
        r = subprocess.run(
            netns.command(self.name, argv),
            capture_output=True,
            text=True,
            env=e,
            timeout=timeout,
            check=False,
        )
        return r.returncode, _parse(r.stdout)

    async def alibcni(
        self, cmd: str, cid: str, pod: str, ifname: str = "eth0", timeout: float = 300
    ) -> tuple[int, Any]:
        """libcni() without blocking the event loop, for many calls at once."""
        argv = [
            self.client,
            cmd,
            str(self.conf_dir),
            "corral",
            cid,
            pod,
            ifname,
            str(self.cache_dir),
        ]
        p = await asyncio.create_subprocess_exec(
            *netns.command(self.name, argv),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ, CNI_PATH=self.cni_path()),
        )
        out, _ = await asyncio.wait_for(p.communicate(), timeout)
        return p.returncode or 0, _parse(out.decode())

    def plugin(
        self,
        plugin: str,
        command: str,
        conf: dict[str, Any] | str | None,
        cid: str = "",
        pod: str = "",
        ifname: str = "eth0",
        env: dict[str, str] | None = None,
        bin_dir: str | None = None,
    ) -> tuple[int, Any]:
        """Exec a plugin binary directly, the way libcni does: (exit code, parsed stdout)."""
        e = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": pod,
            "CNI_IFNAME": ifname,
            "CNI_PATH": self.cni_path(),
        }
        e.update(env or {})
        e = {k: v for k, v in e.items() if v is not None}
        stdin = conf if isinstance(conf, str) else json.dumps(conf or {})
        exe = os.path.join(bin_dir or str(self.bin_dir), plugin)
        r = subprocess.run(
            netns.command(self.name, [exe]),
            input=stdin,
            capture_output=True,
            text=True,
            env=e,
            timeout=120,
            check=False,
        )
        return r.returncode, _parse(r.stdout)

    def conflist(self) -> dict[str, Any]:
        return json.loads((self.conf_dir / "10-corral.conflist").read_text())

    def write_conflist(self, name: str, conf: dict[str, Any]) -> Path:
        d = self.tmp / f"net.d-{name}"
        d.mkdir(exist_ok=True)
        (d / f"10-{name}.conflist").write_text(json.dumps(conf))
        return d

    # ------------------------------------------------------------ kernel views

    def links(self, ns: str | None = None) -> dict[str, dict[str, Any]]:
        """name -> {index, master, mtu, state, ifalias, addrs} in the node or a pod."""
        return in_thread(self._links, ns)

    def _links(self, ns: str | None = None) -> dict[str, dict[str, Any]]:
        out = {}
        with netlink.iproute(ns or self.name) as ipr:
            addrs: dict[int, list[str]] = {}
            for a in ipr.get_addr(family=2):
                addrs.setdefault(a["index"], []).append(f"{a.get('address')}/{a['prefixlen']}")
            for link in ipr.get_links():
                out[link.get("ifname")] = {
                    "index": link["index"],
                    "master": link.get("master"),
                    "mtu": link.get("mtu"),
                    "up": bool(link["flags"] & 1),
                    "ifalias": link.get("ifalias"),
                    "addrs": addrs.get(link["index"], []),
                    "kind": link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
                }
        return out

    def default_gateways(self, pod: str) -> list[str]:
        def read() -> list[str]:
            with netlink.iproute(pod) as ipr:
                return [
                    r.get("gateway")
                    for r in ipr.get_routes(family=2, table=254)
                    if r["dst_len"] == 0
                ]

        return in_thread(read)

    def hairpin(self) -> dict[int, int]:
        """Bridge port ifindex -> IFLA_BRPORT_MODE (1 = hairpin) in the node."""

        def read() -> dict[int, int]:
            with netlink.iproute(self.name) as ipr:
                return {
                    p["index"]: p.get_nested("IFLA_PROTINFO", "IFLA_BRPORT_MODE")
                    for p in ipr.brport("dump")
                }

        return in_thread(read)

    def remove_pod(self, pod: str) -> None:
        in_thread(netns.remove, os.path.basename(pod))

    def veths(self) -> list[str]:
        return sorted(n for n, v in self.links().items() if v["kind"] == "veth")

    def cleanup(self) -> None:
        self.stop()
        for p in self.pods:
            in_thread(netns.remove, p)
        in_thread(netns.remove, self.name)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _parse(out: str) -> Any:
    out = out.strip()
    if not out:
        return None
    try:
        return json.loads(out)
    except ValueError:
        return out


def _running_node(etcd: Any, client: str, shim: str) -> Iterator[CNINode]:
    node = CNINode(etcd.url, client, shim)
    try:
        node.write_subnet()
        node.start()
        wait_until(lambda: (node.conf_dir / "10-corral.conflist").exists(), 30, "the conflist")
        yield node
    finally:
        node.cleanup()


@pytest.fixture
def cni_node(request: pytest.FixtureRequest, etcd: Any, libcni_client: str) -> Iterator[CNINode]:
    """A node with the CNI daemon running and a subnet lease (10.244.1.0/24, MTU 1450).

    Parametrize indirectly with "python" or "native" to choose the installed shim.
    """
    yield from _running_node(etcd, libcni_client, getattr(request, "param", "python"))


@pytest.fixture(scope="module")
def shared_cni_node(etcd: Any, libcni_client: str) -> Iterator[CNINode]:
    """One such node for a whole module, for tests that leave nothing behind."""
    yield from _running_node(etcd, libcni_client, "python")
