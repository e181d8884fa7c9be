"""The cluster DNS objects `corral up` writes (cluster/dnsworkload.py), against a real etcd.

The whole-cluster behaviour (pods resolving through them) is in
integration/test_dns_cluster.py.
"""

from __future__ import annotations

import os
import sys

from corral.api.objects import Deployment, NetworkConfig, NetworkSpec, Pod, Service
from corral.api.store import Store
from corral.cluster import dnsworkload
from corral.runtime import corralfiles
from corral.runtime.security import Security

NS, NAME = dnsworkload.NAMESPACE, dnsworkload.NAME
CMD = ["/opt/venv/bin/python", "-m", "corral", "dns"]


async def dep(store: Store) -> Deployment:
    d = await store.get(Deployment, NAME, NS)
    assert d is not None
    return d


async def test_created_then_kept_as_the_user_scaled_it(store: Store) -> None:
    said = await dnsworkload.ensure(store, None, CMD)
    assert "created (2 replicas)" in said and "10.96.0.10 created" in said, said
    d = await dep(store)
    pod = d.spec.template
    assert pod.metadata.annotations == {
        "corral.dev/credentials": "etcd-dns",
        "corral.dev/mount-corral": "true",
    }
    c = pod.spec.containers[0]
    assert c.command == CMD and pod.spec.dns_policy == "Default"
    assert {(p.name, p.container_port, p.protocol) for p in c.ports} >= {
        ("dns", 53, "UDP"),
        ("dns-tcp", 53, "TCP"),
    }
    assert c.readiness_probe and c.readiness_probe.http_get
    assert c.readiness_probe.http_get.path == "/readyz"
    assert c.security_context and c.security_context.capabilities
    assert c.security_context.capabilities.add == ["NET_BIND_SERVICE"]
    svc = await store.get(Service, NAME, NS)
    assert svc is not None and svc.spec.cluster_ip == "10.96.0.10"
    assert [(p.name, p.port, p.protocol) for p in svc.spec.ports] == [
        ("dns", 53, "UDP"),
        ("dns-tcp", 53, "TCP"),
    ]
    # Nothing to do the second time; a user's scale survives a plain `up`.
    rev = d.metadata.resource_version
    assert "updated" not in await dnsworkload.ensure(store, None, CMD)
    assert (await dep(store)).metadata.resource_version == rev

    def scale(d: Deployment) -> Deployment:
        d.spec.replicas = 3
        return d

    await store.modify(Deployment, NAME, NS, scale)  # `corral scale deploy dns --replicas 3`
    await dnsworkload.ensure(store, None, CMD)
    assert (await dep(store)).spec.replicas == 3
    # --dns-replicas sets it; a new interpreter path rolls the template.
    await dnsworkload.ensure(store, 1, ["/srv/venv/bin/python", "-m", "corral", "dns"])
    d = await dep(store)
    assert d.spec.replicas == 1
    assert d.spec.template.spec.containers[0].command[0] == "/srv/venv/bin/python"


async def test_zero_removes_only_what_up_made(store: Store) -> None:
    await dnsworkload.ensure(store, None, CMD)
    said = await dnsworkload.ensure(store, 0, CMD)
    assert "Deployment and Service removed" in said, said
    assert await store.get(Deployment, NAME, NS) is None
    assert await store.get(Service, NAME, NS) is None
    # A Service `dns` of the user's own (CoreDNS, say) is left alone.
    mine = dnsworkload.service(NetworkSpec())
    mine.metadata.labels = {"k8s-app": "kube-dns"}
    await store.create(mine)
    assert "nothing removed" in await dnsworkload.ensure(store, 0, CMD)
    assert await store.get(Service, NAME, NS) is not None
    await dnsworkload.ensure(store, 2, CMD)  # and not taken over when DNS is back on
    svc = await store.get(Service, NAME, NS)
    assert svc is not None and svc.metadata.labels == {"k8s-app": "kube-dns"}


async def test_the_vip_follows_network_config(store: Store) -> None:
    await dnsworkload.ensure(store, None, CMD)
    spec = NetworkSpec.model_validate({"clusterDNS": "10.96.0.53"})
    await store.put(NetworkConfig(metadata={"name": "cluster"}, spec=spec))
    said = await dnsworkload.ensure(store, None, CMD)
    assert "10.96.0.53 updated" in said, said
    svc = await store.get(Service, NAME, NS)
    assert svc is not None and svc.spec.cluster_ip == "10.96.0.53"


def test_the_pods_get_this_interpreter_wherever_it_is_installed() -> None:
    # `up` no longer refuses a venv under /root, /home or /tmp: the DNS pods ask the
    # node runtime for corral's files (runtime/corralfiles.py), which covers the venv.
    argv = dnsworkload.corral_argv()
    assert argv == [sys.executable, "-m", "corral"]
    tmpl = dnsworkload.deployment(1, argv).spec.template
    pod = Pod.model_validate(
        {
            "metadata": {**tmpl.metadata.dump(), "name": "dns-x", "namespace": NS},
            "spec": tmpl.spec.dump(),
        }
    )
    venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    got = corralfiles.mounts(pod, Security(), [os.path.dirname(venv)])  # as if under /root
    assert any(dst == venv for _, dst in got), got


def test_the_command_carries_the_credential_paths() -> None:
    cmd = dnsworkload.server_command(["py", "-m", "corral"], ["https://10.1.0.254:2379"], True)
    assert cmd[:5] == ["py", "-m", "corral", "--etcd", "https://10.1.0.254:2379"]
    assert "/run/secrets/corral/etcd-dns/tls.key" in cmd
    assert cmd[cmd.index("dns") :] == [
        "dns", "--listen", "0.0.0.0:53", "--metrics-addr", "0.0.0.0:10275",
    ]  # fmt: skip
    plain = dnsworkload.server_command(["py"], ["http://10.1.0.254:2379"], False)
    assert "--etcd-cafile" not in plain
