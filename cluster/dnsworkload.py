"""Cluster DNS the way clusters run CoreDNS: a Deployment in `corral-system` behind the
Service `dns` at NetworkConfig's clusterDNS address (docs/dns.md, "Running it").

`corral up` writes both objects; the replication controller, the scheduler, the
node runtimes, the endpoints controller and the proxies do the rest, so the
`nameserver` in every pod's resolv.conf answers. The pods run `corral dns` with the
same interpreter as `corral up` (containers without an image run on the node's own
filesystem; the node runtime mounts corral's venv and package folders read-only into
them, wherever corral is checked out: runtime/corralfiles.py), and read etcd with
the `dns` client certificate, which the node runtime mounts read-only into them
alone (runtime/credentials.py).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from corral.api.objects import (
    Deployment,
    Endpoints,
    NetworkConfig,
    NetworkSpec,
    ObjectMeta,
    Service,
)
from corral.api.store import Store
from corral.runtime import corralfiles, credentials

NAMESPACE = "corral-system"
NAME = "dns"
APP_LABEL = {"k8s-app": "corral-dns"}
MANAGED_BY = {"app.kubernetes.io/managed-by": "corral-up"}
CREDENTIALS = "etcd-dns"  # the credential set's name (a subdirectory of the nodes' dir)
METRICS_PORT = 10275  # `corral dns --metrics-addr` (/healthz, /readyz, /metrics)
DEFAULT_REPLICAS = 2
# Files of the credential set, as the DNS pods see them.
SECRET_DIR = f"{credentials.MOUNT_ROOT}/{CREDENTIALS}"
CA, CERT, KEY = "ca.crt", "tls.crt", "tls.key"


def corral_argv() -> list[str]:
    """How a pod starts corral: this interpreter, as `corral up` itself runs."""
    return [sys.executable, "-m", "corral"]


def server_available() -> bool:
    """Whether this corral has the DNS server at all (found without importing it, as
    cluster/daemons.py finds each daemon: nothing here may import the CLI above it)."""
    try:
        return importlib.util.find_spec("corral.clusterdns.server") is not None
    except (ImportError, ValueError):
        return False


def server_command(argv: Sequence[str], etcd_urls: Sequence[str], tls: bool) -> list[str]:
    """The DNS container's command line: `corral dns`, listening on the pod's port 53,
    health and metrics on the pod's address (the probes come from the node)."""
    cmd = [*argv, "--etcd", ",".join(etcd_urls)]
    if tls:
        cmd += [
            "--etcd-cafile", f"{SECRET_DIR}/{CA}",
            "--etcd-certfile", f"{SECRET_DIR}/{CERT}",
            "--etcd-keyfile", f"{SECRET_DIR}/{KEY}",
        ]  # fmt: skip
    return [*cmd, "dns", "--listen", "0.0.0.0:53", "--metrics-addr", f"0.0.0.0:{METRICS_PORT}"]


def deployment(replicas: int, command: list[str]) -> Deployment:
    labels = {**APP_LABEL, **MANAGED_BY}
    probe = {"port": METRICS_PORT}
    return Deployment.model_validate(
        {
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": APP_LABEL},
                # one pod at a time, never below the count (CoreDNS's kubeadm default)
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            credentials.ANNOTATION: CREDENTIALS,
                            # the interpreter and corral's code, wherever installed
                            corralfiles.ANNOTATION: "true",
                        },
                    },
                    "spec": {
                        # the node's resolv.conf: its nameservers are the upstreams
                        "dnsPolicy": "Default",
                        "terminationGracePeriodSeconds": 5,
                        "containers": [
                            {
                                "name": "dns",
                                "command": command,
                                "env": [
                                    {"name": "PYTHONUNBUFFERED", "value": "1"},
                                    # the compiled fast path is built on first use into
                                    # the pod's private /tmp (the node's caches are hidden)
                                    {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
                                ],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                    {"name": "metrics", "containerPort": METRICS_PORT},
                                ],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "70Mi"},
                                    "limits": {"memory": "512Mi"},
                                },
                                "readinessProbe": {
                                    "httpGet": {"path": "/readyz", **probe},
                                    "periodSeconds": 2,
                                    "timeoutSeconds": 2,
                                    "failureThreshold": 2,
                                },
                                "livenessProbe": {
                                    "httpGet": {"path": "/healthz", **probe},
                                    "initialDelaySeconds": 30,
                                    "periodSeconds": 10,
                                    "timeoutSeconds": 5,
                                    "failureThreshold": 5,
                                },
                                "securityContext": {
                                    "capabilities": {
                                        "drop": ["ALL"],
                                        "add": ["NET_BIND_SERVICE"],
                                    },
                                    "readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False,
                                },
                            }
                        ],
                    },
                },
            },
        }
    )


