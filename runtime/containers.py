"""Container processes: launch through the shim, find them again, stop them by PID.

Each container instance has a directory `<pod_dir>/containers/<name>/` with its
`spec`, `pid` (wrapper and PID 1, written by the shim) and `status` (exit code,
written by the shim when PID 1 exits), all marshal-encoded dicts (see shim.py).
Logs are one file per instance, `<pod_dir>/logs/<name>/<restartCount>.log`. All
of it survives a restart of the runtime, which re-finds running containers from
these files (PID + start time).

The shim is the native build of shim.c when a C compiler is there (compiled once per
source version into the user's cache dir: ~1 ms of CPU per container instead of the
~20 ms an interpreter start costs), else shim.py; CORRAL_CONTAINER_SHIM=python forces
the latter. Both write the same records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from corral.common.files import write_atomic
from corral.common.native import build_cached
from corral.node.procs import start_time
from corral.runtime import shim
from corral.runtime.security import Security

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NATIVE_SHIM_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim.c")

log = logging.getLogger(__name__)
_native_shim: list[str | None] = []  # memo: [path or None]


def native_shim() -> str | None:
    """Path of the compiled shim.c, built on first use; None to use shim.py. Blocking."""
    if _native_shim:
        return _native_shim[0]
    path = None
    if os.environ.get("CORRAL_CONTAINER_SHIM", "native") != "python":
        try:
            path = build_cached(NATIVE_SHIM_SRC, "container-shim")
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("using the Python container shim (slower start): %s", e)
    _native_shim.append(path)
    return path


def shim_argv(spec: dict, spec_path: str) -> list[str]:
    """How to start the shim for `spec` (the dict shim.py reads from `spec_path`)."""
    native = native_shim()
    if native is None:
        return [sys.executable, "-I", "-S", shim.__file__, spec_path]
    argv = [
        native,
        "-p",
        spec["pid_file"],
        "-s",
        spec["status_file"],
        "-n",
        spec["netns"],
        *(["-I", spec["ipcns"]] if spec.get("ipcns") else []),
        "-h",
        spec["hostname"] or "",
        "-w",
        spec["workingDir"] or "",
    ]
    for cg in spec["cgroups"]:
        argv += ["-c", cg]
    if spec.get("security") is not None:
        argv += Security.from_dict(spec["security"]).shim_flags()
    for src, dst in spec["binds"]:
        argv += ["-b", src, dst]
    for src, dst, kind in spec.get("mounts", []):
        argv += [f"-{kind}", src, dst]
    if spec.get("image"):
        argv += ["-i", spec["image"], spec["upper"], spec["work"], spec["rootfs"]]
    for k, v in spec["env"].items():
        argv += ["-e", f"{k}={v}"]
    if spec.get("env_fd") is not None:
        argv += ["-E", str(spec["env_fd"])]
    return [*argv, "--", *spec["argv"]]


class StartError(Exception):
    """The container could not be started (bad command, setup failure)."""


@dataclass
class ContainerRecord:
    """A running container instance: enough to find it again and stop only it."""

    name: str
    instance: int
    shim_pid: int
    shim_started: int
    init_pid: int
    init_started: int
    started_at: float
    log: str

    def alive(self) -> bool:
        return start_time(self.shim_pid) == self.shim_started

    def init_alive(self) -> bool:
        return start_time(self.init_pid) == self.init_started

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.shim_pid, sig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ContainerRecord:
        return cls(**d)


@dataclass
class ExitInfo:
    exit_code: int
    signal: int
    started_at: float
    finished_at: float


def container_dir(pod_dir: str, name: str) -> str:
    return os.path.join(pod_dir, "containers", name)


def log_path(pod_dir: str, name: str, instance: int) -> str:
    return os.path.join(pod_dir, "logs", name, f"{instance}.log")


async def launch(
    pod_dir: str,
    name: str,
    instance: int,
    *,
    argv: list[str],
    env: dict[str, str],
    working_dir: str | None,
    netns: str,
    hostname: str,
    binds: list[tuple[str, str]],
    cgroups: list[str],
    image: str | None = None,
    security: Security | None = None,
    mounts: list[tuple[str, str]] | None = None,
    exec_mounts: list[tuple[str, str]] | None = None,
    volumes: list[tuple[str, str, bool]] | None = None,
    ipcns: str | None = None,
    ready_timeout: float = 30.0,
) -> tuple[ContainerRecord, asyncio.subprocess.Process]:
    """Start one container instance and wait until its PID 1 exists.

    `security` defaults to an ordinary container's (containerd's capabilities, nothing
    of the node's hidden beyond /tmp, /run and /dev); `Security(privileged=True)` runs
    it on the node's own filesystem with every capability, as corral did before.
    `mounts` (node directory, container path) are bound read-only, nosuid, nodev,
    noexec (a system pod's credentials); `exec_mounts` the same but executable
    (corral's installation for its system pods). Sandboxed containers only.
    `volumes` (node path, container path, read-only) are the pod's volume mounts
    (runtime/volumes.py): nosuid, nodev; a file source gets a file mount point.
    """
    if not argv:
        raise StartError("no command: set command (or args) for the container")
    if image is not None and not os.path.isdir(image):
        raise StartError(f"image {image!r} is not a root filesystem directory on this node")
    if (mounts or exec_mounts) and security is not None and security.privileged:
        # Only a sandbox's private /run is a safe place to mount into (never the node's).
        raise StartError("read-only directory mounts are for sandboxed containers only")
    if volumes and security is not None and security.privileged:
        raise StartError(
            "volumeMounts: a privileged container runs on the node's own filesystem and "
            "cannot mount volumes; drop securityContext.privileged"
        )
    cdir = container_dir(pod_dir, name)
    os.makedirs(cdir, mode=0o700, exist_ok=True)
    os.chmod(pod_dir, 0o700)  # specs hold env, logs whatever the container prints
    spec_path, pid_file, status_file = (os.path.join(cdir, n) for n in ("spec", "pid", "status"))
    for p in (pid_file, status_file):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, **env}
    spec = {
        "argv": argv,
        "env": env,
        "workingDir": working_dir,
        "netns": netns,
        "ipcns": ipcns,  # the pod's pinned IPC namespace (None: one of the container's own)
        "hostname": hostname,
        "binds": binds,
        # (source, destination, kind): "m" read-only noexec, "M" read-only (corral's own
        # files for its system pods: runtime/corralfiles.py), "v"/"V" a volume read-write
        # or read-only; all nosuid, nodev (shim.py's clone_mounts)
        "mounts": [(src, dst, "m") for src, dst in mounts or []]
        + [(src, dst, "M") for src, dst in exec_mounts or []]
        + [(src, dst, "V" if ro else "v") for src, dst, ro in volumes or []],
        "cgroups": cgroups,
        "pid_file": pid_file,
        "status_file": status_file,
        "security": (security or Security()).to_dict(),
    }
    if image is not None:
        layer = os.path.join(cdir, "layer")
        # A fresh upper layer per instance, as a restarted container starts from the image.
        shutil.rmtree(layer, ignore_errors=True)
        for d in ("upper", "work", "rootfs"):
            os.makedirs(os.path.join(layer, d))
        spec.update(
            image=os.path.abspath(image),
            upper=os.path.join(layer, "upper"),
            work=os.path.join(layer, "work"),
            rootfs=os.path.join(layer, "rootfs"),
        )
    # The environment (it may hold secrets) goes to the shim through a memfd: never in
    # the spec file on disk, nor in the shim's argv (/proc/PID/cmdline is world-readable).
    env_fd = os.memfd_create("corral-env", 0)
    try:
        data = b"\0".join(f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items())
        view = memoryview(data)
        while view:
            view = view[os.write(env_fd, view) :]
        os.lseek(env_fd, 0, os.SEEK_SET)
        spec["env"], spec["env_fd"] = {}, env_fd
        write_atomic(spec_path, marshal.dumps(spec), 0o600)
        return await _spawn(
            spec, spec_path, pid_file, name, pod_dir, instance, ready_timeout, env_fd
        )
    finally:
        os.close(env_fd)


async def _spawn(
    spec: dict,
    spec_path: str,
    pid_file: str,
    name: str,
    pod_dir: str,
    instance: int,
    ready_timeout: float,
    env_fd: int,
) -> tuple[ContainerRecord, asyncio.subprocess.Process]:
    log = log_path(pod_dir, name, instance)
    os.makedirs(os.path.dirname(log), mode=0o700, exist_ok=True)
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *shim_argv(spec, spec_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
            pass_fds=(env_fd,),
        )
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            with open(pid_file, "rb") as f:
                pids = marshal.load(f)
            break
        except (OSError, ValueError, EOFError):
            pass
        if proc.returncode is not None or time.monotonic() > deadline:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise StartError(
                f"container {name} failed to start (exit {proc.returncode}): "
                f"{tail(log, 3) or 'no output'}"
            )
        await asyncio.sleep(0.005)
    rec = ContainerRecord(
        name=name,
        instance=instance,
        shim_pid=proc.pid,
        shim_started=start_time(proc.pid) or 0,
        init_pid=pids["init"],
        init_started=pids["initStarted"],
        started_at=pids["startedAt"],
        log=log,
    )
    return rec, proc


def exit_info(
    pod_dir: str, name: str, rec: ContainerRecord | None, returncode: int | None = None
) -> ExitInfo:
    """How a container instance ended: the shim's record, else what the wait said."""
    try:
        with open(os.path.join(container_dir(pod_dir, name), "status"), "rb") as f:
            d = marshal.load(f)
        return ExitInfo(
            int(d["exitCode"]),
            int(d.get("signal", 0)),
            float(d["startedAt"]),
            float(d["finishedAt"]),
        )
    except (OSError, ValueError, KeyError, EOFError, TypeError):
        code = returncode if returncode is not None else 137
        sig = -code if code < 0 else 0
        return ExitInfo(
            128 + sig if sig else code, sig, rec.started_at if rec else time.time(), time.time()
        )


async def wait_exit(
    rec: ContainerRecord, proc: asyncio.subprocess.Process | None, poll: float = 0.2
) -> int | None:
    """Wait for the wrapper to end: our child via wait(), an adopted one by polling."""
    if proc is not None:
        return await proc.wait()
    while rec.alive():
        await asyncio.sleep(poll)
    return None


async def stop(rec: ContainerRecord, proc: asyncio.subprocess.Process | None, grace: float) -> None:
    """SIGTERM (forwarded to PID 1), wait up to `grace`, then SIGKILL."""
    rec.signal(signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wait_exit(rec, proc, poll=0.05), timeout=max(grace, 0.0))
    if rec.alive():
        rec.signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait_exit(rec, proc, poll=0.05), timeout=10)
    if rec.init_alive():  # the wrapper died first; PDEATHSIG should have done this
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.init_pid, signal.SIGKILL)


