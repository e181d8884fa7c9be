"""A container's environment as the kubelet makes it (pkg/kubelet/kubelet_pods.go
makeEnvironmentVariables): envFrom first, in order, then env, each later name
overriding an earlier one; `$(VAR)` in a value expands to a variable defined before
it or to a Service's link variable; `$$` is a literal `$`. Service link variables
(`service_links`) come under everything the pod defines itself."""

from __future__ import annotations

from corral.api.objects import ConfigMap, Container, Secret, Service, config_key
from corral.runtime.downward import PodFacts, field_value, resource_value
from corral.runtime.volumes import Lookup


class ConfigError(Exception):
    """CreateContainerConfigError: a referenced ConfigMap, Secret or key is missing."""


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (third_party/forked/golang/expansion)."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2 : end]
                    out.append(env[name] if name in env else value[i : end + 1])
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


def environment(
    c: Container,
    facts: PodFacts,
    config_maps: Lookup,
    secrets: Lookup,
    links: dict[str, str] | None = None,
) -> dict[str, str]:
    """The variables of container `c`; `links` (service_links) are there for $(VAR) and
    stay where the pod defines nothing of the same name."""
    ns = facts.pod.namespace or "default"
    env: dict[str, str] = dict(links or {})
    for src in c.env_from:
        if src.config_map_ref is not None:
            ref = src.config_map_ref
            obj: ConfigMap | Secret | None = config_maps(ns, ref.name)
            what = "configmap"
        else:
            assert src.secret_ref is not None
            ref = src.secret_ref  # type: ignore[assignment]
            obj = secrets(ns, ref.name)
            what = "secret"
        if obj is None:
            if ref.optional:
                continue
            raise ConfigError(f'{what} "{ref.name}" not found')
        for k, v in obj.items().items():
            name = (src.prefix or "") + k
            try:
                config_key(name)  # an invalid name is skipped (the kubelet's event)
            except ValueError:
                continue
            env[name] = v.decode(errors="replace")
    for e in c.env:
        if e.value_from is None:
            env[e.name] = expand(e.value, env)
            continue
        vf = e.value_from
        if vf.field_ref is not None:
            env[e.name] = field_value(facts, vf.field_ref.field_path)
        elif vf.resource_field_ref is not None:
            r = vf.resource_field_ref
            env[e.name] = resource_value(c, r.resource, r.divisor)
        elif vf.config_map_key_ref is not None or vf.secret_key_ref is not None:
            kref = vf.config_map_key_ref or vf.secret_key_ref
            assert kref is not None
            is_cm = vf.config_map_key_ref is not None
            obj = (config_maps if is_cm else secrets)(ns, kref.name)
            what = "configmap" if is_cm else "secret"
            if obj is None:
                if kref.optional:
                    continue
                raise ConfigError(f'{what} "{kref.name}" not found')
            data = obj.items()
            if kref.key not in data:
                if kref.optional:
                    continue
                kind = "ConfigMap" if is_cm else "Secret"
                raise ConfigError(f"couldn't find key {kref.key} in {kind} {ns}/{kref.name}")
            env[e.name] = data[kref.key].decode(errors="replace")
    return env


def service_links(services: list[Service]) -> dict[str, str]:
    """Docker-link style variables for each Service with a cluster IP, as kubelet makes
    them (pkg/kubelet/envvars): FOO_SERVICE_HOST, FOO_SERVICE_PORT[_<NAME>], FOO_PORT,
    FOO_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]. Later Services of a name win."""
    env: dict[str, str] = {}
    for svc in services:
        ip = svc.spec.cluster_ip
        if not ip or ip == "None" or not svc.spec.ports:
            continue
        name = svc.name.upper().replace("-", "_")
        first = svc.spec.ports[0]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(first.port)
        for p in svc.spec.ports:
            if p.name:
                env[f"{name}_SERVICE_PORT_{p.name.upper().replace('-', '_')}"] = str(p.port)
        env[f"{name}_PORT"] = f"{first.protocol.lower()}://{ip}:{first.port}"
        for p in svc.spec.ports:
            proto = p.protocol.upper()
            pre = f"{name}_PORT_{p.port}_{proto}"
            env[pre] = f"{proto.lower()}://{ip}:{p.port}"
            env[f"{pre}_PROTO"] = proto.lower()
            env[f"{pre}_PORT"] = str(p.port)
            env[f"{pre}_ADDR"] = ip
    return env
