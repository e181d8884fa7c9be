"""A throwaway multi-node underlay in network namespaces, for overlay tests and benchmarks.

One "switch" namespace holds a bridge; each node namespace has `eth0` on it
(172.30.0.<i>/24, default route via the switch's .254) and runs an overlay
agent as a separate process (`corral node --components overlay --netns ...`),
started from the host namespace so it reaches etcd on loopback. Pods are plain
namespaces with a veth on the node's `cni0` bridge, plumbed by hand the way the
CNI plugin would (gateway .1, MTU from subnet.json, the host veth's alias).

Every name carries a random suffix and `close()` removes all of it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.cluster import underlay
from corral.ebpf import loader
from corral.node import netlink, netns
from corral.node.podveth import pod_alias
from corral.overlay.vxlan import VxlanNetlink
from tests import kit

CORRAL = [sys.executable, "-m", "corral"]
UNDERLAY = ipaddress.ip_network("172.30.0.0/24")
SWITCH_IP = "172.30.0.254"


def wait_for(
    cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll `cond` until it returns something truthy; errors other than a failed assert
    count as "not yet" (tests.kit.wait_for)."""
    return kit.wait_for(cond, what, timeout, interval, errors=(Exception,))


@dataclass
class Pod:
    name: str
    ns: str
    ip: str
    node: int


