"""Containers cannot touch their node: capabilities, no_new_privs, users, hidden paths,
read-only roots, private files; and securityContext for the pods that need more.

The shim tests run real containers through both shims (native shim.c and shim.py) in a
network namespace they make and remove; the pod tests run the whole runtime on a
test-made node (tests/runtime_harness.py) with the real etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from corral.api.objects import Pod
from corral.api.store import Store, TLSFiles
from corral.cluster.etcd import LocalEtcd
from corral.node.context import NodePaths
from corral.runtime import containers, credentials, security
from corral.runtime import shim as shim_py
from corral.runtime.security import DEFAULT_CAPS, Security, cap_mask
from tests.runtime_harness import (
    REF_BIN,
    Node,
    destroy_node,
    make_node,
    pod_run,
    ready,
    tiny_rootfs,
)

# containerd's default set as /proc/<pid>/status prints it (CapEff, CapBnd).
CONTAINERD_CAPS = "00000000a80425fb"
NET_ADMIN = 1 << 12


def status_field(text: str, field: str) -> str:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in {text!r}")


# ---------------------------------------------------------------- the object model


def pod(sc: dict[str, Any] | None = None, psc: dict[str, Any] | None = None, **c: Any) -> Pod:
    container: dict[str, Any] = {"name": "c", "command": ["sleep", "1"], **c}
    if sc is not None:
        container["securityContext"] = sc
    spec: dict[str, Any] = {"containers": [container]}
    if psc is not None:
        spec["securityContext"] = psc
    return Pod.model_validate({"metadata": {"name": "p"}, "spec": spec})


def sec_of(p: Pod, hidden: list[str] | None = None) -> Security:
    return security.for_container(p, p.spec.containers[0], hidden or [])


def test_security_context_resolution() -> None:
    d = sec_of(pod(), ["/var/lib/corral"])
    assert f"{d.caps:016x}" == CONTAINERD_CAPS and len(DEFAULT_CAPS) == 14
    for k, v in shim_py.DEFAULT_SECURITY.items():  # the stdlib shim's copy for spec-less exec
        assert d.to_dict()[k] == v, k
    assert (d.privileged, d.uid, d.gid, d.no_new_privs, d.read_only_root) == (
        False,
        None,
        None,
        True,
        False,
    )
    assert d.hidden == ["/var/lib/corral"]
    # With or without CAP_, any case; drop applies to the defaults, add after it.
    s = sec_of(pod({"capabilities": {"add": ["cap_net_admin"], "drop": ["NET_RAW", "CAP_KILL"]}}))
    assert s.caps == (cap_mask(DEFAULT_CAPS) | NET_ADMIN) & ~cap_mask(["NET_RAW", "KILL"])
    s = sec_of(pod({"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}))
    assert security.cap_names(s.caps) == ["NET_BIND_SERVICE"]
    # The container's user overrides the pod's; the group defaults to 0 with a user.
    s = sec_of(pod({"runAsUser": 1000}, {"runAsUser": 2000, "runAsGroup": 3000}))
    assert (s.uid, s.gid) == (1000, 3000)
    assert (sec_of(pod(psc={"runAsUser": 5})).uid, sec_of(pod(psc={"runAsUser": 5})).gid) == (5, 0)
    # no_new_privs: unless escalation is allowed, or CAP_SYS_ADMIN, or privileged.
    assert not sec_of(pod({"allowPrivilegeEscalation": True})).no_new_privs
    assert not sec_of(pod({"capabilities": {"add": ["SYS_ADMIN"]}})).no_new_privs
    p = sec_of(pod({"privileged": True}), ["/x"])
    assert p.privileged and not p.no_new_privs and p.hidden == [] and p.caps == (1 << 41) - 1
    # A pod with an image has no node paths to hide; readOnlyRootFilesystem is passed on.
    s = sec_of(pod({"readOnlyRootFilesystem": True}, image="/srv/img"), ["/x"])
    assert s.read_only_root and s.hidden == []
    with pytest.raises(security.SecurityError, match="runAsNonRoot"):
        sec_of(pod({"runAsNonRoot": True}))
    # seccomp: RuntimeDefault unless Unconfined is asked for (the container's choice wins).
    assert d.seccomp and "-F" in d.shim_flags()
    unconfined = {"seccompProfile": {"type": "Unconfined"}}
    assert not sec_of(pod(psc=unconfined)).seccomp
    assert sec_of(pod({"seccompProfile": {"type": "RuntimeDefault"}}, unconfined)).seccomp
    assert not sec_of(pod({"privileged": True})).seccomp


@pytest.mark.parametrize(
    ("sc", "psc", "where", "what"),
    [
        ({"capabilities": {"add": ["NET_ADMN"]}}, None, "capabilities.add", "not a Linux cap"),
        ({"capabilities": {"drop": [7]}}, None, "capabilities.drop", "string"),
        ({"privileged": True, "allowPrivilegeEscalation": False}, None, "", "privileged to true"),
        (
            {"allowPrivilegeEscalation": False, "capabilities": {"add": ["CAP_SYS_ADMIN"]}},
            None,
            "",
            "CAP_SYS_ADMIN",
        ),
        ({"runAsUser": -1}, None, "runAsUser", "greater than or equal to 0"),
        ({"runAsUser": "1000"}, None, "runAsUser", "integer"),
        ({"runAsNonRoot": True, "runAsUser": 0}, None, "", "runAsNonRoot"),
        ({"seccompProfile": {"type": "Localhost"}}, None, "seccompProfile.type", "Unconfined"),
        ({"procMount": "Unmasked"}, None, "procMount", "Extra"),
        (None, {"privileged": True}, "spec.securityContext.privileged", "Extra"),
    ],
)
def test_security_context_errors_name_the_field(
    sc: dict[str, Any] | None, psc: dict[str, Any] | None, where: str, what: str
) -> None:
    with pytest.raises(ValidationError) as e:
        pod(sc, psc)
    text = str(e.value)
    assert "securityContext" in text and where in text and what in text, text


def test_hidden_paths_are_the_nodes_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_STATE_DIR", "/srv/clusters")
    paths = NodePaths(
        run_dir="/srv/clusters/c1/nodes/n1/run",
        state_dir="/data/node-state",
        cni_conf_dir="/etc/cni/net.d",
        netns_dir="/run/netns",
    )
    got = security.hidden_paths(paths, TLSFiles("/etc/pki/ca.pem", "/etc/node.pem", "/etc/k.pem"))
    for want in (
        "/var/lib/corral",
        "/srv/clusters",
        "/data/node-state",
        "/run/corral",
        "/run/netns",
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/lib/cni",
        "/sys/fs/bpf",
        "/root",
        "/home",
        "/etc/pki/ca.pem",  # the etcd client credentials themselves, not all of /etc
        "/etc/node.pem",
        "/etc/k.pem",
    ):
        assert want in got, got
    assert "/etc" not in got
    # Outermost only: the run dir lies inside the hidden state root.
    assert "/srv/clusters/c1/nodes/n1/run" not in got


def _asking(namespace: str, annotation: str | None) -> Pod:
    meta: dict = {"name": "p", "namespace": namespace}
    if annotation is not None:
        meta["annotations"] = {credentials.ANNOTATION: annotation}
    return Pod.model_validate(
        {"metadata": meta, "spec": {"containers": [{"name": "c", "command": ["true"]}]}}
    )


def test_credentials_only_for_system_pods_that_ask(tmp_path: Any) -> None:
    os.makedirs(tmp_path / "etcd-dns")
    d = str(tmp_path)
    assert credentials.mounts(_asking("corral-system", None), d) == []
    assert credentials.mounts(_asking("corral-system", "etcd-dns"), d) == [
        (f"{d}/etcd-dns", "/run/secrets/corral/etcd-dns")
    ]
    for ns, ann, why in (
        ("default", "etcd-dns", "only pods in corral-system"),
        ("corral-system", "nope", "no credential set 'nope'"),
        ("corral-system", "../pki", "not a credential set name"),
    ):
        with pytest.raises(credentials.CredentialsError, match=re.escape(why)):
            credentials.mounts(_asking(ns, ann), d)
    # The sets' directory is hidden from every container, wherever it is.
    paths = NodePaths(credentials_dir="/etc/corral-creds")
    assert "/etc/corral-creds" in security.hidden_paths(paths)


# ---------------------------------------------------------------- the shims


@pytest.fixture
def node_dir() -> Iterator[str]:
    """A directory outside /tmp standing in for node state (a file and a socket in it)."""
    d = tempfile.mkdtemp(prefix="corral-test-hidden-", dir="/var/lib")
    try:
        with open(os.path.join(d, "secret"), "w") as f:
            f.write("node state\n")
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(d, "cni.sock"))
        s.close()
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def run(
    pod_dir: str,
    script: str,
    sec: Security | None,
    image: str | None = None,
    exec_script: str | None = None,
    mounts: list[tuple[str, str]] | None = None,
    exec_mounts: list[tuple[str, str]] | None = None,
) -> tuple[int, str, str]:
    """Run `sh -c script` as a container; with `exec_script`, also exec that into it while
    it runs. (exit code, its output, the exec's output)."""
    hosts = os.path.join(pod_dir, "hosts")
    with open(hosts, "w") as f:
        f.write("10.9.8.7\tpodx\n")
    argv = ["sh", "-c", script if exec_script is None else "sleep 60"]
    with contextlib.suppress(FileNotFoundError):  # a fresh log for each run
        os.unlink(containers.log_path(pod_dir, "c", 0))
    rec, proc = await containers.launch(
        pod_dir,
        "c",
        0,
        argv=argv,
        env={},
        working_dir="/",
        netns=os.path.join(pod_dir, "netns", "cni-test"),
        hostname="podx",
        binds=[(hosts, "/etc/hosts")],
        cgroups=[],
        image=image,
        security=sec,
        mounts=mounts,
        exec_mounts=exec_mounts,
    )
    exec_out = ""
    if exec_script is not None:
        argv = containers.exec_argv(pod_dir, "c", rec.init_pid, ["sh", "-c", exec_script])
        r = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=30
        )
        exec_out = r.stdout + r.stderr
        await containers.stop(rec, proc, 0)
    rc = await asyncio.wait_for(containers.wait_exit(rec, proc), 30)
    with open(rec.log) as f:
        return rc or 0, f.read(), exec_out


