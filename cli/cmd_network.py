"""`corral network show|set` (the cluster network config) and `corral node remove NAME`."""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from corral.api import netconfig
from corral.api.manifest import ManifestError, load_file
from corral.api.objects import NetworkConfig, NetworkSpec, Node
from corral.api.store import Store
from corral.cli import common
from corral.cli.common import CLIError
from corral.cli.output import table
from corral.overlay import lease

_ON_OFF = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}

# flag -> (field path in the spec, converter)
_FIELDS: dict[str, tuple[tuple[str, ...], Any]] = {
    "network": (("network",), str),
    "subnet_len": (("subnetLen",), int),
    "subnet_min": (("subnetMin",), str),
    "subnet_max": (("subnetMax",), str),
    "service_cidr": (("serviceCIDR",), str),
    "ip_masq": (("ipMasq",), bool),
    "vni": (("backend", "vni"), int),
    "port": (("backend", "port"), int),
    "direct_routing": (("backend", "directRouting"), bool),
    "mtu": (("backend", "mtu"), int),
}


def _on_off(v: str) -> bool:
    try:
        return _ON_OFF[v.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{v!r}: use on or off") from None


def register(sub: Any) -> None:
    p = sub.add_parser("network", help="show or change the cluster network (pod CIDR, VXLAN)")
    nsub = p.add_subparsers(dest="network_command", metavar="ACTION")
    show = nsub.add_parser("show", help="the network config and every node's subnet lease")
    show.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    show.set_defaults(func=cmd_show)
    s = nsub.add_parser(
        "set",
        help="change the network config (checked against the nodes first)",
        description="Unset flags keep their current value. The address plan (network, "
        "subnet-len, subnet-min/max, vni, port) can only change while no node "
        "holds a lease.",
    )
    s.add_argument("-f", "--filename", help="a NetworkConfig manifest (YAML or JSON)")
    s.add_argument("--network", help="pod network CIDR (default 10.244.0.0/16)")
    s.add_argument("--subnet-len", type=int, help="prefix length of each node's subnet")
    s.add_argument("--subnet-min", help="lowest subnet address to lease")
    s.add_argument("--subnet-max", help="highest subnet address to lease")
    s.add_argument("--service-cidr", help="service VIP range (must not overlap the network)")
    s.add_argument(
        "--ip-masq",
        type=_on_off,
        metavar="on|off",
        help="masquerade pod traffic leaving the network",
    )
    s.add_argument("--vni", type=int, help="VXLAN network identifier")
    s.add_argument("--port", type=int, help="VXLAN UDP port")
    s.add_argument(
        "--direct-routing",
        type=_on_off,
        metavar="on|off",
        help="route straight to peers on the same L2 network, no encapsulation",
    )
    s.add_argument("--mtu", type=int, help="pod MTU (default: underlay MTU - 50)")
    s.set_defaults(func=cmd_set)
    p.set_defaults(func=lambda a: _usage(p))


def add_node_remove(node_parser: argparse.ArgumentParser) -> None:
    """Give `corral node` its `remove NAME` action (called from cmd_node.register)."""
    nsub = node_parser.add_subparsers(dest="node_command", metavar="ACTION", required=False)
    r = nsub.add_parser(
        "remove",
        help="forget a node: its Node object and its subnet lease",
        description="Deletes the node's subnet lease and Node object; every "
        "other node drops its routes and FDB entries. Stop the "
        "node's agent first, or it takes a new lease.",
    )
    r.add_argument("name")
    r.set_defaults(func=cmd_node_remove, daemon=False)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


# ------------------------------------------------------------ show


async def _show(store: Store) -> tuple[NetworkConfig | None, list[tuple[str, Any]]]:
    cfg = await store.get(NetworkConfig, netconfig.CONFIG_NAME)
    leases = sorted(await netconfig.list_leases(store), key=lambda le: le.node_name)
    return cfg, [(le.subnet, le) for le in leases]


def cmd_show(args: argparse.Namespace) -> int:
    async def go() -> tuple[NetworkConfig | None, list[tuple[str, Any]]]:
        async with common.store_from_args(args) as store:
            return await _show(store)

    cfg, leases = common.run(go)
    spec = cfg.spec if cfg else NetworkSpec()
    if args.output != "table":
        doc = {
            "spec": spec.dump(),
            "stored": cfg is not None,
            "leases": [
                le.model_dump(by_alias=True, exclude_none=True, mode="json") for _, le in leases
            ],
        }
        print(
            json.dumps(doc, indent=2)
            if args.output == "json"
            else yaml.safe_dump(doc, sort_keys=False),
            end="" if args.output == "yaml" else "\n",
        )
        return 0
    b = spec.backend
    print(
        f"network:      {spec.network} (a /{spec.subnet_len} per node)"
        + ("" if cfg else "  [defaults: not stored yet]")
    )
    print(f"services:     {spec.service_cidr}  dns {spec.cluster_dns}  {spec.cluster_domain}")
    print(
        f"backend:      {b.type} vni {b.vni} port {b.port} device {netconfig.device_name(b.vni)}"
        f"  directRouting {'on' if b.direct_routing else 'off'}"
        f"  mtu {b.mtu or 'underlay-50'}"
    )
    print(f"ipMasq:       {'on' if spec.ip_masq else 'off'}")
    print()
    rows = [
        [le.node_name, subnet, le.public_ip, le.vtep_mac or "-", le.renewed_at or "-"]
        for subnet, le in leases
    ]
    print(
        table(["NODE", "SUBNET", "PUBLIC IP", "VTEP MAC", "LEASED AT"], rows)
        if rows
        else "no subnet leases (no node agent is running)"
    )
    return 0


# ------------------------------------------------------------ set


def _set_path(d: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _spec_from_file(path: str) -> dict[str, Any]:
    try:
        objs = load_file(path)
    except (ManifestError, OSError) as e:
        raise CLIError(f"{path}: {e}") from None
    cfgs = [o for o in objs if isinstance(o, NetworkConfig)]
    if len(cfgs) != 1 or len(objs) != 1:
        raise CLIError(f"{path}: expected exactly one NetworkConfig object")
    if cfgs[0].name not in ("", netconfig.CONFIG_NAME):
        raise CLIError(
            f"{path}: the cluster's NetworkConfig is named "
            f"{netconfig.CONFIG_NAME!r}, not {cfgs[0].name!r}"
        )
    return cfgs[0].spec.dump()


def cmd_set(args: argparse.Namespace) -> int:
    flags = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    if not flags and not args.filename:
        raise CLIError(
            "nothing to set: give -f FILE or at least one of --network, "
            "--subnet-len, --ip-masq, --direct-routing, ... (see --help)"
        )

    async def go() -> tuple[NetworkConfig, bool]:
        async with common.store_from_args(args) as store:
            base = (
                _spec_from_file(args.filename)
                if args.filename
                else (await netconfig.load(store)).spec.dump()
            )
            for k, v in flags.items():
                path, conv = _FIELDS[k]
                _set_path(base, path, conv(v))
            try:
                spec = netconfig.parse_spec(base)
                return await netconfig.set_config(store, spec)
            except netconfig.ConfigError as e:
                raise CLIError(f"network config refused: {e}") from None

    cfg, changed = common.run(go)
    print(f"networkconfig/{cfg.name} {'configured' if changed else 'unchanged'}")
    return 0


# ------------------------------------------------------------ node remove


def cmd_node_remove(args: argparse.Namespace) -> int:
    name = args.name

    async def go() -> tuple[list[str], bool]:
        async with common.store_from_args(args) as store:
            subnets = await lease.remove_node_leases(store, name)
            deleted = await store.delete(Node, name)
            return subnets, deleted

    subnets, deleted = common.run(go)
    if not subnets and not deleted:
        raise CLIError(
            f"node {name!r} not found: no Node object and no subnet lease "
            "(see `corral get nodes` and `corral network show`)"
        )
    freed = f", freed subnet {', '.join(subnets)}" if subnets else ""
    print(f"node/{name} removed{freed}")
    return 0
