"""Parsing and validating a CNI request: the CNI_* environment and the JSON on stdin.

Everything a user can get wrong is checked here, before anything is changed, and
reported as a CNIError with the spec's code. Pure logic: no kernel, no etcd.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from corral.cni import errors as E
from corral.cni.errors import CNIError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
PLUGINS = ("corral-cni", "corral-ipam")
CONTAINER_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
NETWORK_NAME_RE = CONTAINER_ID_RE  # the spec's rule for network names is the same
MAX_STDIN = 1024 * 1024  # bytes of network configuration
MAX_DEPTH = 64  # nesting of objects and lists in it
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
Net4 = ipaddress.IPv4Network
Addr4 = ipaddress.IPv4Address


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def validate_ifname(name: object, what: str, code: int = E.INVALID_ENV) -> str:
    """The kernel's rules for an interface name (linux dev_valid_name)."""
    if not isinstance(name, str) or not name:
        raise CNIError(code, f"{what} is empty", "give an interface name such as eth0")
    if len(name) > 15:
        raise CNIError(
            code, f"{what} {name!r} is too long", "interface names have at most 15 characters"
        )
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise CNIError(
            code,
            f"{what} {name!r} is not a valid interface name",
            "it must not be . or .. nor contain /, : or whitespace",
        )
    return name


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS `K1=V1;K2=V2` into a dict; a malformed pair is error 4."""
    out: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise CNIError(
                E.INVALID_ENV,
                f"CNI_ARGS: {pair!r} is not KEY=VALUE",
                "CNI_ARGS is a ;-separated list of KEY=VALUE pairs",
            )
        out[k] = v
    return out


@dataclass
class Range:
    subnet: Net4
    start: Addr4
    end: Addr4
    gateway: Addr4

    @property
    def pool(self) -> str:
        return str(self.subnet).replace("/", "-")

    def size(self) -> int:
        return int(self.end) - int(self.start) + 1

    def usable(self, ip: Addr4) -> bool:
        return (
            self.start <= ip <= self.end
            and ip != self.gateway
            and ip != self.subnet.network_address
            and ip != self.subnet.broadcast_address
        )


@dataclass
class Route:
    dst: Net4
    gw: Addr4 | None = None

    def to_dict(self) -> dict[str, str]:
        d = {"dst": str(self.dst)}
        if self.gw is not None:
            d["gw"] = str(self.gw)
        return d


def _ip(value: object, what: str) -> Addr4:
    try:
        return Addr4(str(value).split("/")[0])
    except ValueError:
        raise CNIError(E.INVALID_CONFIG, f"{what}: {value!r} is not an IPv4 address") from None


def make_range(spec: dict[str, Any], where: str) -> Range:
    if not isinstance(spec, dict) or "subnet" not in spec:
        raise CNIError(
            E.INVALID_CONFIG, f"{where}: a range needs a subnet", 'e.g. {"subnet": "10.244.1.0/24"}'
        )
    try:
        net = ipaddress.ip_network(str(spec["subnet"]), strict=False)
    except ValueError:
        raise CNIError(
            E.INVALID_CONFIG, f"{where}.subnet: {spec['subnet']!r} is not a CIDR"
        ) from None
    if not isinstance(net, Net4):
        raise CNIError(E.UNSUPPORTED_FIELD, f"{where}.subnet: {net} (only IPv4 is supported)")
    if net.prefixlen > 30:
        raise CNIError(
            E.INVALID_CONFIG, f"{where}.subnet: {net} is too small", "use a /30 or larger"
        )
    gw = _ip(spec["gateway"], f"{where}.gateway") if spec.get("gateway") else net[1]
    start = _ip(spec["rangeStart"], f"{where}.rangeStart") if spec.get("rangeStart") else net[1]
    end = _ip(spec["rangeEnd"], f"{where}.rangeEnd") if spec.get("rangeEnd") else net[-2]
    for name, ip in (("gateway", gw), ("rangeStart", start), ("rangeEnd", end)):
        if ip not in net:
            raise CNIError(E.INVALID_CONFIG, f"{where}.{name}: {ip} is outside {net}")
    if start > end:
        raise CNIError(E.INVALID_CONFIG, f"{where}: rangeStart {start} is after rangeEnd {end}")
    return Range(net, start, end, gw)


@dataclass
class IPAMConfig:
    """`ipam` section. range_sets empty means: the node's subnet from subnet.json."""

    range_sets: list[list[Range]] = field(default_factory=list)
    routes: list[Route] | None = None
    requested: list[Addr4] = field(default_factory=list)