def service(net: NetworkSpec) -> Service:
    return Service.model_validate(
        {
            "metadata": {
                "name": NAME,
                "namespace": NAMESPACE,
                "labels": {**APP_LABEL, **MANAGED_BY},
            },
            "spec": {
                "selector": APP_LABEL,
                "clusterIP": net.cluster_dns,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        }
    )


async def network_spec(store: Store) -> NetworkSpec:
    cfg = await store.get(NetworkConfig, "cluster")
    return cfg.spec if cfg is not None else NetworkSpec()


async def ensure(store: Store, replicas: int | None, command: list[str]) -> str:
    """Make the Deployment and the Service what they should be; what was done.

    `replicas` None keeps the running count (a user's `corral scale` stays), else sets
    it; 0 removes both objects (only those `corral up` made)."""
    old_dep = await store.get(Deployment, NAME, NAMESPACE)
    old_svc = await store.get(Service, NAME, NAMESPACE)
    if replicas == 0:
        gone = []
        for kind, old in ((Deployment, old_dep), (Service, old_svc)):
            if old is not None and _ours(old.metadata):
                await store.delete(kind, NAME, NAMESPACE, old.metadata.resource_version)
                gone.append(kind.KIND)
        return f"cluster DNS off ({' and '.join(gone) or 'nothing'} removed)"
    net = await network_spec(store)
    want_dep = deployment(DEFAULT_REPLICAS if replicas is None else replicas, command)
    if old_dep is None:
        await store.create(want_dep)
        did = [f"Deployment {NAMESPACE}/{NAME} created ({want_dep.spec.replicas} replicas)"]
    elif not _ours(old_dep.metadata):
        did = [f"Deployment {NAMESPACE}/{NAME} left as it is (not made by corral up)"]
    else:
        if replicas is None:
            want_dep.spec.replicas = old_dep.spec.replicas
        if old_dep.spec != want_dep.spec:
            want_dep.metadata = old_dep.metadata
            await store.update(want_dep)
            did = [f"Deployment {NAMESPACE}/{NAME} updated ({want_dep.spec.replicas} replicas)"]
        else:
            did = [f"Deployment {NAMESPACE}/{NAME} ({old_dep.spec.replicas} replicas)"]
    want_svc = service(net)
    if old_svc is None:
        await store.create(want_svc)
        did.append(f"Service {NAME} at {net.cluster_dns} created")
    elif _ours(old_svc.metadata) and _service_shape(old_svc) != _service_shape(want_svc):
        old_svc.spec.selector = want_svc.spec.selector
        old_svc.spec.ports = want_svc.spec.ports
        if old_svc.spec.cluster_ip != net.cluster_dns:
            # A ClusterIP does not move in place (as in Kubernetes): the new object gets it.
            await store.delete(Service, NAME, NAMESPACE, old_svc.metadata.resource_version)
            await store.create(want_svc)
        else:
            await store.update(old_svc)
        did.append(f"Service {NAME} at {net.cluster_dns} updated")
    else:
        did.append(f"Service {NAME} at {old_svc.spec.cluster_ip}")
    return "; ".join(did)


def _ours(md: ObjectMeta) -> bool:
    return all(md.labels.get(k) == v for k, v in MANAGED_BY.items())


def _service_shape(s: Service) -> tuple:
    return (s.spec.selector, [p.dump() for p in s.spec.ports], s.spec.cluster_ip)


@dataclass
class DNSHealth:
    address: str
    want: int
    ready_nodes: list[str]  # the node of each ready endpoint

    @property
    def ok(self) -> bool:
        """Every replica ready."""
        return len(self.ready_nodes) >= self.want

    @property
    def answering(self) -> bool:
        """At least one replica ready (or none wanted): the VIP answers."""
        return bool(self.ready_nodes) or self.want == 0

    def line(self) -> str:
        where = f" ({', '.join(sorted(self.ready_nodes))})" if self.ready_nodes else ""
        return (
            f"cluster DNS {self.address} ({NAMESPACE}/{NAME}): "
            f"{len(self.ready_nodes)}/{self.want} ready{where}"
        )


async def health(store: Store) -> DNSHealth | None:
    """The DNS Deployment's wanted replicas against the Service's ready endpoints."""
    dep = await store.get(Deployment, NAME, NAMESPACE)
    if dep is None:
        return None
    svc = await store.get(Service, NAME, NAMESPACE)
    eps = await store.get(Endpoints, NAME, NAMESPACE)
    ready: dict[str, str] = {}
    for sub in eps.subsets if eps is not None else []:
        for a in sub.addresses:
            ready[a.ip] = a.node_name or "?"
    address = (svc.spec.cluster_ip if svc is not None else None) or "(no Service)"
    return DNSHealth(address, dep.spec.replicas, list(ready.values()))