PROBE = (
    "grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs|Groups)' /proc/self/status; "
    "mount -t tmpfs x /mnt && echo MOUNTED; "
    "ip addr add {a}/32 dev lo && echo ADDED; "
    "echo x > /tmp/x && echo WROTE-TMP; echo x > {d}/new && echo WROTE-NODE; "
    "cat /etc/hosts; ls -A {d}; cat {d}/secret; ls /var/lib/corral; "
    "test -e /dev/vda || test -e /dev/sda || echo NO-DISKS; echo END"
)


async def test_ordinary_container_has_containerd_caps_and_no_view_of_the_node(
    shim: str, pod_dir: str, node_dir: str
) -> None:
    sec = Security(hidden=[node_dir, "/var/lib/corral"])
    try:
        script = "echo x > /etc/corral-test-x && echo WROTE-ETC; " + PROBE
        _, out, _ = await run(pod_dir, script.format(d=node_dir, a="10.9.9.9"), sec)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink("/etc/corral-test-x")  # only if the test fails
    assert "END" in out, out
    assert status_field(out, "CapEff") == CONTAINERD_CAPS
    assert status_field(out, "CapBnd") == CONTAINERD_CAPS
    assert status_field(out, "NoNewPrivs") == "1"
    assert status_field(out, "Groups") == ""
    assert "MOUNTED" not in out and "permission denied" in out
    assert "ADDED" not in out and "Operation not permitted" in out
    assert "WROTE-ETC" not in out and "Read-only file system" in out
    assert "WROTE-NODE" not in out
    assert "WROTE-TMP" in out and "10.9.8.7\tpodx" in out
    assert "node state" not in out and "cni.sock" not in out and "NO-DISKS" in out
    # The node's own copy is untouched.
    with open(os.path.join(node_dir, "secret")) as f:
        assert f.read() == "node state\n"


