"""What the LoadBalancer allocator (control/lbips.py) and the announcer (proxy/announce.py)
agree on: which Services are corral's, their addresses, and the pool an address is in."""

from __future__ import annotations

import ipaddress

from corral.api.objects import LoadBalancerPool, Service

LB_CLASS = "corral.dev/l2"  # spec.loadBalancerClass corral answers to (besides none)


def ours(svc: Service) -> bool:
    """A LoadBalancer Service corral allocates and announces (not another class's)."""
    return svc.spec.type == "LoadBalancer" and svc.spec.load_balancer_class in (None, LB_CLASS)


def ingress_ips(svc: Service) -> list[str]:
    return [i["ip"] for i in svc.status.load_balancer.ingress if i.get("ip")]


def pool_of(ip: str, pools: list[LoadBalancerPool]) -> LoadBalancerPool | None:
    addr = ipaddress.ip_address(ip)
    for p in sorted(pools, key=lambda p: p.name):
        if any(addr in ipaddress.ip_network(c) for c in p.spec.cidrs):
            return p
    return None
