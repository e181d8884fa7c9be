"""What `/healthz` and `/readyz` answer: component supervision state and an etcd probe."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    name: str
    ok: bool
    message: str = ""

    def line(self) -> str:
        return f"[+]{self.name} ok" if self.ok else f"[-]{self.name} failed: {self.message}"


@dataclass
class ComponentState:
    """How one supervised component is doing, as the supervisor saw it."""

    name: str
    state: str = "pending"  # pending, starting, running, backoff, done, stopped
    restarts: int = 0
    failures: int = 0  # consecutive failures; cleared once it has run stable_after seconds
    last_error: str = ""
    last_failure: float | None = None  # time.monotonic()
    running_since: float | None = None
    started: bool = False  # start() has returned once

    def failing(self, stable_after: float, now: float | None = None) -> str | None:
        """Why this component is unhealthy, or None.

        Unhealthy: waiting to be restarted after a failure, or restarted but not
        yet stable (running `stable_after` seconds without failing again): the
        kubelet's CrashLoopBackOff, reported through health instead of hidden by it.
        """
        now = time.monotonic() if now is None else now
        if self.state == "backoff":
            return f"failed {self.failures} time(s), restarting: {self.last_error}"
        if (
            self.failures
            and self.state == "running"
            and self.running_since is not None
            and now - self.running_since < stable_after
        ):
            return f"restarted after {self.failures} failure(s), last: {self.last_error}"
        if self.state == "done":
            return "ended unexpectedly"
        return None

    def settle(self, stable_after: float, now: float | None = None) -> None:
        """Forget past failures once the component has run stably."""
        now = time.monotonic() if now is None else now
        if (
            self.failures
            and self.state == "running"
            and self.running_since is not None
            and now - self.running_since >= stable_after
        ):
            self.failures = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "consecutiveFailures": self.failures,
            "lastError": self.last_error,
        }


@dataclass
class EtcdState:
    ok: bool = False
    message: str = "not connected yet"
    last_ok: float | None = None  # time.monotonic() of the last successful probe
    endpoint: str = ""

    def check(self, max_age: float, now: float | None = None) -> Check:
        now = time.monotonic() if now is None else now
        if not self.ok:
            return Check("etcd", False, self.message)
        if self.last_ok is None or now - self.last_ok > max_age:
            age = "never" if self.last_ok is None else f"{now - self.last_ok:.0f}s ago"
            return Check("etcd", False, f"no answer from {self.endpoint} (last answer {age})")
        return Check("etcd", True)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def text(self, verbose: bool, what: str) -> str:
        if self.ok and not verbose:
            return "ok\n"
        lines = [c.line() for c in self.checks]
        lines.append(f"{what} check passed" if self.ok else f"{what} check failed")
        return "\n".join(lines) + "\n"
