"""Only pods that hold etcd credentials reach etcd's client port from this node.

Mutual TLS already refuses a pod without a certificate; this keeps ordinary pods
from reaching the port at all (no handshake to probe, nothing for a TLS bug to
meet). The node runtime owns one filter chain in the node's namespace,
`CORRAL-ETCD-PODS`, jumped to from `FORWARD` (etcd elsewhere: another machine,
or the host of the local cluster) and `INPUT` (etcd on this node) for TCP from
the cluster network, after any DNAT, so a Service pointed at etcd does not help:

    -A CORRAL-ETCD-PODS -s <credentialed pod IP>/32 -d <etcd IP>/32 -p tcp --dport <port> -j RETURN
    -A CORRAL-ETCD-PODS -d <etcd IP>/32 -p tcp --dport <port> -j REJECT --reject-with tcp-reset

The etcd endpoints are the node's own (its `--etcd`, resolved once; loopback ones
are the pods' own loopback and need no rule); a credentialed pod is one of this
node's pods that gets a credential set mounted (runtime/credentials.py). The
runtime allows a pod's address before its first credentialed container starts and
takes it out when the pod ends; every 30 s it checks and repairs the chain (three
`iptables` calls: a flushed chain comes back).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from corral.node import iptables

TABLE = "filter"
CHAIN = "CORRAL-ETCD-PODS"
COMMENT = "corral: only pods with etcd credentials reach etcd"


def etcd_targets(endpoints: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """(IPv4 address, port) of every non-loopback endpoint, host names resolved."""
    out: set[tuple[str, int]] = set()
    for host, port in endpoints:
        try:
            addrs = {str(ipaddress.ip_address(host))}
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                continue
            addrs = {str(i[4][0]) for i in infos}
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if ip.version == 4 and not ip.is_loopback:
                out.add((a, port))
    return sorted(out)


def rules(targets: list[tuple[str, int]], allowed: Iterable[str]) -> list[str]:
    """The chain's rules in `iptables -S` spelling."""
    out = []
    for ip, port in targets:
        dst = f"-d {ip}/32 -p tcp -m tcp --dport {port}"
        out += [f"-A {CHAIN} -s {a}/32 {dst} -j RETURN" for a in sorted(set(allowed))]
        out.append(f"-A {CHAIN} {dst} -j REJECT --reject-with tcp-reset")
    return out


def jumps(network: str) -> dict[str, list[str]]:
    rule = ["-s", network, "-p", "tcp", "-m", "comment", "--comment", COMMENT, "-j", CHAIN]
    return {"FORWARD": rule, "INPUT": rule}


def sync(
    namespace: str | None, network: str, targets: list[tuple[str, int]], allowed: Iterable[str]
) -> bool:
    """Make the chain and its jumps match; True if anything changed."""
    return iptables.ensure_chain(namespace, TABLE, CHAIN, rules(targets, allowed), jumps(network))
