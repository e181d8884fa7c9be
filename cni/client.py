"""A CNI client that behaves like libcni: what the runtime uses to attach pods.

- `load_conflist(dir)`: the first `.conf`/`.conflist`/`.json` file in name order
  (as kubelet/containerd pick it); a single-plugin `.conf` is lifted to a list.
- `CNIClient.add/check/delete`: run the chain's plugins found on CNI_PATH, ADD in
  order with each result passed on as the next plugin's `prevResult`, DEL in
  reverse with the cached ADD result, CHECK in order with it. Results are cached
  in libcni's format (see cni/cache.py) so any libcni-based tool can DEL them.
- `CNIClient.gc(keep)`: DEL every cached attachment whose container is unknown.

Plugins run with the caller's network namespace as the host side; give
`exec_prefix` (e.g. `nsenter --net=<node>`) to run them somewhere else.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.cni.cache import CachedAttachment, ResultCache

log = logging.getLogger(__name__)

CONF_EXTENSIONS = (".conf", ".conflist", ".json")
_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


class CNIError(Exception):
    """A plugin failed (the spec's error object) or the client could not run it."""

    def __init__(self, msg: str, code: int = 999, details: str = "", plugin: str = "") -> None:
        self.code, self.msg, self.details, self.plugin = code, msg, details, plugin
        text = f"{plugin}: {msg}" if plugin else msg
        if details:
            text += f" ({details})"
        super().__init__(text)


@dataclass
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    raw: bytes
    disable_check: bool = False
    source: str = ""

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "") -> NetworkConfigList:
        where = source or "network configuration"
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise CNIError(f"{where} is not valid JSON: {e}", code=6) from None
        if not isinstance(doc, dict):
            raise CNIError(f"{where} must be a JSON object", code=6)
        if "plugins" not in doc:
            if "type" not in doc:
                raise CNIError(f"{where} has neither 'plugins' nor 'type'", code=6)
            # A single-plugin .conf: lift it to a list, as libcni's ConfListFromConf does.
            doc = {
                "name": doc.get("name", ""),
                "cniVersion": doc.get("cniVersion", ""),
                "plugins": [doc],
            }
            data = json.dumps(doc).encode()
        name, version, plugins = doc.get("name"), doc.get("cniVersion", ""), doc["plugins"]
        if not isinstance(name, str) or not _ID_RE.match(name):
            raise CNIError(
                f"{where}: 'name' {name!r} is missing or not a valid network name", code=6
            )
        if not isinstance(plugins, list) or not plugins:
            raise CNIError(f"{where}: 'plugins' must be a non-empty list", code=6)
        for i, p in enumerate(plugins):
            if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
                raise CNIError(f"{where}: plugins[{i}] has no 'type'", code=6)
        return cls(
            name=name,
            cni_version=str(version),
            plugins=plugins,
            raw=data,
            disable_check=bool(doc.get("disableCheck", False)),
            source=source,
        )


def conf_files(conf_dir: str) -> list[str]:
    try:
        names = os.listdir(conf_dir)
    except FileNotFoundError:
        return []
    return sorted(
        os.path.join(conf_dir, n)
        for n in names
        if os.path.splitext(n)[1] in CONF_EXTENSIONS and os.path.isfile(os.path.join(conf_dir, n))
    )


def load_conflist(conf_dir: str) -> NetworkConfigList:
    """The network the runtime uses: the first config file in name order."""
    files = conf_files(conf_dir)
    if not files:
        raise CNIError(
            f"no network config found in {conf_dir} (want a {'/'.join(CONF_EXTENSIONS)} file)",
            code=6,
        )
    with open(files[0], "rb") as f:
        return NetworkConfigList.from_bytes(f.read(), source=files[0])


@dataclass
class RuntimeConf:
    container_id: str
    netns: str
    ifname: str = "eth0"
    args: list[tuple[str, str]] = field(default_factory=list)
    capability_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not _ID_RE.match(self.container_id or ""):
            raise CNIError(f"invalid container ID {self.container_id!r}", code=7)
        if (
            not self.ifname
            or len(self.ifname) > 15
            or self.ifname in (".", "..")
            or any(c in self.ifname for c in "/: \t\n")
        ):
            raise CNIError(f"invalid interface name {self.ifname!r}", code=7)


