"""Real CNI runtimes on a `corral up` node, for the interop tests: podman (CNI backend)
and containerd (`ctr run --cni`), each confined to a temporary directory.

Nothing is pulled: podman runs a root filesystem directory (`--rootfs`), containerd
imports an OCI image archive written here from the same directory. Both run inside
the node (`cluster.exec`), so they read the node's own /etc/cni/net.d (corral's
conflist), /opt/cni/bin and /var/lib/cni (bind mounts of the node's state dir, see
cluster/nodes.py), and make their network namespaces in the node's /run/netns.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from typing import Any

BUSYBOX = "/usr/bin/busybox"  # Debian busybox-static: one static binary (its `wget -T` crashes)
APPLETS = ("sh", "wget", "timeout", "ip", "nc", "sleep", "cat", "hostname", "httpd", "true", "ls")


def busybox_rootfs(path: str) -> str:
    """A root filesystem of a static busybox and its applets: enough for sh/wget/ip."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(path, "bin", "busybox"))
    for a in APPLETS:
        with contextlib.suppress(FileExistsError):
            os.symlink("busybox", os.path.join(path, "bin", a))
    with open(os.path.join(path, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/:/bin/sh\n")
    with open(os.path.join(path, "etc", "group"), "w") as f:
        f.write("root:x:0:\n")
    return path


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def oci_archive(rootfs: str, out: str, ref: str) -> str:
    """Write an OCI image layout tarball (index.json, manifest, config, one gzip layer)
    of `rootfs` to `out`, tagged `ref` (`ctr image import` takes it as is)."""
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as t:
        for name in sorted(os.listdir(rootfs)):
            t.add(os.path.join(rootfs, name), arcname=name)
    diff = layer_tar.getvalue()
    layer_gz = gzip.compress(diff, mtime=0)
    blobs: dict[str, bytes] = {}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(diff).hexdigest()]},
    }
    cfg = _blob(blobs, json.dumps(config).encode())
    lay = _blob(blobs, layer_gz)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **lay}],
    }
    man = _blob(blobs, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **man,
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref,
                },
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
        **{f"blobs/sha256/{d.split(':')[1]}": b for d, b in blobs.items()},
    }
    with tarfile.open(out, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))
    return out


def remove_cgroups(rel: str, timeout: float = 10.0) -> None:
    """rmdir the cgroup subtree `rel` (e.g. corral/<node>/podman-x) in every hierarchy,
    retrying while a process that is on its way out (conmon) still holds one."""
    base = "/sys/fs/cgroup"
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for ctrl in sorted(os.listdir(base)):
            top = os.path.join(base, ctrl, rel)
            if not os.path.isdir(top) or os.path.islink(os.path.join(base, ctrl)):
                continue
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(dirpath)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.2)


class Podman:
    """podman 4 with the CNI backend, every file of it under `root`.

    containers.conf and storage.conf are podman's own (CONTAINERS_CONF,
    CONTAINERS_STORAGE_CONF); --root/--runroot/--tmpdir keep images, containers and
    libpod's state there; containers go in the cgroup corral/<node>/podman-<id> (corral's
    tree, never the host's libpod_parent); `runc` because crun refuses this machine's
    hybrid cgroups; ulimits inside the machine's hard limits."""

    def __init__(self, cluster: Any, node: str, root: str) -> None:
        self.cluster, self.node, self.root = cluster, cluster.node(node), root
        self.cgroup = f"corral/{self.node}/podman-{os.path.basename(root)}"
        for d in ("storage", "run", "tmp", "static", "volumes"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        with open(os.path.join(root, "containers.conf"), "w") as f:
            f.write(
                "[containers]\n"
                'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                "[engine]\n"
                'cgroup_manager = "cgroupfs"\n'
                'runtime = "runc"\n'
                'events_logger = "file"\n'
                f'events_logfile_path = "{root}/events.log"\n'
                f'tmp_dir = "{root}/tmp"\n'
                f'static_dir = "{root}/static"\n'
                f'volume_path = "{root}/volumes"\n'
                "[network]\n"
                'network_backend = "cni"\n'
                'network_config_dir = "/etc/cni/net.d"\n'  # the node's: corral's conflist
                'cni_plugin_dirs = ["/opt/cni/bin"]\n'
            )
        with open(os.path.join(root, "storage.conf"), "w") as f:
            f.write(
                f'[storage]\ndriver = "vfs"\ngraphroot = "{root}/storage"\nrunroot = "{root}/run"\n'
            )

    def argv(self, *args: str) -> list[str]:
        r = self.root
        return [
            "env",
            f"CONTAINERS_CONF={r}/containers.conf",
            f"CONTAINERS_STORAGE_CONF={r}/storage.conf",
            "podman",
            "--root",
            f"{r}/storage",
            "--runroot",
            f"{r}/run",
            "--tmpdir",
            f"{r}/tmp",
            *args,
        ]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cluster.exec(self.node, *self.argv(*args), timeout=timeout)

    def run_detached(self, name: str, rootfs: str, *cmd: str) -> str:
        """`podman run -d` on corral's network; the container's ID."""
        r = self(
            "run", "-d", "--name", name, "--network", "corral",
            f"--cgroup-parent=/{self.cgroup}", "--rootfs", rootfs, *cmd,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1]

    def inspect(self, name: str, fmt: str) -> str:
        r = self("inspect", "--format", fmt, name)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def cleanup(self) -> None:
        self("rm", "-a", "-f", "-t", "0")
        remove_cgroups(self.cgroup)
        # podman made corral/<node> in every hierarchy; `corral down` removes it only
        # in those corral uses (memory, cpu, pids, unified).
        for ctrl in sorted(os.listdir("/sys/fs/cgroup")):
            if ctrl not in ("memory", "cpu", "pids", "unified"):
                for rel in (f"corral/{self.node}", "corral"):
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join("/sys/fs/cgroup", ctrl, rel))