@dataclass
class SimNode:
    index: int
    name: str
    ns: str
    ip: str
    state_dir: str
    run_dir: str
    log_path: str
    proc: subprocess.Popen | None = None
    pods: list[Pod] = field(default_factory=list)

    @property
    def subnet_file(self) -> str:
        return os.path.join(self.run_dir, "subnet.json")

    def subnet_info(self) -> dict[str, Any] | None:
        try:
            with open(self.subnet_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


class Testbed:
    __test__ = False  # not a pytest test class

    def __init__(
        self, etcd_url: str, nodes: int = 2, resync: float = 1.0, lease_ttl: int = 6
    ) -> None:
        self.etcd_url = etcd_url
        self.sfx = secrets.token_hex(3)
        self.switch = f"ovsw-{self.sfx}"
        self.resync = resync
        self.lease_ttl = lease_ttl
        self.tmp = tempfile.mkdtemp(prefix=f"corral-overlay-{self.sfx}-")
        # Every test bed names its nodes node-1, node-2...: pins of its own, apart from
        # the beds other test workers run at the same time.
        self.pin_root = os.path.join(loader.BPFFS, f"corral-testbed-{self.sfx}")
        self.nodes: list[SimNode] = []
        self._namespaces: list[str] = []
        try:
            self._build(nodes)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ plumbing

    def _ns(self, name: str) -> str:
        netns.add(name)
        self._namespaces.append(name)
        with netlink.iproute(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def _build(self, count: int) -> None:
        """The switch is corral up's underlay bridge, with the gateway address on it."""
        self._namespaces.append(self.switch)
        underlay.ensure_bridge(self.switch)
        with netlink.iproute(self.switch) as ipr:
            br = ipr.link_lookup(ifname=underlay.BRIDGE)[0]
            ipr.addr("add", index=br, address=SWITCH_IP, prefixlen=24)
        for i in range(1, count + 1):
            self.add_node(i)

    def add_node(self, i: int) -> SimNode:
        ns = f"ovn{i}-{self.sfx}"
        self._namespaces.append(ns)
        ip = str(UNDERLAY.network_address + i)
        underlay.ensure_node_link(self.switch, ns, i, ip, 24, default_via=SWITCH_IP)
        base = os.path.join(self.tmp, f"node-{i}")
        node = SimNode(
            i,
            f"node-{i}",
            ns,
            ip,
            os.path.join(base, "state"),
            os.path.join(base, "run"),
            os.path.join(base, "agent.log"),
        )
        os.makedirs(base, exist_ok=True)
        self.nodes.append(node)
        return node

    def node(self, i: int) -> SimNode:
        return self.nodes[i - 1]

    # ------------------------------------------------------------ agents

    def start_agent(self, i: int, wait: bool = True, extra: list[str] | None = None) -> SimNode:
        n = self.node(i)
        argv = [
            *CORRAL,
            "node",
            "--components",
            "overlay",
            "--name",
            n.name,
            "--etcd",
            self.etcd_url,
            "--netns",
            n.ns,
            "--state-dir",
            n.state_dir,
            "--run-dir",
            n.run_dir,
            "--resync-interval",
            str(self.resync),
            "--lease-ttl",
            str(self.lease_ttl),
            "--metrics-addr",
            "off",
            *(extra or []),
        ]
        logf = open(n.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            n.proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "CORRAL_BPF_ROOT": self.pin_root},
            )
        finally:
            logf.close()
        if wait:
            self.wait_ready(i)
        return n

    def wait_ready(self, i: int, timeout: float = 60.0) -> None:
        n = self.node(i)
        wait_for(lambda: self._ready(n), timeout, f"overlay agent on {n.name} to be ready")

    def _ready(self, n: SimNode) -> bool:
        if n.proc is not None and n.proc.poll() is not None:
            raise AssertionError(
                f"agent on {n.name} exited {n.proc.returncode}:\n" + self.agent_log(n.index)[-3000:]
            )
        return "overlay ready" in self.agent_log(n.index)

    def wait_fastpath(self, i: int, runs: int = 1, timeout: float = 180.0) -> None:
        """Wait until node i's agent has loaded the eBPF fast path `runs` times in all
        (a BCC compile: slow on a machine busy with the other workers' clusters)."""
        n = self.node(i)

        def loaded() -> bool:
            if n.proc is not None and n.proc.poll() is not None:
                raise AssertionError(f"agent on {n.name} exited {n.proc.returncode}")
            return self.agent_log(i).count("eBPF fast path on") >= runs

        try:
            wait_for(loaded, timeout, f"the eBPF fast path on node-{i}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nits log ends:\n{self.agent_log(i)[-3000:]}") from None

    def agent_log(self, i: int) -> str:
        try:
            with open(self.node(i).log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop_agent(self, i: int, sig: int = signal.SIGTERM) -> None:
        n = self.node(i)
        if n.proc is None:
            return
        if n.proc.poll() is None:
            n.proc.send_signal(sig)
            try:
                n.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait(timeout=20)
        n.proc = None

    # ------------------------------------------------------------ pods

    def add_pod(self, i: int, host: int = 0, extra_source: str | None = None) -> Pod:
        """A pod namespace on node `i` with the address .<host> of the node's subnet.

        `extra_source`: the opt-in extra source prefix, in the veth's alias as CNI puts it.
        """
        n = self.node(i)
        info = wait_for(n.subnet_info, 30, f"{n.subnet_file}")
        subnet = ipaddress.ip_network(info["subnet"])
        host = host or len(n.pods) + 2
        ip = str(subnet.network_address + host)
        gw = str(subnet.network_address + 1)
        name = f"p{i}x{host}"
        ns = self._ns(f"ovp{i}x{host}-{self.sfx}")
        with netlink.iproute(n.ns) as ipr:
            if not ipr.link_lookup(ifname="cni0"):
                ipr.link("add", ifname="cni0", kind="bridge")
                br = ipr.link_lookup(ifname="cni0")[0]
                ipr.addr("add", index=br, address=gw, prefixlen=subnet.prefixlen)
                ipr.link("set", index=br, state="up", mtu=info["mtu"])
        with netlink.iproute(ns) as ipr:
            ipr.link(
                "add",
                ifname="eth0",
                kind="veth",
                mtu=info["mtu"],
                peer={"ifname": f"v{name}", "net_ns_fd": netns.path(n.ns), "mtu": info["mtu"]},
            )
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=ip, prefixlen=subnet.prefixlen)
            ipr.link("set", index=eth, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=gw)
            pod_mac = ipr.get_links(eth)[0].get_attr("IFLA_ADDRESS")
        with netlink.iproute(n.ns) as ipr:
            v = ipr.link_lookup(ifname=f"v{name}")[0]
            ipr.link(
                "set",
                index=v,
                master=ipr.link_lookup(ifname="cni0")[0],
                state="up",
                ifalias=pod_alias(ip, pod_mac, extra_source),
            )  # as corral-cni tags it
        pod = Pod(name, ns, ip, i)
        n.pods.append(pod)
        return pod

    def run(
        self, ns: str, argv: list[str], check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return netns.run(ns, argv, check=check, timeout=timeout)

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(netns.command(ns, argv), **kw)

    def ping(self, src: Pod | str, dst: str, count: int = 1) -> bool:
        ns = src.ns if isinstance(src, Pod) else src
        p = self.run(ns, ["ping", "-c", str(count), "-W", "1", "-i", "0.2", dst], check=False)
        return p.returncode == 0

    def snapshot(self, i: int, vni: int = 1) -> dict[str, Any]:
        k = VxlanNetlink(self.node(i).ns)
        try:
            return k.snapshot(f"corral.{vni}")
        finally:
            k.close()

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(Exception):
                self.stop_agent(n.index, signal.SIGKILL)
        for ns in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                netns.remove(ns)
        shutil.rmtree(self.pin_root, ignore_errors=True)  # bpffs: unlink drops each pin
        shutil.rmtree(self.tmp, ignore_errors=True)
