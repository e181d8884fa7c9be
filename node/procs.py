"""Processes corral starts, recorded so they can be stopped by PID safely.

A PID alone can be reused by an unrelated process after a crash, so every
record also keeps the process start time (field 22 of /proc/PID/stat); a
process is only signalled when both still match.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass


def start_time(pid: int) -> int | None:
    """Kernel start time of `pid` in clock ticks, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    rest = data[data.rindex(b")") + 2 :].split()
    if rest[0] == b"Z":  # a zombie has finished; only its parent's wait is pending
        return None
    return int(rest[19])


@dataclass
class ProcRecord:
    """A process corral started: enough to find it again and stop only it."""

    pid: int
    started: int
    role: str
    node: str | None = None
    log: str | None = None

    @classmethod
    def of(cls, pid: int, role: str, node: str | None = None, log: str | None = None) -> ProcRecord:
        st = start_time(pid)
        if st is None:
            raise ProcessLookupError(f"{role}: process {pid} exited right after it started")
        return cls(pid=pid, started=st, role=role, node=node, log=log)

    def alive(self) -> bool:
        return start_time(self.pid) == self.started

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProcRecord:
        return cls(**d)


def spawn(argv: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a detached background process (own session, no stdin) logging to `log`."""
    with open(log, "ab") as logf:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def stop(rec: ProcRecord, grace: float = 5.0) -> bool:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. True if it was running."""
    if not rec.alive():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(rec.pid)
        if not rec.alive():
            return True
        time.sleep(0.02)
    if rec.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
        for _ in range(250):
            _reap(rec.pid)
            if not rec.alive():
                break
            time.sleep(0.02)
    return True


def _reap(pid: int) -> None:
    """Collect `pid` if it is our child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
