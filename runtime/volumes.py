"""A pod's volumes on the node, as the kubelet's volume manager lays them out.

Each volume is a directory `<pod_dir>/volumes/<plugin>/<name>` that the containers
mount (runtime/containers.py: read-write or read-only, a subPath as a file or
directory inside it):

- emptyDir: a directory on the node's disk, or with `medium: Memory` a tmpfs
  (capped at `sizeLimit`);
- configMap, downwardAPI: files on the node's disk;
- secret, projected: files on a tmpfs of their own, so a secret's plaintext is never
  written to the node's disk (the kubelet's rule); the tmpfs goes with the pod;
- hostPath: the node's path itself, after the `type` check.

configMap, secret, downwardAPI and projected contents are written the kubelet's
way (pkg/volume/util/atomic_writer.go): the files go to a fresh `..<timestamp>`
directory, the `..data` symlink is swapped to it with one rename, and each
top-level name is a symlink through `..data`. A container that reads the volume
sees the old or the new contents, never a mix; refresh() rewrites them when the
ConfigMap, Secret or pod fields change (a subPath mount keeps the file it got,
as in Kubernetes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable

from corral.api.objects import (
    ConfigMap,
    Container,
    DownwardAPIVolumeFile,
    KeyToPath,
    Pod,
    Secret,
    Volume,
)
from corral.api.quantity import memory_bytes
from corral.node import mounts
from corral.runtime.downward import PodFacts, field_value, resource_value

log = logging.getLogger(__name__)

PLUGINS = {
    "emptyDir": "kubernetes.io~empty-dir",
    "configMap": "kubernetes.io~configmap",
    "secret": "kubernetes.io~secret",
    "downwardAPI": "kubernetes.io~downward-api",
    "projected": "kubernetes.io~projected",
}
DEFAULT_MODE = 0o644
DATA = "..data"

# (namespace, name) -> the object or None
Lookup = Callable[[str, str], ConfigMap | Secret | None]


class VolumeError(Exception):
    """A volume cannot be set up (yet): a missing ConfigMap or Secret, a hostPath of the
    wrong type. The message is the kubelet's FailedMount wording."""


Payload = dict[str, tuple[bytes, int]]  # relative path -> (contents, mode)


def _keys(
    what: str,
    ns: str,
    name: str,
    obj: ConfigMap | Secret | None,
    items: list[KeyToPath],
    optional: bool | None,
    mode: int,
) -> Payload:
    if obj is None:
        if optional:
            return {}
        raise VolumeError(f'{what.lower()} "{name}" not found')
    data = obj.items()
    if not items:
        return {k: (v, mode) for k, v in data.items()}
    out: Payload = {}
    for it in items:
        if it.key not in data:
            if optional:
                continue
            raise VolumeError(
                f"configmap references non-existent config key: {it.key}"
                if what == "ConfigMap"
                else f"references non-existent secret key: {it.key}"
            )
        out[it.path] = (data[it.key], it.mode if it.mode is not None else mode)
    return out


def _downward(facts: PodFacts, files: list[DownwardAPIVolumeFile], mode: int) -> Payload:
    out: Payload = {}
    containers = {c.name: c for c in (*facts.pod.spec.containers, *facts.pod.spec.init_containers)}
    for f in files:
        if f.field_ref is not None:
            value = field_value(facts, f.field_ref.field_path)
        else:
            ref = f.resource_field_ref
            assert ref is not None and ref.container_name
            value = resource_value(containers[ref.container_name], ref.resource, ref.divisor)
        out[f.path] = (value.encode(), f.mode if f.mode is not None else mode)
    return out


def payload(vol: Volume, facts: PodFacts, config_maps: Lookup, secrets: Lookup) -> Payload:
    """The files a configMap, secret, downwardAPI or projected volume holds now."""
    ns = facts.pod.namespace or "default"
    if vol.config_map is not None:
        s = vol.config_map
        mode = s.default_mode if s.default_mode is not None else DEFAULT_MODE
        return _keys("ConfigMap", ns, s.name, config_maps(ns, s.name), s.items, s.optional, mode)
    if vol.secret is not None:
        t = vol.secret
        mode = t.default_mode if t.default_mode is not None else DEFAULT_MODE
        return _keys(
            "Secret", ns, t.secret_name, secrets(ns, t.secret_name), t.items, t.optional, mode
        )
    if vol.downward_api is not None:
        d = vol.downward_api
        return _downward(
            facts, d.items, d.default_mode if d.default_mode is not None else DEFAULT_MODE
        )
    assert vol.projected is not None
    mode = vol.projected.default_mode if vol.projected.default_mode is not None else DEFAULT_MODE
    out: Payload = {}
    for src in vol.projected.sources:
        if src.config_map is not None:
            c = src.config_map
            out.update(
                _keys("ConfigMap", ns, c.name, config_maps(ns, c.name), c.items, c.optional, mode)
            )
        elif src.secret is not None:
            t2 = src.secret
            out.update(
                _keys("Secret", ns, t2.name, secrets(ns, t2.name), t2.items, t2.optional, mode)
            )
        elif src.downward_api is not None:
            out.update(_downward(facts, src.downward_api.items, mode))
        else:
            raise VolumeError(
                "projected serviceAccountToken and clusterTrustBundle sources are not served "
                "by corral (it issues no service-account tokens); use a secret"
            )
    return out