async def test_exec_gets_the_containers_restrictions(shim: str, pod_dir: str) -> None:
    script = "id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; ps -e | wc -l; pwd"
    _, _, out = await run(pod_dir, "", Security(), exec_script=script)
    assert status_field(out, "CapEff") == CONTAINERD_CAPS, out
    assert status_field(out, "NoNewPrivs") == "1"
    assert out.split()[0] == "0"
    _, _, out = await run(pod_dir, "", Security(uid=1000, gid=1000), exec_script=script)
    assert out.split()[0] == "1000" and status_field(out, "CapEff") == "0" * 16, out


async def test_added_capability_user_and_privileged(shim: str, pod_dir: str, node_dir: str) -> None:
    sec = Security(caps=cap_mask(DEFAULT_CAPS) | NET_ADMIN, hidden=[node_dir])
    _, out, _ = await run(pod_dir, PROBE.format(d=node_dir, a="10.9.9.9"), sec)
    assert "ADDED" in out and "MOUNTED" not in out, out
    _, out, _ = await run(
        pod_dir, "id -u; id -g; id -G; echo x > /tmp/y && echo OK", Security(uid=1000)
    )
    assert out.split() == ["1000", "0", "0", "OK"], out
    priv = Security(privileged=True, caps=security.ALL_CAPS_MASK, no_new_privs=False)
    _, out, _ = await run(pod_dir, f"{PROBE.format(d=node_dir, a='10.9.9.10')}; umount /mnt", priv)
    with open("/proc/self/status") as f:  # the daemons' own set, as before
        assert status_field(out, "CapEff") == status_field(f.read(), "CapEff"), out
    assert status_field(out, "NoNewPrivs") == "0"
    assert "MOUNTED" in out and "ADDED" in out and "node state" in out
    assert "WROTE-NODE" in out and os.path.exists(os.path.join(node_dir, "new"))  # as before


