"""corral's own files for its system pods (runtime/corralfiles.py): what is found, who
gets it, and a whole pod running this venv's interpreter while the checkout is hidden.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import corral
import corral.clusterdns
import corral.runtime
from corral.api.objects import Pod
from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd
from corral.runtime import corralfiles
from corral.runtime.security import Security
from tests.runtime_harness import REF_BIN, Node, destroy_node, make_node, pod_run

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(corral.__file__)))


def asking(namespace: str, value: str | None) -> Pod:
    meta: dict = {"name": "p", "namespace": namespace}
    if value is not None:
        meta["annotations"] = {corralfiles.ANNOTATION: value}
    return Pod.model_validate(
        {"metadata": meta, "spec": {"containers": [{"name": "c", "command": ["true"]}]}}
    )


def test_the_installation_is_the_venv_and_every_package_folder() -> None:
    found = corralfiles.installation()
    assert os.path.abspath(sys.prefix) in found
    for mod in (corral, corral.runtime, corral.clusterdns):
        assert os.path.dirname(os.path.abspath(mod.__file__ or "")) in found, mod
    # Folders of the checkout that are not packages of corral are not part of it.
    for other in ("tests", "docs", "scripts", "integration"):
        assert os.path.join(CHECKOUT, other) not in found


def test_only_system_pods_that_ask_get_it() -> None:
    hidden = [CHECKOUT]  # as if the checkout were under /root
    sec = Security()
    assert corralfiles.mounts(asking("corral-system", None), sec, hidden) == []
    assert corralfiles.mounts(asking("corral-system", "false"), sec, hidden) == []
    got = corralfiles.mounts(asking("corral-system", "true"), sec, hidden)
    assert (os.path.realpath(sys.prefix), os.path.abspath(sys.prefix)) in got
    assert all(dst.startswith(CHECKOUT + "/") for _, dst in got), got
    with pytest.raises(corralfiles.CorralFilesError, match="only pods in corral-system"):
        corralfiles.mounts(asking("default", "true"), sec, hidden)
    with pytest.raises(corralfiles.CorralFilesError, match="neither"):
        corralfiles.mounts(asking("corral-system", "yes"), sec, hidden)
    # A privileged container sees the node's files, an image container has its own.
    priv = Security(privileged=True)
    assert corralfiles.mounts(asking("corral-system", "true"), priv, hidden) == []
    assert corralfiles.mounts(asking("corral-system", "true"), sec, hidden, image=True) == []


def test_plan_mounts_what_pods_cannot_see_and_nothing_with_state_inside(tmp_path: Any) -> None:
    root = str(tmp_path)  # under /tmp: private in every pod
    for d in ("venv/lib", "api", "cli"):
        os.makedirs(f"{root}/{d}")
    paths = [f"{root}/venv", f"{root}/venv/lib", f"{root}/api", f"{root}/cli", "/usr"]
    assert corralfiles.plan(paths, ["/root"]) == [
        (f"{root}/api", f"{root}/api"),
        (f"{root}/cli", f"{root}/cli"),
        (f"{root}/venv", f"{root}/venv"),  # /usr is visible; venv/lib is inside venv
    ]
    assert corralfiles.plan(["/usr", "/opt"], ["/root"]) == []  # installed where pods see
    with pytest.raises(corralfiles.CorralFilesError, match="which pods must not see"):
        corralfiles.plan(paths, ["/root", f"{root}/venv/lib"])


# ---------------------------------------------------------------- a whole pod

needs_plugins = pytest.mark.skipif(
    not os.path.exists(f"{REF_BIN}/bridge"), reason="reference CNI plugins not installed"
)


@pytest.fixture
async def hiding_node(
    etcd: LocalEtcd, store: Store, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Node]:
    """A node whose pods cannot see this checkout (its state root, to the runtime), as
    they cannot see a checkout under /root, /home or /tmp."""
    monkeypatch.setenv("CORRAL_STATE_DIR", CHECKOUT)
    n = await make_node(etcd.url, etcd.client_port, store, prefix="cf")
    try:
        yield n
    finally:
        await destroy_node(n)


async def wait_pod(
    node: Node, name: str, ns: str, pred: Callable[[Pod | None], bool], what: str
) -> Pod:
    deadline = time.monotonic() + 90
    p = None
    while time.monotonic() < deadline:
        p = await node.store.get(Pod, name, ns)
        if p is not None and pred(p):
            return p
        await asyncio.sleep(0.1)
    raise AssertionError(f"{ns}/{name}: {what}: {p and p.status}\n{node.runtime_log()}")


def running(p: Pod | None) -> bool:
    return p is not None and p.status.phase == "Running" and p.ready


def refused(p: Pod | None) -> bool:
    return p is not None and any(
        c.last_state.get("terminated", {}).get("reason") == "ContainerCannotRun"
        for c in p.status.container_statuses
    )


@needs_plugins
async def test_a_system_pod_runs_corral_from_a_hidden_checkout(hiding_node: Node) -> None:
    node = hiding_node
    python = [sys.executable, "-c", "import corral.clusterdns.server; print('IMPORTED')"]
    sleeper = [{"name": "c", "command": ["sleep", "3600"]}]
    for name, ns, ann in (
        ("asks", "corral-system", "true"),
        ("plain", "corral-system", None),
        ("user", "default", "true"),
    ):
        pod = node.pod(name, sleeper)
        pod.metadata.namespace = ns
        if ann is not None:
            pod.metadata.annotations[corralfiles.ANNOTATION] = ann
        await node.create(pod)
    asks = await wait_pod(node, "asks", "corral-system", running, "Running")
    r = pod_run(asks, python)
    assert r.returncode == 0 and "IMPORTED" in r.stdout, r
    # Of the checkout: the venv and the package folders, read-only; nothing else.
    r = pod_run(asks, ["ls", "-A", CHECKOUT])
    seen = set(r.stdout.split())
    assert {os.path.basename(sys.prefix), "corral", "runtime", "clusterdns"} <= seen, r
    assert not seen & {"pyproject.toml", "tests", "docs", ".git", "README.md"}, r
    r = pod_run(asks, ["sh", "-c", f"echo x > {corral.runtime.__path__[0]}/x"])
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r
    # The same pod without the annotation cannot run this venv's interpreter at all.
    plain = await wait_pod(node, "plain", "corral-system", running, "Running")
    r = pod_run(plain, python)
    assert r.returncode != 0 and "IMPORTED" not in r.stdout, r
    # Anyone else asking is refused.
    user = await wait_pod(node, "user", "default", refused, "refused")
    term = user.status.container_statuses[0].last_state["terminated"]
    assert "only pods in corral-system" in term["message"], term
