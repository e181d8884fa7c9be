"""`corral up`'s input, checked against the host and the running cluster (if any)
before anything is made: the cluster's state as it is about to be, or a
ClusterError saying what to change."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from corral.api.store import TLSFiles, endpoints_use_tls, parse_endpoints
from corral.cluster import etcdsetup, underlay
from corral.cluster import state as st
from corral.cluster.local import ClusterError, Progress, on_stderr
from corral.cluster.state import ClusterState, NodeState

DEFAULT_NODES = 3
MAX_NODES = 50
DEFAULT_UNDERLAY = "10.250.0.0/24"
MAX_DNS_REPLICAS = 50
RESERVED = {
    "the cluster (pod) CIDR": ipaddress.ip_network("10.244.0.0/16"),
    "the service CIDR": ipaddress.ip_network("10.96.0.0/12"),
    "loopback": ipaddress.ip_network("127.0.0.0/8"),
    "link-local addresses": ipaddress.ip_network("169.254.0.0/16"),
}


@dataclass
class UpOptions:
    name: str = st.DEFAULT_NAME
    nodes: int | None = None  # None: keep the running cluster's count, else DEFAULT_NODES
    etcd: list[str] | None = None
    etcd_tls: TLSFiles | None = None  # an external etcd's client certificate
    etcd_members: int | None = None  # local etcd members; None: keep the running count, else 1
    underlay_cidr: str | None = None
    state_dir: str | None = None
    wait: float = 0.0  # seconds to wait for every Node to become Ready
    dns_replicas: int | None = None  # cluster DNS pods; None: keep the running count, else 2
    apiservers: int | None = None  # API servers on nodes 1..N; None: keep the count, else 1
    etcd_auth: bool = False  # turn on the local etcd's auth: the dns certificate only reads
    lb_pool: str | None = None  # a LoadBalancerPool's CIDR, inside the underlay network
    progress: Progress = field(default=on_stderr)


def check_owner(old: ClusterState | None, name: str, sdir: str) -> None:
    if old is not None and old.name != name:
        raise ClusterError(
            f"{sdir} holds cluster {old.name!r}, not {name!r}; pick another --state-dir"
        )


def check_nodes(n: int) -> None:
    if not 1 <= n <= MAX_NODES:
        raise ClusterError(f"--nodes {n}: a local cluster has 1 to {MAX_NODES} nodes")


def plan(opts: UpOptions, sdir: str, old: ClusterState | None) -> ClusterState:
    """Check every input against the running cluster (if any) before anything changes."""
    name = opts.name
    count = opts.nodes or (len(old.nodes) if old else DEFAULT_NODES)
    if old is not None and count < len(old.nodes):
        raise ClusterError(
            f"cluster {name!r} has {len(old.nodes)} nodes; `corral up` only adds nodes. "
            f"Run `corral down --name {name}` first to make a smaller one"
        )
    if opts.apiservers is not None and not 1 <= opts.apiservers <= count:
        raise ClusterError(
            f"--apiservers {opts.apiservers}: give 1 to {count} (one per node at most)"
        )
    cidr = opts.underlay_cidr or (old.underlay_cidr if old else DEFAULT_UNDERLAY)
    if old is not None and cidr != old.underlay_cidr and opts.underlay_cidr:
        raise ClusterError(
            f"cluster {name!r} runs on underlay {old.underlay_cidr}, not {cidr}; "
            f"run `corral down --name {name}` first to change it"
        )
    # the flag itself, before the host
    urls = _check_etcd(opts.etcd, opts.etcd_tls) if opts.etcd else None
    net = _parse_cidr(cidr, count, st.host_veth(name))
    if old is not None and urls and (not old.etcd_external or urls != old.etcd_urls):
        raise ClusterError(
            f"cluster {name!r} was made with etcd "
            f"{','.join(old.etcd_urls) if old.etcd_external else '(local)'}; run `corral down "
            f"--name {name}` first to change it"
        )
    hosts = list(net.hosts())
    s = old or ClusterState(
        name=name,
        state_dir=sdir,
        underlay_cidr=str(net),
        host_ip=str(hosts[-1]),
        prefixlen=net.prefixlen,
    )
    if urls:
        s.etcd_external, s.etcd_urls = True, urls
        s.etcd_node_urls = urls
        t = opts.etcd_tls
        s.etcd_tls = None if t is None else {"ca": t.ca, "cert": t.cert, "key": t.key}
    if (urls or s.etcd_external) and opts.etcd_auth:
        raise ClusterError(
            "--etcd-auth is for the local etcd; an external etcd's users and roles are its "
            "operator's (see docs/cluster.md, Cluster DNS)"
        )
    if urls and opts.etcd_members:
        raise ClusterError("--etcd-members is for the local etcd; an external one has its own")
    etcdsetup.plan_members(s, opts.etcd_members)
    if opts.dns_replicas is not None and not 0 <= opts.dns_replicas <= MAX_DNS_REPLICAS:
        raise ClusterError(
            f"--dns-replicas {opts.dns_replicas}: give 0 (no cluster DNS) to {MAX_DNS_REPLICAS}"
        )
    if opts.lb_pool is not None:
        check_lb_pool(opts.lb_pool, s.underlay_cidr, [str(h) for h in hosts[:count]], s.host_ip)
    for i in range(len(s.nodes) + 1, count + 1):
        s.nodes.append(
            NodeState(
                name=st.node_name(name, i),
                index=i,
                netns=st.node_netns(name, i),
                ip=str(hosts[i - 1]),
            )
        )
    return s


def _parse_cidr(cidr: str, nodes_wanted: int, own_veth: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ClusterError(
            f"--underlay-cidr {cidr!r} is not a CIDR; write it like {DEFAULT_UNDERLAY}"
        ) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ClusterError(f"--underlay-cidr {cidr}: only IPv4 underlays are supported")
    if str(net) != cidr.strip() and "/" in cidr:
        raise ClusterError(f"--underlay-cidr {cidr} has host bits set; did you mean {net}?")
    if "/" not in cidr:
        raise ClusterError(f"--underlay-cidr {cidr} has no prefix length; e.g. {net.supernet(8)}")
    if net.num_addresses - 2 < nodes_wanted + 1:
        raise ClusterError(
            f"--underlay-cidr {net} is too small for {nodes_wanted} nodes and the host; "
            f"use a larger range such as {DEFAULT_UNDERLAY}"
        )
    if net.is_multicast or net.is_unspecified or net.is_reserved:
        raise ClusterError(f"--underlay-cidr {net} is not a unicast range")
    for what, reserved in RESERVED.items():
        if net.overlaps(reserved):
            raise ClusterError(
                f"--underlay-cidr {net} overlaps {what} {reserved}; pick another range, "
                f"e.g. {DEFAULT_UNDERLAY}"
            )
    for ifname, hnet in underlay.host_networks():
        if ifname != own_veth and net.overlaps(hnet):
            raise ClusterError(
                f"--underlay-cidr {net} overlaps the host's network {hnet} on {ifname}; "
                "pick a range the host does not use"
            )
    return net


def _check_etcd(urls: list[str], tls: TLSFiles | None) -> list[str]:
    try:
        eps = parse_endpoints(urls)
        secure = endpoints_use_tls(urls)
        if tls is not None:
            tls.read()
    except ValueError as e:
        raise ClusterError(f"--etcd: {e}") from None
    if secure and tls is None:
        raise ClusterError(
            "--etcd: https:// endpoints need --etcd-cafile, --etcd-certfile and --etcd-keyfile"
        )
    scheme = "https" if secure or tls is not None else "http"
    return [f"{scheme}://{h}:{p}" for h, p in eps]


def check_lb_pool(cidr: str, underlay: str, node_ips: list[str], host_ip: str) -> None:
    """--lb-pool: an IPv4 network inside the underlay, holding no node's or the host's
    address (one node answers ARP for each of its addresses on the underlay)."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise ClusterError(
            f"--lb-pool {cidr!r} is not a CIDR ({e}); e.g. 10.250.7.192/28"
        ) from None
    ul = ipaddress.ip_network(underlay)
    if not isinstance(net, ipaddress.IPv4Network) or not net.subnet_of(ul):  # type: ignore[arg-type]
        raise ClusterError(
            f"--lb-pool {cidr}: must be inside the underlay network {underlay}, where the "
            "nodes announce its addresses with ARP"
        )
    taken = [ip for ip in [*node_ips, host_ip] if ipaddress.ip_address(ip) in net]
    if taken:
        raise ClusterError(
            f"--lb-pool {cidr} holds {', '.join(taken)} (a node's or the host's address); "
            "pick a range of the underlay no node uses, e.g. its top addresses"
        )
