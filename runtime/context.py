"""What every node component is handed: identity, store and the node's paths."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from corral.api.store import Store


@dataclass
class NodePaths:
    """The host paths a node's components use (bind mounts under `corral up`)."""

    run_dir: str = "/run/corral"
    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dir: str = "/opt/cni/bin"
    cni_cache_dir: str = "/var/lib/cni"
    netns_dir: str = "/run/netns"
    state_dir: str = "/var/lib/corral/node"

    @property
    def subnet_file(self) -> str:
        return os.path.join(self.run_dir, "subnet.json")

    @property
    def cni_socket(self) -> str:
        return os.path.join(self.run_dir, "cni.sock")


@dataclass
class NodeContext:
    node_name: str
    store: Store
    paths: NodePaths = field(default_factory=NodePaths)
    underlay_iface: str | None = None  # found from the default route when None
    underlay_ip: str | None = None
    cluster_dns: str = "10.96.0.10"
    cluster_domain: str = "cluster.local"
    options: dict[str, object] = field(default_factory=dict)