async def test_credentials_mount_is_read_only_and_the_rest_stays_hidden(
    shim: str, pod_dir: str, node_dir: str
) -> None:
    creds = os.path.join(node_dir, "credentials", "etcd-x")
    os.makedirs(creds)
    with open(os.path.join(creds, "tls.key"), "w") as f:
        f.write("the key\n")
    os.chmod(os.path.join(creds, "tls.key"), 0o600)
    dst = "/run/secrets/corral/etcd-x"
    script = (
        f"cat {dst}/tls.key; echo x > {dst}/new && echo WROTE-SECRET; "
        f"grep ' {dst} ' /proc/self/mountinfo; ls -A {node_dir} | sed s/^/LS:/; "
        f"cat {node_dir}/secret; echo END"
    )
    sec = Security(hidden=[node_dir])
    _, out, _ = await run(pod_dir, script, sec, mounts=[(creds, dst)])
    assert "END" in out and "the key" in out, out
    assert "WROTE-SECRET" not in out and "Read-only file system" in out
    mountinfo = next(ln for ln in out.splitlines() if f" {dst} " in ln)
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(mountinfo.split()[5].split(",")), mountinfo
    assert "node state" not in out and "LS:" not in out  # its node dir: still hidden
    _, _, ex = await run(pod_dir, "", sec, mounts=[(creds, dst)], exec_script=f"cat {dst}/tls.key")
    assert "the key" in ex, ex  # `corral exec` sees what the container sees
    # Without the mount, the same container has none of it.
    _, out, _ = await run(pod_dir, f"cat {dst}/tls.key; echo END", sec)
    assert "END" in out and "the key" not in out, out
    with pytest.raises(containers.StartError, match="sandboxed containers only"):
        priv = Security(privileged=True, caps=security.ALL_CAPS_MASK, no_new_privs=False)
        await run(pod_dir, "true", priv, mounts=[(creds, dst)])


async def test_executable_mounts_show_that_directory_alone(
    shim: str, pod_dir: str, node_dir: str
) -> None:
    # corral's files for its system pods (runtime/corralfiles.py): one inside a hidden
    # directory (a checkout under /root) and one under the private /tmp.
    venv = os.path.join(node_dir, "checkout", "venv")
    tmpdir = tempfile.mkdtemp(prefix="corral-test-files-", dir="/tmp")
    try:
        for d, word in ((venv, "RAN-HIDDEN"), (tmpdir, "RAN-TMP")):
            os.makedirs(os.path.join(d, "bin"), exist_ok=True)
            with open(os.path.join(d, "bin", "tool"), "w") as f:
                f.write(f"#!/bin/sh\necho {word}\n")
            os.chmod(os.path.join(d, "bin", "tool"), 0o755)
        script = (
            f"{venv}/bin/tool; {tmpdir}/bin/tool; echo x > {venv}/new && echo WROTE; "
            f"echo x > {node_dir}/new && echo WROTE-HIDDEN; mkdir {node_dir}/d && echo MKDIR; "
            f"grep ' {venv} ' /proc/self/mountinfo; ls -A {node_dir} | sed s/^/LS:/; "
            f"ls -A {node_dir}/checkout | sed s/^/IN:/; cat {node_dir}/secret; echo END"
        )
        sec = Security(hidden=[node_dir])
        mounts = [(venv, venv), (tmpdir, tmpdir)]
        _, out, _ = await run(pod_dir, script, sec, exec_mounts=mounts)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert "END" in out and "RAN-HIDDEN" in out and "RAN-TMP" in out, out
    assert "WROTE" not in out and "MKDIR" not in out and "Read-only file system" in out
    mountinfo = next(ln for ln in out.splitlines() if f" {venv} " in ln)
    opts = set(mountinfo.split()[5].split(","))
    assert {"ro", "nosuid", "nodev"} <= opts and "noexec" not in opts, mountinfo
    # Of the hidden directory, only the mount point's path: no file, no sibling.
    assert [ln for ln in out.splitlines() if ln.startswith(("LS:", "IN:"))] == [
        "LS:checkout",
        "IN:venv",
    ], out
    assert "node state" not in out
    assert not os.path.exists(os.path.join(node_dir, "checkout", "venv", "new"))


