"""Credentials for system pods: a node-local directory mounted read-only into the pods
that may have it, hidden from every other pod.

The node keeps credential sets under `NodePaths.credentials_dir` (`corral node
--pod-credentials-dir`), one subdirectory per set (`corral up` puts the cluster DNS's
etcd client certificate in `etcd-dns/`). A pod gets a set when it lives in a system
namespace and names it in its annotation `corral.dev/credentials` (comma-separated
for several): each set is mounted read-only (also nosuid, nodev, noexec) at
`/run/secrets/corral/<set>` in every container of the pod, inside the container's
private /run. The directory itself is one of the node paths every container has
hidden (runtime/security.py), so no other pod sees it, whatever it names.

Who may create pods in a system namespace is who may write to etcd (there is no
admission layer): the boundary is the namespace, as it is for Kubernetes Secrets.
"""

from __future__ import annotations

import os
import re

from corral.api.namespaces import SYSTEM
from corral.api.objects import Pod

SYSTEM_NAMESPACES = (SYSTEM,)
ANNOTATION = "corral.dev/credentials"
MOUNT_ROOT = "/run/secrets/corral"
_SET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class CredentialsError(ValueError):
    """The pod asks for credentials it may not have, or the node has no such set."""


def wanted(pod: Pod) -> list[str]:
    raw = pod.metadata.annotations.get(ANNOTATION, "")
    return [n.strip() for n in raw.split(",") if n.strip()]


def mounts(pod: Pod, credentials_dir: str) -> list[tuple[str, str]]:
    """(node directory, container path) for every set the pod asks for."""
    names = wanted(pod)
    if not names:
        return []
    if pod.namespace not in SYSTEM_NAMESPACES:
        raise CredentialsError(
            f"annotation {ANNOTATION}: only pods in {', '.join(SYSTEM_NAMESPACES)} may have "
            f"node credentials, not pods in {pod.namespace!r}"
        )
    out = []
    for name in names:
        if not _SET_NAME.match(name) or len(name) > 63:
            raise CredentialsError(
                f"annotation {ANNOTATION}: {name!r} is not a credential set name "
                "(lowercase letters, digits and '-')"
            )
        src = os.path.join(credentials_dir, name)
        if not os.path.isdir(src):
            raise CredentialsError(
                f"annotation {ANNOTATION}: this node has no credential set {name!r} "
                f"(no directory {src}; see `corral node --pod-credentials-dir`)"
            )
        out.append((src, f"{MOUNT_ROOT}/{name}"))
    return out