class Containerd:
    """A containerd of the test's own, inside the node, stopped by PID.

    Its root, state, temp and opt dirs and its socket are under `root`; the CRI plugin
    is off. containerd 1.6 puts its shims' sockets and ctr its FIFOs in
    /run/containerd whatever the config says, so containerd runs in a mount namespace
    of its own (a child of the node's) where `root`/run is bind-mounted there, and
    `ctr` enters that namespace (`nsenter -t <containerd> -m -n`): it sees the node's
    CNI dirs and /run/netns like any process on the node."""

    def __init__(self, cluster: Any, node: str, root: str) -> None:
        self.cluster, self.node, self.root = cluster, cluster.node(node), root
        self.sock = os.path.join(root, "containerd.sock")
        self.proc: subprocess.Popen | None = None
        self.made_run_dir = False
        for d in ("root", "state", "tmp", "opt", "run"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        off = ["cri", "aufs", "btrfs", "zfs", "devmapper"]
        with open(os.path.join(root, "config.toml"), "w") as f:
            f.write(
                "version = 2\n"
                f'root = "{root}/root"\nstate = "{root}/state"\ntemp = "{root}/tmp"\n'
                "disabled_plugins = ["
                + ", ".join(
                    f'"io.containerd.{"grpc.v1" if p == "cri" else "snapshotter.v1"}.{p}"'
                    for p in off
                )
                + "]\n"
                f'[grpc]\n  address = "{self.sock}"\n'
                f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
                f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{root}/opt"\n'
            )

    def start(self, timeout: float = 30) -> None:
        if not os.path.isdir("/run/containerd"):  # the mount point only; nothing goes in it
            os.makedirs("/run/containerd")
            self.made_run_dir = True
        script = 'mount --bind "$1" /run/containerd && exec containerd --config "$2"'
        argv = self.cluster.exec_argv(
            self.node, "unshare", "--mount", "--propagation", "slave", "--",
            "sh", "-c", script, "containerd", f"{self.root}/run", f"{self.root}/config.toml",
        )  # fmt: skip
        log = open(os.path.join(self.root, "containerd.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"containerd exited: {self.log()}")
            if os.path.exists(self.sock) and self.ctr("version").returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"containerd did not start in {timeout:.0f}s: {self.log()}")

    def log(self) -> str:
        with open(os.path.join(self.root, "containerd.log"), errors="replace") as f:
            return f.read()[-3000:]

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        assert self.proc is not None
        argv = ["nsenter", "-t", str(self.proc.pid), "-m", "-n", "--wd=/", "--"]
        return subprocess.run(
            [*argv, "ctr", "--address", self.sock, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def shim_pids(self) -> list[int]:
        """The shims this containerd started (they name its socket in their argv)."""
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                if args[0].endswith(b"containerd-shim-runc-v2") and self.sock.encode() in args:
                    out.append(int(pid))
        return out

    def stop(self) -> None:
        """Delete every task and container, then stop containerd and its shims by PID."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for cid in self.ctr("task", "ls", "-q").stdout.split():
                self.ctr("task", "kill", "-s", "KILL", cid)
            time.sleep(0.3)
            for cid in self.ctr("task", "ls", "-q").stdout.split():
                self.ctr("task", "delete", "-f", cid)
            for cid in self.ctr("container", "ls", "-q").stdout.split():
                self.ctr("container", "rm", cid)
        shims = self.shim_pids()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in shims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.made_run_dir:
            with contextlib.suppress(OSError):
                os.rmdir("/run/containerd")
        self.proc = None


@contextlib.contextmanager
def containerd(cluster: Any, node: str, root: str) -> Iterator[Containerd]:
    c = Containerd(cluster, node, root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