async def test_seccomp_filter_unless_unconfined(shim: str, pod_dir: str) -> None:
    script = (
        "grep '^Seccomp:' /proc/self/status; unshare --user true && echo USERNS; "
        "sh -c 'echo forked'"  # fork and exec still work (clone without namespace flags)
    )
    _, out, _ = await run(pod_dir, script, Security())
    assert status_field(out, "Seccomp") == "2" and "forked" in out, out
    assert "USERNS" not in out and "Operation not permitted" in out
    _, _, out = await run(pod_dir, "", Security(), exec_script=script)
    assert status_field(out, "Seccomp") == "2" and "USERNS" not in out, out
    _, out, _ = await run(pod_dir, script, Security(seccomp=False))
    assert status_field(out, "Seccomp") == "0" and "USERNS" in out, out


def test_both_shims_filter_the_same_calls() -> None:
    with open(containers.NATIVE_SHIM_SRC) as f:
        src = f.read()
    for name, want in (
        ("seccomp_always", shim_py.SECCOMP_ALWAYS),
        ("seccomp_sys_admin", shim_py.SECCOMP_SYS_ADMIN),
    ):
        m = re.search(name + r"\[\] = \{([^}]*)\}", src)
        assert m is not None, name
        assert tuple(int(x) for x in m.group(1).split(",")) == want, name


async def test_image_root_read_only_and_not_escapable(shim: str, pod_dir: str) -> None:
    image = os.path.join(pod_dir, "image")
    tiny_rootfs(image)
    script = (
        "echo x > /etc/x && echo WROTE-ETC; echo x > /tmp/x && echo WROTE-TMP; "
        "read l < /etc/hosts; echo $l; cd /..; for f in *; do echo ROOT:$f; done"
    )
    _, out, _ = await run(pod_dir, script, Security(read_only_root=True), image=image)
    assert "WROTE-ETC" not in out and "WROTE-TMP" in out and "10.9.8.7" in out, out
    roots = {w.removeprefix("ROOT:") for w in out.split() if w.startswith("ROOT:")}
    assert roots <= {"bin", "etc", "lib", "lib64", "usr", "dev", "proc", "tmp"}, roots
    _, out, _ = await run(pod_dir, script, Security(), image=image)
    assert "WROTE-ETC" in out, out  # a writable image layer by default
    assert not os.path.exists(os.path.join(image, "etc", "x"))


async def test_records_are_private(shim: str, pod_dir: str) -> None:
    await run(pod_dir, "echo secret-env", Security())
    cdir = containers.container_dir(pod_dir, "c")
    for path in (
        os.path.join(cdir, "spec"),
        os.path.join(cdir, "pid"),
        os.path.join(cdir, "status"),
        containers.log_path(pod_dir, "c", 0),
    ):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(pod_dir).st_mode) == 0o700


# ---------------------------------------------------------------- whole pods

needs_plugins = pytest.mark.skipif(
    not os.path.exists(f"{REF_BIN}/bridge"), reason="reference CNI plugins not installed"
)


@pytest.fixture
async def node(etcd: LocalEtcd, store: Store) -> AsyncIterator[Node]:
    n = await make_node(etcd.url, etcd.client_port, store, prefix="sb")
    try:
        yield n
    finally:
        await destroy_node(n)


