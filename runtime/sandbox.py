"""Pod sandboxes: a network namespace bind-mounted at <netns_dir>/cni-<uuid>
(as containerd makes them; `corral.node.netns.create_pinned`), plus the pod's
resolv.conf and /etc/hosts.
"""

from __future__ import annotations

import os
import uuid


def new_netns_path(netns_dir: str) -> str:
    return os.path.join(netns_dir, f"cni-{uuid.uuid4()}")


def resolv_conf(
    namespace: str,
    cluster_dns: str,
    domain: str,
    dns_policy: str = "ClusterFirst",
    host_resolv: str = "/etc/resolv.conf",
) -> str:
    if dns_policy == "Default":
        try:
            with open(host_resolv) as f:
                return f.read()
        except OSError:
            return ""
    if dns_policy == "None":
        return ""
    return (
        f"nameserver {cluster_dns}\n"
        f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
        "options ndots:5\n"
    )


def etc_hosts(
    pod_ip: str | None, hostname: str, subdomain: str | None, namespace: str, domain: str
) -> str:
    lines = [
        "# Kubernetes-managed hosts file (written by corral).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    if pod_ip:
        if subdomain:
            lines.append(f"{pod_ip}\t{hostname}.{subdomain}.{namespace}.svc.{domain}\t{hostname}")
        else:
            lines.append(f"{pod_ip}\t{hostname}")
    return "\n".join(lines) + "\n"