def is_pod_sandbox(entry: CachedAttachment) -> bool:
    """Did a pod runtime add this attachment (`pod_args`, the sandbox's own ID as its
    K8S_POD_INFRA_CONTAINER_ID)? podman and `ctr run --cni` pass no pod UID."""
    args = dict(entry.cni_args)
    return bool(args.get("K8S_POD_UID")) and args.get("K8S_POD_INFRA_CONTAINER_ID") == (
        entry.container_id
    )


def pod_args(namespace: str, name: str, uid: str, infra_id: str) -> list[tuple[str, str]]:
    """CNI_ARGS as kubelet/containerd pass them (IgnoreUnknown first, for host-local & co)."""
    return [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", infra_id),
        ("K8S_POD_UID", uid),
    ]


def _version_at_least(version: str, want: tuple[int, ...]) -> bool:
    try:
        parts = tuple(int(x) for x in version.split("."))
    except ValueError:
        return False
    return parts >= want


class CNIClient:
    def __init__(
        self,
        bin_dirs: str | Sequence[str],
        cache_dir: str,
        exec_prefix: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> None:
        self.bin_dirs = (
            [d for d in bin_dirs.split(":") if d] if isinstance(bin_dirs, str) else list(bin_dirs)
        )
        self.cache = ResultCache(cache_dir)
        self.exec_prefix = list(exec_prefix)
        self.timeout = timeout

    # ------------------------------------------------------------ one plugin

    def find_plugin(self, plugin_type: str) -> str:
        if "/" in plugin_type or plugin_type in (".", ".."):
            raise CNIError(f"invalid plugin type {plugin_type!r}", code=6)
        for d in self.bin_dirs:
            p = os.path.join(d, plugin_type)
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
        raise CNIError(
            f"failed to find plugin {plugin_type!r} in path {self.bin_dirs}",
            code=6,
            plugin=plugin_type,
        )

    def _build(
        self,
        net: NetworkConfigList,
        plugin: dict[str, Any],
        prev: dict[str, Any] | None,
        rt: RuntimeConf,
    ) -> bytes:
        conf = copy.deepcopy(plugin)
        conf["name"], conf["cniVersion"] = net.name, net.cni_version
        if prev is not None:
            conf["prevResult"] = prev
        caps = conf.get("capabilities") or {}
        rc = {k: v for k, v in rt.capability_args.items() if caps.get(k)}
        if rc:
            conf["runtimeConfig"] = rc
        return json.dumps(conf).encode()

    async def exec_plugin(
        self, command: str, plugin: dict[str, Any], stdin: bytes, rt: RuntimeConf | None
    ) -> dict[str, Any] | None:
        ptype = plugin["type"]
        path = self.find_plugin(ptype)
        env = dict(os.environ)
        env.update(CNI_COMMAND=command, CNI_PATH=":".join(self.bin_dirs))
        if rt is not None:
            env.update(
                CNI_CONTAINERID=rt.container_id,
                CNI_NETNS=rt.netns,
                CNI_IFNAME=rt.ifname,
                CNI_ARGS=";".join(f"{k}={v}" for k, v in rt.args),
            )
        proc = await asyncio.create_subprocess_exec(
            *self.exec_prefix,
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CNIError(f"{command} timed out after {self.timeout:.0f}s", plugin=ptype) from None
        if proc.returncode != 0:
            try:
                e = json.loads(out)
                raise CNIError(
                    str(e.get("msg", "")),
                    code=int(e.get("code", 999)),
                    details=str(e.get("details", "")),
                    plugin=ptype,
                )
            except (ValueError, AttributeError, TypeError):
                raise CNIError(
                    f"{command} failed with exit {proc.returncode}: "
                    f"{(err or out).decode(errors='replace').strip()}",
                    plugin=ptype,
                ) from None
        if command in ("ADD", "VERSION"):
            try:
                res = json.loads(out)
            except ValueError:
                raise CNIError(
                    f"{command} printed no JSON result: {out[:200]!r}", plugin=ptype
                ) from None
            if not isinstance(res, dict):
                raise CNIError(f"{command} result is not a JSON object", plugin=ptype)
            return res
        return None

    # ------------------------------------------------------------ a chain

    async def add(self, net: NetworkConfigList, rt: RuntimeConf) -> dict[str, Any]:
        """ADD through the chain; on failure the partial attachment is DELeted again."""
        rt.validate()
        result: dict[str, Any] | None = None
        try:
            for plugin in net.plugins:
                result = await self.exec_plugin(
                    "ADD", plugin, self._build(net, plugin, result, rt), rt
                )
        except BaseException:
            try:
                await self._del_chain(net, rt, result)
            except CNIError as e:
                log.warning("cleanup DEL after failed ADD of %s: %s", rt.container_id, e)
            raise
        assert result is not None
        self.cache.put(
            CachedAttachment(
                network=net.name,
                container_id=rt.container_id,
                ifname=rt.ifname,
                config=net.raw,
                cni_args=list(rt.args),
                capability_args=dict(rt.capability_args),
                result=result,
            )
        )
        return result

    async def check(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        rt.validate()
        if not _version_at_least(net.cni_version, (0, 4, 0)):
            raise CNIError(
                f"configuration version {net.cni_version!r} does not support CHECK", code=2
            )
        if net.disable_check:
            return
        cached = self.cache.get(net.name, rt.container_id, rt.ifname)
        if cached is None or cached.result is None:
            raise CNIError(
                f"no cached result for network {net.name!r}, container {rt.container_id}", code=7
            )
        for plugin in net.plugins:
            await self.exec_plugin("CHECK", plugin, self._build(net, plugin, cached.result, rt), rt)

    async def delete(self, net: NetworkConfigList, rt: RuntimeConf) -> None:
        """DEL in reverse order with the cached result as prevResult; drops the cache entry."""
        rt.validate()
        cached = self.cache.get(net.name, rt.container_id, rt.ifname)
        await self._del_chain(net, rt, cached.result if cached else None)
        self.cache.delete(net.name, rt.container_id, rt.ifname)

    async def _del_chain(
        self, net: NetworkConfigList, rt: RuntimeConf, prev: dict[str, Any] | None
    ) -> None:
        if not _version_at_least(net.cni_version, (0, 4, 0)):
            prev = None
        # Every plugin gets its DEL even when one fails, so one broken plugin does not
        # leak what the others hold (IPs, veths); the first error is raised at the end.
        first: CNIError | None = None
        for plugin in reversed(net.plugins):
            try:
                await self.exec_plugin("DEL", plugin, self._build(net, plugin, prev, rt), rt)
            except CNIError as e:
                first = first or e
        if first is not None:
            raise first

    async def delete_cached(self, entry: CachedAttachment, netns: str = "") -> None:
        """DEL an attachment with the config and args it was ADDed with."""
        net = NetworkConfigList.from_bytes(entry.config, source=f"cached {entry.network}")
        rt = RuntimeConf(
            container_id=entry.container_id,
            netns=netns,
            ifname=entry.ifname,
            args=list(entry.cni_args),
            capability_args=dict(entry.capability_args),
        )
        await self._del_chain(net, rt, entry.result)
        self.cache.delete(entry.network, entry.container_id, entry.ifname)

    async def gc(
        self,
        keep: set[str],
        netns_of: dict[str, str] | None = None,
        ours: Callable[[CachedAttachment], bool] | None = None,
    ) -> list[str]:
        """DEL every cached attachment whose container ID is not in `keep` (of those
        `ours` accepts: the cache dir is shared with every other runtime on the node)."""
        removed = []
        for entry in self.cache.entries():
            if entry.container_id in keep or (ours is not None and not ours(entry)):
                continue
            try:
                await self.delete_cached(entry, (netns_of or {}).get(entry.container_id, ""))
                removed.append(entry.container_id)
            except CNIError as e:
                log.warning(
                    "GC of CNI attachment %s/%s failed: %s", entry.network, entry.container_id, e
                )
        return removed

    async def version(self, plugin_type: str) -> dict[str, Any]:
        res = await self.exec_plugin(
            "VERSION", {"type": plugin_type}, json.dumps({"cniVersion": "1.0.0"}).encode(), None
        )
        assert res is not None
        return res


def result_ips(result: dict[str, Any]) -> list[str]:
    """Addresses (without prefix) of a 0.3+/1.0 result, sandbox interfaces first."""
    ifaces = result.get("interfaces") or []
    ips = result.get("ips") or []

    def in_sandbox(ip: dict[str, Any]) -> bool:
        i = ip.get("interface")
        return isinstance(i, int) and 0 <= i < len(ifaces) and bool(ifaces[i].get("sandbox"))

    ordered = sorted(ips, key=lambda ip: not in_sandbox(ip))
    return [str(ip["address"]).split("/")[0] for ip in ordered if ip.get("address")]
