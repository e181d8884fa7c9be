"""The local cluster's state file: everything `corral up` made, written before it is made.

`corral down` trusts this file first and falls back on names derived from the
cluster name when the file is missing or half-written, so a crash at any point
leaves nothing it cannot find.

Layout under the state dir (default /var/lib/corral/<name>, root overridable
with $CORRAL_STATE_DIR):

    state.json            this record
    pki/                  the local etcd's CA and certificates (cluster/pki.py)
    pod-credentials/      the nodes' --pod-credentials-dir (etcd-dns/: the DNS pods' certificate)
    etcd/, etcd-<i>/      the local etcd's data, per member
    logs/                 etcd.log, holder-<node>.log, <daemon>-<node>.log
    nodes/<node>/         run/, cni-conf/, cni-bin/, cni-cache/, netns/:
                          bind-mounted over the node's /run/corral, /etc/cni/net.d,
                          /opt/cni/bin, /var/lib/cni and /run/netns
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from corral.api.store import TLSFiles
from corral.cluster import pki
from corral.common.files import write_atomic
from corral.node.procs import ProcRecord

DEFAULT_NAME = "corral"
DEFAULT_ROOT = "/var/lib/corral"
STATE_FILE = "state.json"
# The host's veth is "<name>-ul": Linux interface names are at most 15 characters.
MAX_NAME = 12
_NAME_RE = re.compile(r"^[a-z]([a-z0-9-]*[a-z0-9])?$")


def check_name(name: str) -> None:
    """ValueError naming the rule a cluster name breaks."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"cluster name {name!r} is not valid: use lower-case letters, digits and '-', "
            "starting with a letter and ending with a letter or digit (e.g. 'dev')"
        )
    if len(name) > MAX_NAME:
        raise ValueError(
            f"cluster name {name!r} is too long ({len(name)} characters): at most {MAX_NAME}, "
            f"because the host's interface into the cluster is named '<name>-ul' and Linux "
            "interface names are at most 15 characters"
        )


def state_root() -> str:
    return os.environ.get("CORRAL_STATE_DIR") or DEFAULT_ROOT


def default_state_dir(name: str) -> str:
    return os.path.join(state_root(), name)


# ------------------------------------------------------------------ naming


def underlay_netns(name: str) -> str:
    return f"{name}-underlay"


def node_netns(name: str, index: int) -> str:
    return f"{name}-node-{index}"


def node_name(name: str, index: int) -> str:
    """`node-<i>` in the default cluster; `<name>-node-<i>` elsewhere, so two
    clusters sharing one etcd never register the same Node."""
    return f"node-{index}" if name == DEFAULT_NAME else f"{name}-node-{index}"


def host_veth(name: str) -> str:
    return f"{name}-ul"


# ------------------------------------------------------------------ records


@dataclass
class NodeState:
    name: str
    index: int
    netns: str
    ip: str
    holder: ProcRecord | None = None
    mnt_ns: int | None = None  # inode of the holder's mount namespace

    def to_dict(self) -> dict:
        d = asdict(self)
        d["holder"] = self.holder.to_dict() if self.holder else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NodeState:
        d = dict(d)
        h = d.pop("holder", None)
        return cls(**d, holder=ProcRecord.from_dict(h) if h else None)


@dataclass
class EtcdMember:
    """One member of the local etcd: its ports stay the same for the cluster's life, so
    daemons never have to learn a new URL."""

    name: str
    index: int
    client_port: int
    peer_port: int
    record: ProcRecord | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["record"] = self.record.to_dict() if self.record else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EtcdMember:
        d = dict(d)
        r = d.pop("record", None)
        return cls(**d, record=ProcRecord.from_dict(r) if r else None)


