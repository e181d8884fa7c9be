"""A node's paths and options: what its components are configured with, apart from the
store (`corral.daemon.nodecontext.NodeContext` carries both to each component)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

Datapath = Literal["auto", "bpf", "kernel"]
DATAPATHS: tuple[Datapath, ...] = ("auto", "bpf", "kernel")


@dataclass
class NodePaths:
    """The host paths a node's components use (bind mounts under `corral up`)."""

    run_dir: str = "/run/corral"
    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dir: str = "/opt/cni/bin"
    cni_cache_dir: str = "/var/lib/cni"
    netns_dir: str = "/run/netns"
    state_dir: str = "/var/lib/corral/node"
    # Credential sets for system pods (runtime/credentials.py): one directory each.
    credentials_dir: str = "/etc/corral/pod-credentials"

    @property
    def subnet_file(self) -> str:
        return os.path.join(self.run_dir, "subnet.json")

    @property
    def cni_socket(self) -> str:
        return os.path.join(self.run_dir, "cni.sock")

    @property
    def debug_socket(self) -> str:
        return os.path.join(self.run_dir, "debug.sock")


@dataclass
class NodeOptions:
    """How a node's components behave; every field has the production default."""

    netns: str | None = None  # program this namespace instead of our own (tests, debugging)
    datapath: Datapath = "auto"  # pod traffic between nodes: eBPF fast path, or kernel only
    cni_shim: Literal["native", "python"] = "native"
    resync_interval: float = 10.0  # seconds between full overlay repairs
    lease_ttl: int = 30  # subnet lease TTL in seconds, renewed every third of it
    ip_forward: bool = True  # turn on IPv4 forwarding in the node namespace
    kernel_events: bool = True  # a full overlay pass as soon as netlink reports damage
    restart_backoff: float = 10.0  # first container restart delay, doubling to 5 minutes
    # The node API (runtime/nodeapi.py, kubelet's :10250): off without all three files.
    tls_cert_file: str | None = None
    tls_private_key_file: str | None = None
    client_ca_file: str | None = None
    node_api_port: int = 10250

    def __post_init__(self) -> None:
        if self.datapath not in DATAPATHS:
            raise ValueError(f"datapath {self.datapath!r}: use one of {', '.join(DATAPATHS)}")