def references(pod: Pod) -> set[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret the pod's volumes and env use."""
    out: set[tuple[str, str]] = set()
    for v in pod.spec.volumes:
        if v.config_map is not None:
            out.add(("ConfigMap", v.config_map.name))
        if v.secret is not None:
            out.add(("Secret", v.secret.secret_name))
        for src in v.projected.sources if v.projected is not None else []:
            if src.config_map is not None:
                out.add(("ConfigMap", src.config_map.name))
            if src.secret is not None:
                out.add(("Secret", src.secret.name))
    for c in (*pod.spec.containers, *pod.spec.init_containers):
        for e in c.env_from:
            if e.config_map_ref is not None:
                out.add(("ConfigMap", e.config_map_ref.name))
            if e.secret_ref is not None:
                out.add(("Secret", e.secret_ref.name))
        for ev in c.env:
            vf = ev.value_from
            if vf is not None and vf.config_map_key_ref is not None:
                out.add(("ConfigMap", vf.config_map_key_ref.name))
            if vf is not None and vf.secret_key_ref is not None:
                out.add(("Secret", vf.secret_key_ref.name))
    return out


# ------------------------------------------------------------ the atomic writer


def _current(target: str) -> Payload | None:
    """What the volume's ..data holds now (None if nothing was written yet)."""
    data = os.path.join(target, DATA)
    if not os.path.islink(data):
        return None
    out: Payload = {}
    root = os.path.join(target, os.readlink(data))
    for dirpath, _, files in os.walk(root):
        for fn in files:
            p = os.path.join(dirpath, fn)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = (f.read(), stat.S_IMODE(os.stat(p).st_mode))
    return out


def write_atomic(target: str, files: Payload) -> bool:
    """Make `target` hold exactly `files` with one symlink swap; False if it already did."""
    if _current(target) == files:
        return False
    ts = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{time.time_ns() % 10**9:09d}"
    new = os.path.join(target, ts)
    os.mkdir(new, 0o755)
    for rel, (data, mode) in files.items():
        p = os.path.join(new, rel)
        os.makedirs(os.path.dirname(p), mode=0o755, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
    data_link = os.path.join(target, DATA)
    old = os.readlink(data_link) if os.path.islink(data_link) else None
    tmp = os.path.join(target, "..data_tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(ts, tmp)
    os.rename(tmp, data_link)  # the swap: readers see the old or the new set
    tops = {rel.split("/", 1)[0] for rel in files}
    for top in tops:
        link = os.path.join(target, top)
        if not os.path.islink(link):
            os.symlink(os.path.join(DATA, top), link)
    for name in os.listdir(target):
        if not name.startswith("..") and name not in tops:
            os.unlink(os.path.join(target, name))
    if old and old != ts:
        shutil.rmtree(os.path.join(target, old), ignore_errors=True)
    return True


# ------------------------------------------------------------ a pod's volumes


def _host_path(vol: Volume) -> str:
    """Check (and for *OrCreate make) a hostPath volume's path; VolumeError otherwise."""
    hp = vol.host_path
    assert hp is not None
    path, t = hp.path, hp.type
    if t == "DirectoryOrCreate" and not os.path.exists(path):
        os.makedirs(path, mode=0o755, exist_ok=True)
    elif t == "FileOrCreate" and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    if not t:
        return path
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise VolumeError(f"hostPath type check failed: {path} does not exist") from None
    want = {
        "Directory": stat.S_ISDIR,
        "DirectoryOrCreate": stat.S_ISDIR,
        "File": stat.S_ISREG,
        "FileOrCreate": stat.S_ISREG,
        "Socket": stat.S_ISSOCK,
        "CharDevice": stat.S_ISCHR,
        "BlockDevice": stat.S_ISBLK,
    }[t]
    if not want(mode):
        raise VolumeError(
            f"hostPath type check failed: {path} is not a {t.removesuffix('OrCreate')}"
        )
    return path


# Kubernetes' Pod Security admission label: only a namespace enforcing "privileged"
# admits hostPath volumes (the baseline and restricted levels forbid them).
POD_SECURITY_LABEL = "pod-security.kubernetes.io/enforce"


def host_path_refusal(pod: Pod, namespace_labels: dict[str, str], hidden: list[str]) -> str | None:
    """Why the pod may not have its hostPath volumes (None: it may). A pod is not
    trusted: hostPath needs a namespace labelled privileged, and never reaches the
    node's own state (security.hidden_paths: corral's state, etcd credentials, homes)."""
    hp = [v for v in pod.spec.volumes if v.host_path is not None]
    if not hp:
        return None
    if namespace_labels.get(POD_SECURITY_LABEL) != "privileged":
        names = ", ".join(f'"{v.name}"' for v in hp)
        return (
            f'violates PodSecurity "baseline:latest": hostPath volumes ({names}); label the '
            f"namespace {POD_SECURITY_LABEL}=privileged to allow them"
        )
    for v in hp:
        assert v.host_path is not None
        real = os.path.realpath(v.host_path.path).rstrip("/")
        for h in hidden:
            if real == h or h.startswith(real + "/") or real.startswith(h + "/"):
                return (
                    f'hostPath volume "{v.name}": {v.host_path.path} is or holds the node\'s '
                    f"own state ({h}), which no pod may mount"
                )
    return None


class PodVolumes:
    """The volumes of one pod under `pod_dir`."""

    def __init__(self, pod_dir: str, pod: Pod) -> None:
        self.dir = os.path.join(pod_dir, "volumes")
        self.pod = pod

    def path(self, vol: Volume) -> str:
        if vol.host_path is not None:
            return vol.host_path.path
        return os.path.join(self.dir, PLUGINS[vol.kind], vol.name)

    def setup(self, facts: PodFacts, config_maps: Lookup, secrets: Lookup) -> None:
        """Make every volume (idempotent: an adopted pod's are found again)."""
        for vol in self.pod.spec.volumes:
            try:
                self._setup_one(vol, facts, config_maps, secrets)
            except VolumeError as e:
                raise VolumeError(
                    f'MountVolume.SetUp failed for volume "{vol.name}" : {e}'
                ) from None

    def _setup_one(
        self, vol: Volume, facts: PodFacts, config_maps: Lookup, secrets: Lookup
    ) -> None:
        if vol.host_path is not None:
            _host_path(vol)
            return
        target = self.path(vol)
        os.makedirs(target, mode=0o755, exist_ok=True)
        memory = vol.secret is not None or vol.projected is not None
        size = None
        if vol.empty_dir is not None:
            memory = vol.empty_dir.medium == "Memory"
            if memory and vol.empty_dir.size_limit is not None:
                size = memory_bytes(vol.empty_dir.size_limit)
        if memory and not mounts.is_mount(target):
            # mode 0755 like the kubelet's; an emptyDir is the pod's to write: 0777
            mounts.mount_tmpfs(target, size, 0o777 if vol.empty_dir is not None else 0o755)
        if vol.empty_dir is not None:
            os.chmod(target, 0o777)
            return
        write_atomic(target, payload(vol, facts, config_maps, secrets))

    def refresh(self, facts: PodFacts, config_maps: Lookup, secrets: Lookup) -> list[str]:
        """Rewrite what changed; the names of the volumes rewritten. A volume whose
        source went missing keeps its last contents (the kubelet's behaviour)."""
        out = []
        for vol in self.pod.spec.volumes:
            if vol.kind not in ("configMap", "secret", "downwardAPI", "projected"):
                continue
            target = self.path(vol)
            if not os.path.isdir(target):
                continue
            try:
                if write_atomic(target, payload(vol, facts, config_maps, secrets)):
                    out.append(vol.name)
            except VolumeError as e:
                log.info(
                    "pod %s/%s: volume %s not refreshed: %s",
                    self.pod.namespace,
                    self.pod.name,
                    vol.name,
                    e,
                )
        return out

    def mounts(self, c: Container) -> list[tuple[str, str, bool]]:
        """(node path, container path, read-only) for each of `c`'s volumeMounts. A
        subPath must stay inside its volume (a symlink out of it is refused)."""
        by_name = {v.name: v for v in self.pod.spec.volumes}
        out = []
        for m in c.volume_mounts:
            vol = by_name[m.name]
            src = self.path(vol)
            ro = bool(m.read_only)
            if vol.kind in ("configMap", "secret", "downwardAPI", "projected"):
                ro = True  # as the kubelet mounts them
            if m.sub_path:
                base = os.path.realpath(src)
                sub = os.path.join(src, m.sub_path)
                if not os.path.lexists(sub) and vol.kind in ("emptyDir", "hostPath"):
                    os.makedirs(sub, mode=0o755, exist_ok=True)  # as the kubelet does
                real = os.path.realpath(sub)
                if real != base and not real.startswith(base + "/"):
                    raise VolumeError(
                        f"volumeMounts[{m.name}].subPath {m.sub_path!r}: leaves the volume "
                        "(a symlink out of it)"
                    )
                if not os.path.exists(real):
                    raise VolumeError(
                        f"volumeMounts[{m.name}].subPath {m.sub_path!r}: not in the volume"
                    )
                src = real
            out.append((src, m.mount_path, ro))
        return out

    def teardown(self) -> None:
        """Unmount the tmpfs volumes and remove every volume directory (not hostPaths)."""
        mounts.unmount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
