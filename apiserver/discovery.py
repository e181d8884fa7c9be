"""Discovery documents: /version, /api, /apis and each group-version's resource list.

Only the non-aggregated forms are served. kubectl 1.27+ asks for the aggregated
`apidiscovery.k8s.io` form first with plain JSON as its fallback; an answer with
`Content-Type: application/json` makes it read the classic documents, as it does
with an older kube-apiserver.
"""

from __future__ import annotations

import platform
from typing import Any

import corral
from corral.apiserver import registry

# The Kubernetes minor this server answers like: kubectl 1.27 to 1.33 are within the
# skew kubectl tolerates, and /usr/bin/kubectl's dispatcher picks a client by it.
KUBE_MAJOR, KUBE_MINOR = "1", "30"


def version() -> dict[str, Any]:
    return {
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": f"v{KUBE_MAJOR}.{KUBE_MINOR}.0+corral-{corral.__version__}",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": f"python{platform.python_version()}",
        "compiler": "cpython",
        "platform": f"linux/{platform.machine()}",
    }


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": gvs, "preferredVersion": gvs[0]}


def api_group_list() -> dict[str, Any]:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group(g, vs) for g, vs in registry.groups().items() if g],
    }


def api_group(name: str) -> dict[str, Any] | None:
    versions = registry.groups().get(name)
    if not name or versions is None:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, versions)}


SUBRESOURCE_VERBS: dict[str, dict[str, Any]] = {
    "log": {"kind": "Pod", "verbs": ["get"]},
    "exec": {"kind": "PodExecOptions", "verbs": ["create", "get"]},
}


def resource_list(group: str, version: str) -> dict[str, Any] | None:
    resources = registry.in_group_version(group, version)
    if not resources:
        return None
    out: list[dict[str, Any]] = []
    for r in resources:
        entry: dict[str, Any] = {
            "name": r.plural,
            "singularName": r.singular_name,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": list(r.verbs),
        }
        if r.short_names:
            entry["shortNames"] = list(r.short_names)
        if r.categories:
            entry["categories"] = list(r.categories)
        out.append(entry)
        for sub in r.subresources:
            entry = {
                "name": f"{r.plural}/{sub}",
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }
            if sub == "scale":
                entry.update(group="autoscaling", version="v1", kind="Scale")
            elif sub in SUBRESOURCE_VERBS:  # kube-apiserver's pods/log and pods/exec
                entry.update(SUBRESOURCE_VERBS[sub])
            out.append(entry)
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": out,
    }
