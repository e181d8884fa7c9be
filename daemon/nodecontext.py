"""What every node component is handed: identity, store, informers, paths and options.

It lives in the daemon layer, not in `node/`: it carries the store and the
process's shared informers (`api/`), which the kernel toolkit below must not
know about. The node-only parts (`NodePaths`, `NodeOptions`) stay in `node/context.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from corral.api.informer import InformerFactory
from corral.api.store import Store
from corral.node.context import NodeOptions, NodePaths


@dataclass
class NodeContext:
    node_name: str
    store: Store
    paths: NodePaths = field(default_factory=NodePaths)
    underlay_iface: str | None = None  # found from the default route when None
    underlay_ip: str | None = None
    options: NodeOptions = field(default_factory=NodeOptions)
    # The process's one informer per kind, shared by its components. Components
    # start it; whoever made the context stops it (before closing the store).
    informers: InformerFactory = field(default=None)  # type: ignore[assignment]
    # Called by the CNI server when ADD gave a pod an address, before ADD answers:
    # (pod namespace, pod name, IP). The NetworkPolicy component puts the pod's
    # rules in place here, so a pod never passes traffic before its policy does.
    # A hook that raises fails the ADD (the runtime retries).
    address_hooks: list[Callable[[str, str, str], Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.informers is None:
            self.informers = InformerFactory(self.store)