def parse_ipam(conf: dict[str, Any], cni_args: dict[str, str]) -> IPAMConfig:
    ipam = conf.get("ipam") or {}
    if not isinstance(ipam, dict):
        raise CNIError(E.INVALID_CONFIG, "ipam must be an object")
    out = IPAMConfig()
    ranges = ipam.get("ranges")
    if ranges is not None:
        if not isinstance(ranges, list) or not all(isinstance(s, list) and s for s in ranges):
            raise CNIError(
                E.INVALID_CONFIG,
                "ipam.ranges must be a list of non-empty lists",
                'e.g. [[{"subnet": "10.244.1.0/24"}]]',
            )
        out.range_sets = [
            [make_range(r, f"ipam.ranges[{i}][{j}]") for j, r in enumerate(s)]
            for i, s in enumerate(ranges)
        ]
    elif ipam.get("subnet"):
        out.range_sets = [[make_range(ipam, "ipam")]]
    if "routes" in ipam:
        rts = ipam["routes"]
        if not isinstance(rts, list):
            raise CNIError(E.INVALID_CONFIG, "ipam.routes must be a list")
        out.routes = []
        for i, r in enumerate(rts):
            try:
                dst = ipaddress.ip_network(str(r["dst"]), strict=False)
            except (KeyError, TypeError, ValueError):
                raise CNIError(E.INVALID_CONFIG, f"ipam.routes[{i}] needs a CIDR dst") from None
            if not isinstance(dst, Net4):
                raise CNIError(E.UNSUPPORTED_FIELD, f"ipam.routes[{i}].dst {dst}: IPv4 only")
            gw = _ip(r["gw"], f"ipam.routes[{i}].gw") if r.get("gw") else None
            out.routes.append(Route(dst, gw))
    # Requested IPs, in the three places runtimes put them.
    wanted: list[str] = []
    for w in cni_args.get("IP", "").split(","):
        if w:
            try:
                Addr4(w.split("/")[0])
            except ValueError:
                raise CNIError(E.INVALID_ENV, f"CNI_ARGS IP={w!r} is not an IPv4 address") from None
            wanted.append(w)
    args_ips = ((conf.get("args") or {}).get("cni") or {}).get("ips") or []
    rt_ips = (conf.get("runtimeConfig") or {}).get("ips") or []
    for src in (args_ips, rt_ips):
        if not isinstance(src, list):
            raise CNIError(E.INVALID_CONFIG, "requested ips must be a list of addresses")
        wanted += [str(x) for x in src]
    for w in wanted:
        ip = _ip(w, "requested IP")
        if ip not in out.requested:
            out.requested.append(ip)
    return out


@dataclass
class BridgeConfig:
    bridge: str = "cni0"
    is_gateway: bool = True
    mtu: int = 0  # 0: from the overlay (subnet.json), else 1500
    hairpin: bool = True
    ip_masq: bool = False


def _bool(conf: dict[str, Any], key: str, default: bool) -> bool:
    v = conf.get(key, default)
    if not isinstance(v, bool):
        raise CNIError(E.INVALID_CONFIG, f"{key} must be true or false, not {v!r}")
    return v


def parse_bridge(conf: dict[str, Any]) -> BridgeConfig:
    bc = BridgeConfig()
    bc.bridge = validate_ifname(conf.get("bridge", "cni0"), "bridge", E.INVALID_CONFIG)
    bc.is_gateway = _bool(conf, "isGateway", True)
    bc.hairpin = _bool(conf, "hairpinMode", True)
    bc.ip_masq = _bool(conf, "ipMasq", False)
    mtu = conf.get("mtu", 0)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not (mtu == 0 or 68 <= mtu <= 65535):
        raise CNIError(E.INVALID_CONFIG, f"mtu {mtu!r} is out of range", "use 68..65535")
    bc.mtu = mtu
    ipam_type = (conf.get("ipam") or {}).get("type", "corral-ipam")
    if ipam_type != "corral-ipam":
        raise CNIError(
            E.UNSUPPORTED_FIELD,
            f"ipam.type {ipam_type!r} is not supported",
            "corral-cni allocates through corral-ipam only",
        )
    return bc


@dataclass
class Request:
    plugin: str
    command: str
    cni_version: str
    conf: dict[str, Any]
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    cni_args: dict[str, str] = field(default_factory=dict)
    path: str = ""

    @property
    def prev_result(self) -> dict[str, Any] | None:
        pr = self.conf.get("prevResult")
        return pr if isinstance(pr, dict) else None

    def valid_attachments(self) -> set[tuple[str, str]]:
        if VALID_ATTACHMENTS not in self.conf:  # absent is not "nothing is valid"
            raise CNIError(
                E.INVALID_CONFIG,
                f"GC needs {VALID_ATTACHMENTS} in the configuration",
                "list the attachments that are still in use",
            )
        raw = self.conf[VALID_ATTACHMENTS]
        if not isinstance(raw, list):
            raise CNIError(E.INVALID_CONFIG, f"{VALID_ATTACHMENTS} must be a list")
        out = set()
        for a in raw:
            if not isinstance(a, dict) or not a.get("containerID") or not a.get("ifname"):
                raise CNIError(
                    E.INVALID_CONFIG,
                    f"{VALID_ATTACHMENTS}: each entry needs containerID and ifname",
                )
            out.add((str(a["containerID"]), str(a["ifname"])))
        return out


