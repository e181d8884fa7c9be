"""What the runtime remembers about each pod on disk, so a restarted runtime adopts
its pods instead of killing them: `<state_dir>/pods/<uid>/state.json`.

`pods/` and each pod's directory are 0700, state.json 0600: what is in there (env in
the container specs, logs) is the pod owner's, not every local user's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.common.files import write_atomic
from corral.node import mounts


@dataclass
class ContainerSaved:
    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    last_state: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    oom_seen: int = 0
    started: bool = False
    ready: bool = False
    done: bool = False


@dataclass
class PodSaved:
    uid: str
    namespace: str
    name: str
    sandbox_id: str = ""
    netns: str = ""
    network: str = ""
    ifname: str = "eth0"
    pod_ip: str | None = None
    start_time: str | None = None
    network_down: bool = False
    containers: dict[str, ContainerSaved] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        """to_dict() as JSON, without asdict's deep copy: saved on every status change."""
        return json.dumps(
            {**vars(self), "containers": {k: vars(c) for k, c in self.containers.items()}}
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PodSaved:
        d = dict(d)
        d["containers"] = {k: ContainerSaved(**v) for k, v in d.get("containers", {}).items()}
        return cls(**d)


def pods_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "pods")


def pod_dir(state_dir: str, uid: str) -> str:
    return os.path.join(pods_dir(state_dir), uid)


def ensure_dir(state_dir: str, uid: str) -> str:
    """The pod's directory, made 0700 (as `pods/`) when missing: it holds env and logs."""
    d = pod_dir(state_dir, uid)
    if not os.path.isdir(d):
        os.makedirs(pods_dir(state_dir), mode=0o700, exist_ok=True)
        os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def save(state_dir: str, s: PodSaved) -> None:
    d = ensure_dir(state_dir, s.uid)
    write_atomic(os.path.join(d, "state.json"), s.dumps(), 0o600)


def load_all(state_dir: str) -> dict[str, PodSaved]:
    out: dict[str, PodSaved] = {}
    base = pods_dir(state_dir)
    with contextlib.suppress(FileNotFoundError):
        os.chmod(base, 0o700)  # pod dirs hold env and logs: the node's root only
        for uid in os.listdir(base):
            try:
                with open(os.path.join(base, uid, "state.json")) as f:
                    out[uid] = PodSaved.from_dict(json.load(f))
            except (OSError, ValueError, TypeError):
                continue
    return out


def forget(state_dir: str, uid: str) -> None:
    # A pod's tmpfs volumes (secrets) are unmounted first: rmtree stops at nothing.
    mounts.unmount_under(pod_dir(state_dir, uid))
    shutil.rmtree(pod_dir(state_dir, uid), ignore_errors=True)
