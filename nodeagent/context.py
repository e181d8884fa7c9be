"""The one place a node's settings become the `NodeContext` its components get.

`corral node` (cli/cmd_node.py) passes its parsed flags; a test fixture or a
bench passes any object with the attributes it wants to set. An attribute sets
the field of the same name: any `NodePaths` or `NodeOptions` field, and
`underlay_iface` / `underlay_ip`. A missing or None attribute keeps the field's
default, so a new node flag needs only a `dest` named after its field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from corral.api.store import Store
from corral.daemon.nodecontext import NodeContext
from corral.node.context import NodeOptions, NodePaths


def _given(cls: type, settings: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(settings, f.name, None)
        if value is None:
            continue
        if f.type in ("bool", bool) and isinstance(value, str):  # an on/off flag
            value = value == "on"
        out[f.name] = value
    return out


def node_context(name: str, store: Store, settings: Any) -> NodeContext:
    """The context of node `name`: its paths, options and underlay from `settings`."""
    return NodeContext(
        node_name=name,
        store=store,
        paths=NodePaths(**_given(NodePaths, settings)),
        underlay_iface=getattr(settings, "underlay_iface", None),
        underlay_ip=getattr(settings, "underlay_ip", None),
        options=NodeOptions(**_given(NodeOptions, settings)),
    )