def _is_netns(p: str) -> bool:
    try:
        st, ref = os.stat(p), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return st.st_dev == ref.st_dev and st.st_ino != 0


def decode_config(stdin: str) -> Any:
    """The JSON on stdin, bounded in size and nesting (error 6 beyond either)."""
    if len(stdin.encode()) > MAX_STDIN:
        raise CNIError(
            E.DECODE_FAILURE,
            f"the network configuration is larger than {MAX_STDIN // 1024} KiB",
            "a network configuration is a few KiB; check what the runtime sends",
        )
    if not stdin.strip():
        return None
    try:
        conf = json.loads(stdin)
    except RecursionError:
        conf = None  # deeper than Python's own limit: reported as too deep below
        depth = MAX_DEPTH + 1
    except ValueError as e:
        raise CNIError(
            E.DECODE_FAILURE, "cannot decode the network configuration", str(e)
        ) from None
    else:
        depth = _depth(conf)
    if depth > MAX_DEPTH:
        raise CNIError(
            E.DECODE_FAILURE,
            f"the network configuration nests deeper than {MAX_DEPTH} levels",
            "a network configuration nests a few levels; check what the runtime sends",
        )
    return conf


def _depth(value: Any) -> int:
    """How deeply objects and lists nest in `value` (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_network_name(name: object) -> str:
    """The spec's rule for `name`: letters, digits, _ . - (starting alphanumeric)."""
    if not isinstance(name, str) or not name:
        raise CNIError(
            E.INVALID_CONFIG, "name is missing", 'give the network a name, e.g. "corral"'
        )
    if not NETWORK_NAME_RE.match(name) or len(name) > 256:
        raise CNIError(
            E.INVALID_CONFIG,
            f"name {name!r} is not a valid network name",
            "use letters, digits, _ . and - only, starting with a letter or digit",
        )
    return name


def parse_request(plugin: str, env: dict[str, str], stdin: str) -> Request:
    """Validate env + stdin for `plugin`; raise CNIError on the first problem."""
    if plugin not in PLUGINS:
        raise CNIError(E.INVALID_CONFIG, f"unknown plugin {plugin!r}")
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CNIError(
            E.INVALID_ENV, f"CNI_COMMAND {command!r} is not one of " + ", ".join(COMMANDS)
        )
    conf = decode_config(stdin)
    if command == "VERSION":
        conf = conf if isinstance(conf, dict) else {}
    elif not isinstance(conf, dict):
        raise CNIError(E.DECODE_FAILURE, "the network configuration on stdin must be a JSON object")
    version = conf.get("cniVersion", "0.3.0" if command == "VERSION" else None)
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            E.INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported",
            "supported: " + ", ".join(SUPPORTED_VERSIONS),
        )
    req = Request(plugin, command, str(version), conf, path=env.get("CNI_PATH", ""))
    if command == "VERSION":
        return req
    check_network_name(conf.get("name"))
    if command in ("GC", "STATUS"):
        return req
    if command == "CHECK" and version_tuple(req.cni_version) < (0, 4, 0):
        raise CNIError(
            E.INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, not {req.cni_version}"
        )
    typ = conf.get("type")
    want = plugin if plugin == "corral-cni" else None
    if want and typ != want:
        raise CNIError(E.INVALID_CONFIG, f"type {typ!r} does not name this plugin ({want})")
    if plugin == "corral-ipam" and (conf.get("ipam") or {}).get("type") not in (None, plugin):
        raise CNIError(E.INVALID_CONFIG, f"ipam.type does not name this plugin ({plugin})")
    cid = env.get("CNI_CONTAINERID", "")
    if not cid:
        raise CNIError(E.INVALID_ENV, "CNI_CONTAINERID is missing")
    if not CONTAINER_ID_RE.match(cid) or len(cid) > 256:
        raise CNIError(
            E.INVALID_ENV,
            f"CNI_CONTAINERID {cid!r} has invalid characters",
            "use letters, digits, _ . and - only",
        )
    req.container_id = cid
    req.ifname = validate_ifname(env.get("CNI_IFNAME", ""), "CNI_IFNAME")
    req.cni_args = parse_cni_args(env.get("CNI_ARGS", ""))
    req.netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "CHECK") and plugin == "corral-cni":
        if not req.netns:
            raise CNIError(E.INVALID_ENV, "CNI_NETNS is missing")
        if not _is_netns(req.netns):
            raise CNIError(E.INVALID_ENV, f"CNI_NETNS {req.netns!r} is not a network namespace")
    return req
