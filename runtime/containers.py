"""Container processes: launch through the shim, find them again, stop them by PID.

Each container instance has a directory `<pod_dir>/containers/<name>/` with its
`spec`, `pid` (wrapper and PID 1, written by the shim) and `status` (exit code,
written by the shim when PID 1 exits), all marshal-encoded dicts (see shim.py).
Logs are one file per instance, `<pod_dir>/logs/<name>/<restartCount>.log`. All
of it survives a restart of the runtime, which re-finds running containers from
these files (PID + start time).
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

from corral.cluster.procs import start_time
from corral.runtime import shim

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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


async def launch(pod_dir: str, name: str, instance: int, *, argv: list[str],
                 env: dict[str, str], working_dir: str | None, netns: str, hostname: str,
                 binds: list[tuple[str, str]], cgroups: list[str], image: str | None = None,
                 ready_timeout: float = 30.0) -> tuple[ContainerRecord, asyncio.subprocess.Process]:
    """Start one container instance and wait until its PID 1 exists."""
    if not argv:
        raise StartError("no command: set command (or args) for the container")
    if image is not None and not os.path.isdir(image):
        raise StartError(f"image {image!r} is not a root filesystem directory on this node")
    cdir = container_dir(pod_dir, name)
    os.makedirs(cdir, exist_ok=True)
    spec_path, pid_file, status_file = (os.path.join(cdir, n)
                                        for n in ("spec", "pid", "status"))
    for p in (pid_file, status_file):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, **env}
    spec = {"argv": argv, "env": env, "workingDir": working_dir, "netns": netns,
            "hostname": hostname, "binds": binds, "cgroups": cgroups,
            "pid_file": pid_file, "status_file": status_file}
    if image is not None:
        layer = os.path.join(cdir, "layer")
        # A fresh upper layer per instance, as a restarted container starts from the image.
        shutil.rmtree(layer, ignore_errors=True)
        for d in ("upper", "work", "rootfs"):
            os.makedirs(os.path.join(layer, d))
        spec.update(image=os.path.abspath(image), upper=os.path.join(layer, "upper"),
                    work=os.path.join(layer, "work"), rootfs=os.path.join(layer, "rootfs"))
    with open(spec_path, "wb") as f:
        marshal.dump(spec, f)
    log = log_path(pod_dir, name, instance)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", shim.__file__, spec_path,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, close_fds=True)
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
            raise StartError(f"container {name} failed to start (exit {proc.returncode}): "
                             f"{tail(log, 3) or 'no output'}")
        await asyncio.sleep(0.005)
    rec = ContainerRecord(name=name, instance=instance, shim_pid=proc.pid,
                          shim_started=start_time(proc.pid) or 0, init_pid=pids["init"],
                          init_started=pids["initStarted"], started_at=pids["startedAt"], log=log)
    return rec, proc


def exit_info(pod_dir: str, name: str, rec: ContainerRecord | None,
              returncode: int | None = None) -> ExitInfo:
    """How a container instance ended: the shim's record, else what the wait said."""
    try:
        with open(os.path.join(container_dir(pod_dir, name), "status"), "rb") as f:
            d = marshal.load(f)
        return ExitInfo(int(d["exitCode"]), int(d.get("signal", 0)), float(d["startedAt"]),
                        float(d["finishedAt"]))
    except (OSError, ValueError, KeyError, EOFError, TypeError):
        code = returncode if returncode is not None else 137
        sig = -code if code < 0 else 0
        return ExitInfo(128 + sig if sig else code, sig,
                        rec.started_at if rec else time.time(), time.time())


async def wait_exit(rec: ContainerRecord, proc: asyncio.subprocess.Process | None,
                    poll: float = 0.2) -> int | None:
    """Wait for the wrapper to end: our child via wait(), an adopted one by polling."""
    if proc is not None:
        return await proc.wait()
    while rec.alive():
        await asyncio.sleep(poll)
    return None


async def stop(rec: ContainerRecord, proc: asyncio.subprocess.Process | None,
               grace: float) -> None:
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
    """argv that runs inside a container's namespaces and root (for exec and exec probes)."""
    return ["nsenter", "-t", str(init_pid), "-n", "-m", "-u", "-i", "-p", "-r", "-w",
            "--", *argv]


def tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(data.strip().splitlines()[-lines:])
