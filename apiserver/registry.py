"""The resource registry: one entry per kind the API serves, and everything the server
derives from it (discovery, routing, store keys, short names). A new kind is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.api import objects
from corral.api.objects import TypedObject
from corral.api.store import kind_prefix

# What kube-apiserver lists for a full-featured resource; `deletecollection` is not
# served yet (kubectl `delete --all` lists and deletes one by one).
VERBS: tuple[str, ...] = (
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
)


@dataclass(frozen=True)
class Resource:
    """One served resource: where it lives in the URL space, in etcd and in Python."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    model: type[TypedObject]
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = VERBS
    subresources: tuple[str, ...] = ()
    singular: str = ""
    field_labels: tuple[str, ...] = field(default=("metadata.name", "metadata.namespace"))

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def singular_name(self) -> str:
        return self.singular or self.kind.lower()

    def prefix(self, namespace: str | None = None) -> str:
        """The etcd key prefix of this kind (of one namespace when given)."""
        return kind_prefix(self.model, namespace)

    def key(self, name: str, namespace: str | None) -> str:
        return self.prefix(namespace) + name if self.namespaced else self.prefix() + name


def _short(model: type[TypedObject]) -> tuple[str, ...]:
    """kubectl's short names: the model's aliases without the kind's own spellings."""
    own = {model.KIND.lower(), model.PLURAL, model.PLURAL.removesuffix("s")}
    return tuple(s for s in model.SHORT_NAMES if s not in own)


def _r(
    group: str,
    model: type[TypedObject],
    *,
    categories: tuple[str, ...] = (),
    subresources: tuple[str, ...] = (),
    field_labels: tuple[str, ...] = (),
) -> Resource:
    version = model.API_VERSIONS[0].rpartition("/")[2]
    return Resource(
        group=group,
        version=version,
        plural=model.PLURAL,
        kind=model.KIND,
        namespaced=model.NAMESPACED,
        model=model,
        short_names=_short(model),
        categories=categories,
        subresources=subresources,
        field_labels=("metadata.name", "metadata.namespace", *field_labels),
    )


RESOURCES: tuple[Resource, ...] = (
    _r("", objects.Namespace, subresources=("status",), field_labels=("status.phase",)),
    _r("", objects.Node, subresources=("status",), field_labels=("spec.unschedulable",)),
    _r(
        "",
        objects.Pod,
        categories=("all",),
        subresources=("status", "log", "exec"),  # log, exec: on the node (nodeproxy.py)
        field_labels=("spec.nodeName", "status.phase", "status.podIP", "spec.restartPolicy"),
    ),
    _r("", objects.Service, categories=("all",), subresources=("status",)),
    _r("", objects.Endpoints),
    _r("", objects.ConfigMap),
    _r("", objects.Secret, field_labels=("type",)),
    _r(
        "",
        objects.ReplicationController,
        categories=("all",),
        subresources=("status", "scale"),
    ),
    _r("discovery.k8s.io", objects.EndpointSlice),
    _r("apps", objects.Deployment, categories=("all",), subresources=("status", "scale")),
    _r("networking.k8s.io", objects.NetworkPolicy),
    _r("corral.dev", objects.NetworkConfig),
    _r("corral.dev", objects.LoadBalancerPool),
)

# Every kind in corral.api.objects.KINDS is served (tests/test_apiserver_units.py).
BY_PATH: dict[tuple[str, str, str], Resource] = {
    (r.group, r.version, r.plural): r for r in RESOURCES
}
BY_KIND: dict[str, Resource] = {r.kind: r for r in RESOURCES}


def groups() -> dict[str, list[str]]:
    """group -> its versions, in the order resources were registered ("" first)."""
    out: dict[str, list[str]] = {}
    for r in RESOURCES:
        versions = out.setdefault(r.group, [])
        if r.version not in versions:
            versions.append(r.version)
    return out


def in_group_version(group: str, version: str) -> list[Resource]:
    return [r for r in RESOURCES if r.group == group and r.version == version]


def lookup(group: str, version: str, plural: str) -> Resource | None:
    return BY_PATH.get((group, version, plural))