@dataclass
class ClusterState:
    name: str
    state_dir: str
    underlay_cidr: str
    host_ip: str
    prefixlen: int
    etcd_external: bool = False
    etcd_urls: list[str] = field(default_factory=list)  # for the host's CLI
    etcd_node_urls: list[str] = field(default_factory=list)  # as seen from inside a node
    # The local etcd's members (one unless `corral up --etcd-members 3`).
    etcd_members: list[EtcdMember] = field(default_factory=list)
    relay: ProcRecord | None = None
    nodes: list[NodeState] = field(default_factory=list)
    daemons: list[ProcRecord] = field(default_factory=list)
    # An external etcd's client certificate ({"ca", "cert", "key"}), used by every role.
    etcd_tls: dict[str, str] | None = None
    # The local etcd's auth is on (`corral up --etcd-auth`): the dns role only reads.
    etcd_auth: bool = False
    # Cluster DNS replicas as last asked for (`corral up --dns-replicas`; None: the default).
    dns_replicas: int | None = None
    # API servers, on nodes 1..N behind the `kubernetes` Service (`corral up --apiservers`).
    apiservers: int = 1
    # How pods start corral (the cluster DNS's command): `corral up`'s own interpreter.
    corral_argv: list[str] = field(default_factory=list)

    @property
    def pki_dir(self) -> str:
        """The local etcd's CA and certificates (see cluster/pki.py)."""
        return os.path.join(self.state_dir, "pki")

    def tls(self, role: str) -> TLSFiles | None:
        """The client certificate a `role` (node, control, cli) reaches etcd with."""
        if self.etcd_external:
            return TLSFiles(**self.etcd_tls) if self.etcd_tls else None
        if not any(u.startswith("https://") for u in self.etcd_urls):
            return None
        p = pki.Paths(self.pki_dir)
        return TLSFiles(p.ca, p.cert(role), p.key(role))

    # derived names
    @property
    def underlay_netns(self) -> str:
        return underlay_netns(self.name)

    @property
    def host_veth(self) -> str:
        return host_veth(self.name)

    @property
    def path(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)

    @property
    def etcd_dir(self) -> str:
        return os.path.join(self.state_dir, "etcd")

    def member_dir(self, m: EtcdMember) -> str:
        return self.etcd_dir if m.index == 1 else f"{self.etcd_dir}-{m.index}"

    @property
    def etcd_records(self) -> list[ProcRecord]:
        """The local etcd's processes (those started and recorded)."""
        return [m.record for m in self.etcd_members if m.record is not None]

    @property
    def pod_credentials_dir(self) -> str:
        """The nodes' `--pod-credentials-dir`: credential sets for system pods."""
        return os.path.join(self.state_dir, "pod-credentials")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    def node_dir(self, node: str) -> str:
        return os.path.join(self.state_dir, "nodes", node)

    def node(self, name: str) -> NodeState | None:
        return next((n for n in self.nodes if n.name == name), None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["etcd_members"] = [m.to_dict() for m in self.etcd_members]
        d["relay"] = self.relay.to_dict() if self.relay else None
        d["nodes"] = [n.to_dict() for n in self.nodes]
        d["daemons"] = [r.to_dict() for r in self.daemons]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClusterState:
        d = dict(d)
        relay = d.pop("relay", None)
        members = [EtcdMember.from_dict(m) for m in d.pop("etcd_members", [])]
        # State written before members existed: its one etcd becomes member 1.
        etcd, port, peer = d.pop("etcd", None), d.pop("etcd_port", 0), d.pop("etcd_peer_port", 0)
        if not members and port:
            rec = ProcRecord.from_dict(etcd) if etcd else None
            members = [EtcdMember(f"{d['name']}-etcd", 1, port, peer, rec)]
        nodes = [NodeState.from_dict(n) for n in d.pop("nodes", [])]
        daemons = [ProcRecord.from_dict(r) for r in d.pop("daemons", [])]
        return cls(
            **d,
            etcd_members=members,
            relay=ProcRecord.from_dict(relay) if relay else None,
            nodes=nodes,
            daemons=daemons,
        )

    def save(self) -> None:
        """Atomic write: a crash leaves the old file or the new one, never half of one.

        The state dir is 0700 and the file 0600: it names every process, port and
        certificate of the cluster, which nobody but its owner needs to see.
        """
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        write_atomic(self.path, json.dumps(self.to_dict(), indent=2), 0o600, fsync=True)


def load(state_dir: str) -> ClusterState | None:
    """The recorded state, or None when there is none or it cannot be read."""
    try:
        with open(os.path.join(state_dir, STATE_FILE)) as f:
            return ClusterState.from_dict(json.load(f))
    except (OSError, ValueError, TypeError, KeyError):
        return None


@contextlib.contextmanager
def locked(state_dir: str) -> Iterator[None]:
    """One `corral up`/`down` at a time per cluster (the lock file lives beside the dir)."""
    parent = os.path.dirname(os.path.abspath(state_dir)) or "/"
    os.makedirs(parent, exist_ok=True)
    lock = os.path.join(parent, f".{os.path.basename(os.path.abspath(state_dir))}.lock")
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another `corral up` or `corral down` is working on {state_dir}; "
                "wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
