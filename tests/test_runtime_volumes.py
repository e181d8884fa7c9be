"""Pod volumes and configuration on a real node runtime (tests/runtime_harness.py):
a Secret on tmpfs whose plaintext reaches no disk under the node's state directory,
a ConfigMap change reaching the mounted file, an emptyDir, IPC and /dev/shm two
containers share,
downwardAPI files, env.valueFrom from each source, and the kubelet's
CreateContainerConfigError / FailedMount while something referenced is missing.
Both container shims (native and Python) mount volumes."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from corral.api.objects import ConfigMap, Namespace, Pod, Secret
from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd
from corral.node import mounts
from corral.runtime.volumes import POD_SECURITY_LABEL
from tests.runtime_harness import (
    REF_BIN,
    Node,
    container_pids,
    destroy_node,
    make_node,
    pod_exec,
    pod_run,
    ready,
)

pytestmark = pytest.mark.skipif(
    not os.path.exists(f"{REF_BIN}/bridge"), reason="reference CNI plugins not installed"
)
SLEEP = ["sleep", "3600"]


@pytest.fixture(params=["native", "python"])
async def node(
    request: Any, etcd: LocalEtcd, store: Store, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Node]:
    # The runtime runs in its own process: the shim is chosen by its environment.
    monkeypatch.setenv("CORRAL_CONTAINER_SHIM", request.param)
    n = await make_node(etcd.url, etcd.client_port, store, prefix="vol")
    try:
        yield n
    finally:
        await destroy_node(n)


async def _configmap(store: Store, name: str, data: dict[str, str]) -> None:
    cm = ConfigMap.model_validate(
        {"metadata": {"name": name, "namespace": "default"}, "data": data}
    )
    await store.put(cm)


async def _secret(store: Store, name: str, data: dict[str, str]) -> None:
    s = Secret.model_validate(
        {"metadata": {"name": name, "namespace": "default"}, "stringData": data}
    )
    await store.put(s)


async def _eventually(fn: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out: {what} (last: {last!r})")


def _volume_dir(n: Node, p: Pod, plugin: str, name: str) -> str:
    return os.path.join(
        n.state_dir, "pods", p.metadata.uid or "", "volumes", f"kubernetes.io~{plugin}", name
    )


def _on_disk(state_dir: str, needle: str) -> list[str]:
    """Files under `state_dir` that hold `needle` on the disk itself: in a mount namespace
    of its own, every mount below it is detached first, so a tmpfs hides nothing."""
    script = (
        'for m in $(findmnt -rn -o TARGET | grep "^$1"); do umount -l "$m" 2>/dev/null; done; '
        'grep -rlF -- "$2" "$1" || true'
    )
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", state_dir, needle],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return r.stdout.split()


async def test_secret_on_tmpfs_configmap_updates_and_a_shared_empty_dir(
    node: Node, store: Store
) -> None:
    plaintext = "pw-" + secrets.token_hex(12)
    await _configmap(store, "app", {"conf": "v1", "other": "x"})
    await _secret(store, "creds", {"password": plaintext})
    p = node.pod(
        "vols",
        [
            {
                "name": "writer",
                "command": [
                    "sh",
                    "-c",
                    "echo shm > /dev/shm/f; ipcmk -M 4096 > /run/scratch/ipc; "
                    "echo shared > /run/scratch/x; exec sleep 3600",
                ],
                "volumeMounts": [{"name": "scratch", "mountPath": "/run/scratch"}],
            },
            {
                "name": "reader",
                "command": SLEEP,
                "volumeMounts": [
                    {"name": "scratch", "mountPath": "/run/scratch", "readOnly": True},
                    {"name": "cfg", "mountPath": "/run/cfg"},
                    {"name": "one", "mountPath": "/run/one/conf", "subPath": "conf"},
                    {"name": "creds", "mountPath": "/run/creds"},
                    {"name": "info", "mountPath": "/run/info"},
                    {"name": "mem", "mountPath": "/run/mem"},
                ],
            },
        ],
        volumes=[
            {"name": "scratch", "emptyDir": {}},
            {
                "name": "cfg",
                "configMap": {"name": "app", "items": [{"key": "conf", "path": "conf"}]},
            },
            {"name": "one", "configMap": {"name": "app"}},
            {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
            {
                "name": "info",
                "downwardAPI": {
                    "items": [
                        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    ]
                },
            },
            {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        ],
    )
    await node.create(p)
    p = await node.wait_pod("vols", ready, "running")
    assert p is not None

    # the emptyDir: one container's write is the other's read; read-only where asked
    out = await _eventually(
        lambda: pod_run(p, ["cat", "/run/scratch/x"], "reader").stdout, "shared file"
    )
    assert out == "shared\n"
    # one IPC namespace and one /dev/shm for the pod's containers
    shm_id = pod_exec(p, ["cat", "/run/scratch/ipc"], "reader").split()[-1]
    assert shm_id in pod_exec(p, ["ipcs", "-m"], "reader").split()
    assert pod_exec(p, ["cat", "/dev/shm/f"], "reader") == "shm\n"
    r = pod_run(p, ["sh", "-c", "echo no > /run/scratch/y"], "reader")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    # configMap: only the listed key, read-only; subPath a single file
    assert pod_exec(p, ["ls", "/run/cfg"], "reader").split() == ["conf"]
    assert pod_exec(p, ["cat", "/run/cfg/conf"], "reader") == "v1"
    assert pod_exec(p, ["cat", "/run/one/conf"], "reader") == "v1"
    assert pod_run(p, ["sh", "-c", "echo x > /run/cfg/conf"], "reader").returncode != 0
    # secret: the plaintext, mode 0400, on a tmpfs in the container and on the node
    assert pod_exec(p, ["cat", "/run/creds/password"], "reader") == plaintext
    assert pod_exec(p, ["stat", "-L", "-c", "%a", "/run/creds/password"], "reader") == "400\n"
    assert pod_exec(p, ["stat", "-f", "-c", "%T", "/run/creds"], "reader") == "tmpfs\n"
    secret_dir = _volume_dir(node, p, "secret", "creds")
    assert mounts.fstype(secret_dir) == "tmpfs" and mounts.is_mount(secret_dir)
    assert _on_disk(node.state_dir, plaintext) == []
    assert _on_disk(node.state_dir, "v1") != []  # the search can find what is on disk
    # downwardAPI and the memory emptyDir (capped at its sizeLimit)
    assert pod_exec(p, ["cat", "/run/info/name"], "reader") == "vols"
    assert pod_exec(p, ["cat", "/run/info/labels"], "reader") == 'app="vols"\n'
    assert pod_exec(p, ["stat", "-f", "-c", "%T", "/run/mem"], "reader") == "tmpfs\n"
    r = pod_run(p, ["dd", "if=/dev/zero", "of=/run/mem/big", "bs=1M", "count=2"], "reader")
    assert r.returncode != 0 and "No space left" in r.stderr

    # a ConfigMap change reaches the mounted file (the ..data swap); subPath keeps its copy
    await _configmap(store, "app", {"conf": "v2", "other": "x"})
    await _eventually(
        lambda: pod_run(p, ["cat", "/run/cfg/conf"], "reader").stdout == "v2", "ConfigMap update"
    )
    assert pod_exec(p, ["cat", "/run/one/conf"], "reader") == "v1"

    await node.delete("vols")
    await node.wait_pod("vols", lambda q: q is None, "deleted")
    assert not mounts.is_mount(secret_dir)
    assert not os.path.exists(os.path.dirname(os.path.dirname(secret_dir)))
    pod_dir = os.path.dirname(os.path.dirname(os.path.dirname(secret_dir)))
    assert not any(m.mount_point.startswith(pod_dir) for m in mounts.mountinfo())


async def test_env_value_from_each_source(node: Node, store: Store) -> None:
    await _configmap(store, "env-cm", {"color": "blue", "size": "L", "dotted.key": "d"})
    token = "t0k3n-" + secrets.token_hex(8)
    await _secret(store, "env-secret", {"token": token})
    p = node.pod(
        "envs",
        [
            {
                "name": "c",
                "command": SLEEP,
                "resources": {"limits": {"memory": "64Mi"}, "requests": {"cpu": "250m"}},
                "envFrom": [{"prefix": "CM_", "configMapRef": {"name": "env-cm"}}],
                "env": [
                    {
                        "name": "COLOR",
                        "valueFrom": {"configMapKeyRef": {"name": "env-cm", "key": "color"}},
                    },
                    {
                        "name": "TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": "env-secret", "key": "token"}},
                    },
                    {
                        "name": "ABSENT",
                        "valueFrom": {
                            "secretKeyRef": {"name": "env-secret", "key": "nope", "optional": True}
                        },
                    },
                    {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                    {
                        "name": "APP",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}},
                    },
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {
                        "name": "SA",
                        "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
                    },
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                    {
                        "name": "MEM",
                        "valueFrom": {
                            "resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}
                        },
                    },
                    {
                        "name": "CPU",
                        "valueFrom": {
                            "resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}
                        },
                    },
                    {"name": "GREETING", "value": "hi $(NAME) $$(NAME)"},
                ],
            }
        ],
    )
    created = await node.create(p)
    p = await node.wait_pod("envs", ready, "running")
    assert p is not None
    # the container's own environment: its PID 1's (an exec does not inherit it)
    raw = pod_exec(p, ["cat", "/proc/1/environ"])
    env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    want = {
        "CM_color": "blue",
        "CM_size": "L",
        "COLOR": "blue",
        "TOKEN": token,
        "NAME": "envs",
        "NS": "default",
        "UID": created.metadata.uid,
        "APP": "envs",
        "NODE": node.name,
        "SA": "default",
        "IP": p.status.pod_ip,
        "MEM": "64",
        "CPU": "250",
        "GREETING": "hi envs $(NAME)",
    }
    assert {k: env.get(k) for k in want} == want
    assert "ABSENT" not in env and env.get("CM_dotted.key") == "d"
    assert env["HOST"] == (p.status.host_ip or "")
    # the environment reached the shim through a memfd: not in the container spec on the
    # node's disk, nor in any process's argv (world-readable in /proc)
    assert _on_disk(node.state_dir, token) == []
    init = container_pids(p)["c"]
    with open(f"/proc/{init}/stat") as f:
        shim_pid = int(f.read().rsplit(")", 1)[1].split()[1])
    for pid in (init, shim_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert token.encode() not in f.read()


async def test_missing_config_waits_with_the_kubelets_reason(node: Node, store: Store) -> None:
    p = node.pod(
        "waits",
        [
            {
                "name": "c",
                "command": SLEEP,
                "env": [
                    {"name": "K", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}
                ],
            }
        ],
    )
    await node.create(p)

    def waiting(reason: str, message: str) -> Any:
        def pred(q: Pod | None) -> bool:
            cs = q.status.container_statuses if q else []
            w = cs[0].state.get("waiting", {}) if cs else {}
            return w.get("reason") == reason and message in w.get("message", "")

        return pred

    await node.wait_pod(
        "waits", waiting("CreateContainerConfigError", 'secret "later" not found'), "no secret"
    )
    await _secret(store, "later", {"other": "x"})
    await node.wait_pod(
        "waits",
        waiting("CreateContainerConfigError", "couldn't find key k in Secret default/later"),
        "no key",
    )
    await _secret(store, "later", {"k": "v"})
    p = await node.wait_pod("waits", ready, "running once the key exists")
    assert p is not None and p.status.container_statuses[0].restart_count == 0

    # a volume's ConfigMap missing: the pod waits (FailedMount), then runs
    q = node.pod(
        "mounts",
        [{"name": "c", "command": SLEEP, "volumeMounts": [{"name": "v", "mountPath": "/run/v"}]}],
        volumes=[{"name": "v", "configMap": {"name": "absent"}}],
    )
    await node.create(q)
    await node.wait_pod(
        "mounts",
        lambda x: (
            x is not None
            and x.status.reason == "FailedMount"
            and 'configmap "absent" not found' in (x.status.message or "")
        ),
        "FailedMount",
    )
    await _configmap(store, "absent", {"a": "1"})
    q = await node.wait_pod("mounts", ready, "running once the ConfigMap exists")
    assert q is not None and pod_exec(q, ["cat", "/run/v/a"]) == "1"


async def test_projected_optional_and_host_path(node: Node, store: Store) -> None:
    plaintext = "pj-" + secrets.token_hex(8)
    await _configmap(store, "pj-cm", {"conf": "c1"})
    await _secret(store, "pj-secret", {"key": plaintext})
    host = tempfile.mkdtemp(prefix="corral-test-hostpath-", dir="/var/lib")
    os.chmod(host, 0o755)
    try:
        with open(os.path.join(host, "from-node"), "w") as f:
            f.write("node file\n")
        p = node.pod(
            "proj",
            [
                {
                    "name": "c",
                    "command": SLEEP,
                    "volumeMounts": [
                        {"name": "all", "mountPath": "/run/all"},
                        {"name": "maybe", "mountPath": "/run/maybe"},
                        {"name": "host", "mountPath": "/run/host", "readOnly": True},
                    ],
                }
            ],
            volumes=[
                {
                    "name": "all",
                    "projected": {
                        "defaultMode": 0o440,
                        "sources": [
                            {
                                "configMap": {
                                    "name": "pj-cm",
                                    "items": [{"key": "conf", "path": "cm/conf"}],
                                }
                            },
                            {"secret": {"name": "pj-secret"}},
                            {"secret": {"name": "pj-absent", "optional": True}},
                            {
                                "downwardAPI": {
                                    "items": [
                                        {
                                            "path": "ns",
                                            "fieldRef": {"fieldPath": "metadata.namespace"},
                                        }
                                    ]
                                }
                            },
                        ],
                    },
                },
                {"name": "maybe", "configMap": {"name": "pj-absent", "optional": True}},
                {"name": "host", "hostPath": {"path": host, "type": "Directory"}},
            ],
        )
        # hostPath needs a namespace that admits it (Pod Security's privileged level)
        await node.create(p)
        await node.wait_pod(
            "proj",
            lambda x: (
                x is not None
                and x.status.reason == "FailedMount"
                and 'violates PodSecurity "baseline:latest": hostPath volumes ("host")'
                in (x.status.message or "")
            ),
            "hostPath refused in an unlabelled namespace",
        )
        await store.put(
            Namespace.model_validate(
                {"metadata": {"name": "default", "labels": {POD_SECURITY_LABEL: "privileged"}}}
            )
        )
        p = await node.wait_pod("proj", ready, "running once the namespace admits hostPath")
        assert p is not None
        assert pod_exec(p, ["cat", "/run/all/cm/conf"]) == "c1"
        assert pod_exec(p, ["cat", "/run/all/key"]) == plaintext
        assert pod_exec(p, ["cat", "/run/all/ns"]) == "default"
        assert pod_exec(p, ["stat", "-L", "-c", "%a", "/run/all/key"]) == "440\n"
        assert pod_exec(p, ["stat", "-f", "-c", "%T", "/run/all"]) == "tmpfs\n"
        # optional and missing: no keys (only the writer's ..data, as the kubelet's)
        assert pod_exec(p, ["ls", "/run/maybe"]) == ""
        assert pod_exec(p, ["cat", "/run/host/from-node"]) == "node file\n"
        r = pod_run(p, ["sh", "-c", "echo x > /run/host/y"])
        assert r.returncode != 0 and "Read-only file system" in r.stderr
        assert _on_disk(node.state_dir, plaintext) == []

        # hostPath whose type does not match: the pod waits with the kubelet's reason
        q = node.pod(
            "wrongtype",
            [
                {
                    "name": "c",
                    "command": SLEEP,
                    "volumeMounts": [{"name": "h", "mountPath": "/run/h"}],
                }
            ],
            volumes=[{"name": "h", "hostPath": {"path": host, "type": "File"}}],
        )
        await node.create(q)
        await node.wait_pod(
            "wrongtype",
            lambda x: (
                x is not None
                and x.status.reason == "FailedMount"
                and f"hostPath type check failed: {host} is not a File" in (x.status.message or "")
            ),
            "FailedMount for the hostPath type",
        )
        # never the node's own state, whatever the namespace says
        r2 = node.pod(
            "nodestate",
            [
                {
                    "name": "c",
                    "command": SLEEP,
                    "volumeMounts": [{"name": "h", "mountPath": "/run/h"}],
                }
            ],
            volumes=[{"name": "h", "hostPath": {"path": "/"}}],
        )
        await node.create(r2)
        await node.wait_pod(
            "nodestate",
            lambda x: (
                x is not None
                and x.status.reason == "FailedMount"
                and "which no pod may mount" in (x.status.message or "")
            ),
            "hostPath / refused",
        )
    finally:
        shutil.rmtree(host, ignore_errors=True)