def sleeper(sc: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    c: dict[str, Any] = {"name": "c", "command": ["sleep", "3600"]}
    if sc is not None:
        c["securityContext"] = sc
    return [c]


@needs_plugins
async def test_pods_are_sandboxed_unless_they_ask(node: Node) -> None:
    # A stand-in for the CNI daemon's socket in the node's run dir.
    run_dir = os.path.join(node.tmp, "run")
    os.makedirs(run_dir, exist_ok=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(run_dir, "cni.sock"))
    s.close()
    specs = {
        "plain": sleeper(),
        "netadmin": sleeper({"capabilities": {"add": ["NET_ADMIN"]}}),
        "priv": sleeper({"privileged": True}),
        "user": sleeper({"runAsUser": 1000}),
        "rofs": sleeper({"readOnlyRootFilesystem": True}),
    }
    for name, cs in specs.items():
        await node.create(node.pod(name, cs))
    await node.create(node.pod("nonroot", sleeper({"runAsNonRoot": True})))
    pods = {name: await node.wait_pod(name, ready, "Ready") for name in specs}

    def sh(name: str, script: str) -> subprocess.CompletedProcess:
        p = pods[name]
        assert p is not None
        return pod_run(p, ["sh", "-c", script])

    st = sh("plain", "cat /proc/self/status").stdout
    assert status_field(st, "CapEff") == CONTAINERD_CAPS
    assert status_field(st, "NoNewPrivs") == "1"
    r = sh("plain", "mount -t tmpfs x /mnt")
    assert r.returncode != 0 and "permission denied" in r.stderr, r
    r = sh("plain", "ip addr add 10.9.9.9/32 dev eth0")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
    for path in (
        node.state_dir,
        run_dir,
        os.path.join(run_dir, "cni.sock"),
        node.netns_dir,
        "/run/netns",
        "/run/corral",
    ):
        r = sh("plain", f"ls -A {path}")
        assert r.stdout == "" and (r.returncode != 0 or path.startswith("/run")), (path, r)
    assert sh("plain", "ls -A /var/lib/corral 2>/dev/null").stdout == ""
    # The pod still has its own DNS config and hosts entry, and a working network.
    assert "nameserver 10.96.0.10" in sh("plain", "cat /etc/resolv.conf").stdout
    ip = pods["plain"].status.pod_ip  # type: ignore[union-attr]
    assert f"{ip}\tplain" in sh("plain", "cat /etc/hosts").stdout
    gw = node.subnet.rsplit(".", 1)[0] + ".1"
    r = sh("plain", f"ping -c 1 -W 5 {gw}")  # NET_RAW is in the default set
    assert r.returncode == 0, r

    r = sh("netadmin", "ip addr add 10.9.9.9/32 dev eth0 && ip -o addr show dev eth0")
    assert r.returncode == 0 and "10.9.9.9/32" in r.stdout, r

    r = sh("priv", f"mount -t tmpfs x /mnt && umount /mnt && ls {node.state_dir}")
    assert r.returncode == 0 and "pods" in r.stdout, r
    with open("/proc/self/status") as f:  # the node's own set, as before
        ours = status_field(f.read(), "CapEff")
    assert status_field(sh("priv", "cat /proc/self/status").stdout, "CapEff") == ours

    assert sh("user", "id -u").stdout.strip() == "1000"

    r = sh("rofs", "echo x > /etc/x")
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r
    assert sh("rofs", "echo x > /tmp/x && cat /tmp/x").stdout == "x\n"

    p = await node.wait_pod(
        "nonroot",
        lambda p: (
            p is not None
            and any(
                c.state.get("waiting", {}).get("reason") == "CrashLoopBackOff"
                or c.last_state.get("terminated", {}).get("reason") == "ContainerCannotRun"
                for c in p.status.container_statuses
            )
        ),
        "refused",
    )
    assert p is not None
    term = p.status.container_statuses[0].last_state["terminated"]
    assert "runAsNonRoot" in term["message"], term

    # The pod's files under the node's state dir are the node's root's only.
    pdir = os.path.join(node.state_dir, "pods", pods["plain"].metadata.uid or "")  # type: ignore[union-attr]
    assert stat.S_IMODE(os.stat(os.path.join(node.state_dir, "pods")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(pdir).st_mode) == 0o700
    for rel in ("state.json", "containers/c/spec", "logs/c/0.log"):
        assert stat.S_IMODE(os.stat(os.path.join(pdir, rel)).st_mode) == 0o600, rel