def nsenter_argv(init_pid: int, argv: list[str]) -> list[str]:
    """argv that runs inside a container's namespaces and root, with every privilege."""
    return ["nsenter", "-t", str(init_pid), "-n", "-m", "-u", "-i", "-p", "-r", "-w", "--", *argv]


def exec_argv(pod_dir: str, name: str, init_pid: int, argv: list[str]) -> list[str]:
    """argv that runs inside a container's namespaces, root and cgroups, with the
    container's own capabilities, user and no_new_privs (for exec and exec probes).

    A container whose spec predates `security` gets plain nsenter, as before; one
    without a spec an ordinary container's restrictions. Blocking (reads the spec; may
    build the native shim once)."""
    spec_path = os.path.join(container_dir(pod_dir, name), "spec")
    try:
        with open(spec_path, "rb") as f:
            spec = marshal.load(f)
    except FileNotFoundError:
        spec = {"security": Security().to_dict()}  # shim.py --exec: DEFAULT_SECURITY
    if spec.get("security") is None:
        return nsenter_argv(init_pid, argv)
    native = native_shim()
    if native is None:
        py = [sys.executable, "-I", "-S", shim.__file__]
        return [*py, "--exec", str(init_pid), spec_path, "--", *argv]
    sec = Security.from_dict(spec["security"])
    sec.hidden, sec.read_only_root = [], False  # mount settings: the container has them
    out = [native, "-X", str(init_pid)]
    for cg in spec.get("cgroups", []):
        out += ["-c", cg]
    return [*out, *sec.shim_flags(), "--", *argv]


def tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(data.strip().splitlines()[-lines:])
