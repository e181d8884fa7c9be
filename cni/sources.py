"""The opt-in for a pod that may send from more than its own address.

corral-cni lets a pod send only from its own IP and MAC (corral.node.podguard
and the fast path's from_pod). A pod that must send from more addresses (a
test client standing in for many clients, say) asks for one extra IPv4 prefix
through CNI_ARGS:

    CNI_ARGS="CORRAL_EXTRA_SOURCE=10.244.1.128/25"

The prefix must lie inside the cluster network (anything else leaves the node
masqueraded anyway). It goes into the host veth's alias as a third field, so
both datapaths' guards (and a restarted agent) read it back from the kernel.
Whoever can pass CNI_ARGS for a pod can grant it: the runtime, not the pod.
"""

from __future__ import annotations

import ipaddress

from corral.cni import errors as E
from corral.cni.config import Net4
from corral.cni.errors import CNIError

ARG = "CORRAL_EXTRA_SOURCE"


def extra_source(cni_args: dict[str, str], network: Net4 | None) -> str | None:
    """The prefix CNI_ARGS asks for, checked; None when it asks for none."""
    raw = cni_args.get(ARG, "").strip()
    if not raw:
        return None
    try:
        net = ipaddress.IPv4Network(raw, strict=True)
    except ValueError as e:
        raise CNIError(
            E.INVALID_ENV, f"CNI_ARGS {ARG}={raw!r} is not an IPv4 prefix", str(e)
        ) from None
    if network is not None and not net.subnet_of(network):
        raise CNIError(
            E.INVALID_ENV,
            f"CNI_ARGS {ARG}={raw} lies outside the cluster network {network}",
            "an extra source prefix must be inside the cluster network",
        )
    return str(net)
