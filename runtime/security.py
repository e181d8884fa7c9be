"""What a container may do: its capabilities, user, no_new_privs and filesystem view.

`for_container(pod, container, paths)` turns the Kubernetes securityContext (the
container's own fields over the pod's) into the `Security` record the shim applies
(runtime/shim.c, runtime/shim.py). The defaults are containerd's: the 14
capabilities below in the effective, permitted, inheritable and bounding sets,
no_new_privs, supplementary groups cleared, a seccomp filter (RuntimeDefault), and
a mount namespace in which the node's own state is hidden and the node's files are
read-only (docs/runtime.md, "Sandboxes").
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from corral.api.objects import CAPABILITIES, Container, Pod
from corral.node.context import NodePaths

if TYPE_CHECKING:
    from corral.api.store import TLSFiles

# containerd's default set (pkg/oci/spec.go, defaultUnixCaps); no SYS_ADMIN, no NET_ADMIN.
DEFAULT_CAPS: tuple[str, ...] = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
)
ALL_CAPS_MASK = (1 << len(CAPABILITIES)) - 1

# Host paths a container never sees besides the node's own (NodePaths): corral's default
# state root, pinned BPF objects and the node's users' homes. /run, /tmp and /var/tmp
# get private tmpfs mounts.
ALWAYS_HIDDEN = (os.path.dirname(NodePaths().state_dir), "/sys/fs/bpf", "/root", "/home")
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/run")


class SecurityError(ValueError):
    """The securityContext cannot be honoured (e.g. runAsNonRoot without a user)."""


def cap_mask(names: list[str] | tuple[str, ...]) -> int:
    """Bit mask of capability names (bare, as the object model normalises them)."""
    mask = 0
    for n in names:
        mask |= ALL_CAPS_MASK if n == "ALL" else 1 << CAPABILITIES.index(n)
    return mask


def cap_names(mask: int) -> list[str]:
    return [n for i, n in enumerate(CAPABILITIES) if mask >> i & 1]


@dataclass
class Security:
    """What the shim applies to one container (and to every `exec` into it)."""

    privileged: bool = False
    caps: int = field(default_factory=lambda: cap_mask(DEFAULT_CAPS))
    uid: int | None = None
    gid: int | None = None
    no_new_privs: bool = True
    read_only_root: bool = False
    hidden: list[str] = field(default_factory=list)  # host paths covered by empty tmpfs
    seccomp: bool = True  # corral's RuntimeDefault filter (shim.py, SECCOMP_*)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Security:
        return cls(**d)

    def shim_flags(self) -> list[str]:
        """The native shim's flags for these settings (shim.c: -P -C -u -g -N -R -H)."""
        out = ["-P"] if self.privileged else ["-C", f"{self.caps:x}"]
        if self.uid is not None:
            out += ["-u", str(self.uid)]
        if self.gid is not None:
            out += ["-g", str(self.gid)]
        if self.no_new_privs:
            out.append("-N")
        if self.read_only_root:
            out.append("-R")
        if self.seccomp and not self.privileged:
            out.append("-F")
        for p in self.hidden:
            out += ["-H", p]
        return out


def hidden_paths(paths: NodePaths, tls: TLSFiles | None = None) -> list[str]:
    """Absolute host paths to hide, outermost only (a path inside another is covered).

    `tls`: the node's etcd client certificate, key and CA, wherever they live (the
    files themselves: their directory may be /etc)."""
    cands = {os.path.abspath(p) for p in ALWAYS_HIDDEN}
    if tls is not None:
        cands |= {os.path.abspath(f) for f in (tls.ca, tls.cert, tls.key) if f}
    d = NodePaths()
    for p in (paths, d):
        cands |= {
            os.path.abspath(x)
            for x in (
                p.run_dir,
                p.cni_conf_dir,
                p.cni_bin_dir,
                p.cni_cache_dir,
                p.netns_dir,
                p.state_dir,
                p.credentials_dir,
            )
        }
    root = os.environ.get("CORRAL_STATE_DIR")  # the local cluster's state root (corral up)
    if root:
        cands.add(os.path.abspath(root))
    cands.discard("/")
    out: list[str] = []
    for p in sorted(cands):
        if not any(p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def for_container(pod: Pod, c: Container, hidden: list[str]) -> Security:
    """The container's Security: its securityContext over the pod's, over the defaults."""
    psc, sc = pod.spec.security_context, c.security_context

    def pick(attr: str) -> object:
        v = getattr(sc, attr, None) if sc is not None else None
        return v if v is not None else (getattr(psc, attr, None) if psc is not None else None)

    uid, gid, non_root = pick("run_as_user"), pick("run_as_group"), pick("run_as_non_root")
    profile = pick("seccomp_profile")
    seccomp = profile is None or getattr(profile, "type", "") == "RuntimeDefault"
    assert uid is None or isinstance(uid, int)
    assert gid is None or isinstance(gid, int)
    if non_root and not uid:
        raise SecurityError(
            f"container {c.name} has runAsNonRoot and would run as root: "
            "set securityContext.runAsUser to a non-zero user ID"
        )
    if gid is None and uid is not None:
        gid = 0  # no image /etc/passwd to look the group up in: root's group, as runc does
    privileged = bool(sc is not None and sc.privileged)
    if privileged:
        return Security(
            privileged=True, caps=ALL_CAPS_MASK, uid=uid, gid=gid, no_new_privs=False, seccomp=False
        )
    caps = cap_mask(DEFAULT_CAPS)
    if pod.spec.host_network:
        # In the node's network namespace NET_RAW would sniff and forge frames on the
        # node's own links, past the pod guard: only a container that adds it gets it.
        caps &= ~cap_mask(["NET_RAW"])
    if sc is not None and sc.capabilities is not None:
        if "ALL" in sc.capabilities.drop:
            caps = 0
        else:
            caps &= ~cap_mask(sc.capabilities.drop)
        caps |= cap_mask(sc.capabilities.add)
    # Kubernetes: no_new_privs unless escalation is allowed explicitly or by CAP_SYS_ADMIN.
    escalate = sc is not None and sc.allow_privilege_escalation is True
    nnp = not (escalate or caps >> CAPABILITIES.index("SYS_ADMIN") & 1)
    return Security(
        caps=caps,
        uid=uid,
        gid=gid,
        no_new_privs=nnp,
        read_only_root=bool(sc is not None and sc.read_only_root_filesystem),
        hidden=[] if c.image else list(hidden),
        seccomp=seccomp,
    )
