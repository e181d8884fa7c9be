"""The object model: Kubernetes-shaped kinds plus corral's own network records.

Every model forbids unknown fields, so a typo in a user's YAML is an error that
names the field instead of a silently ignored setting. Field names are the
Kubernetes camelCase ones (`targetPort`, `clusterIP`); Python code uses the
snake_case attribute names.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from corral.api.quantity import QuantityError, parse_quantity

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def _dns1123_label(v: str) -> str:
    if len(v) > 63 or not _DNS1123_LABEL.match(v):
        raise ValueError(
            f"{v!r} must be a DNS label: at most 63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return v


def _dns1123_subdomain(v: str) -> str:
    if len(v) > 253 or not _DNS1123_SUBDOMAIN.match(v):
        raise ValueError(
            f"{v!r} must be a DNS subdomain: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return v


def _dns1035_label(v: str) -> str:
    if len(v) > 63 or not _DNS1035_LABEL.match(v):
        raise ValueError(
            f"{v!r} must be a DNS-1035 label: at most 63 lowercase letters, digits or '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return v


def _labels(v: dict[str, str]) -> dict[str, str]:
    for key, value in v.items():
        prefix, _, name = key.rpartition("/")
        if prefix:
            _dns1123_subdomain(prefix)
        if len(name) > 63 or not _LABEL_NAME.match(name):
            raise ValueError(f"label key {key!r} is not valid (at most 63 of [A-Za-z0-9-_.])")
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ValueError(f"label value {value!r} for {key!r} is not valid")
    return v


def _quantity(v: str | int | float) -> str | int | float:
    try:
        parse_quantity(v)
    except QuantityError as e:
        raise ValueError(str(e)) from None
    return v


@functools.lru_cache(maxsize=1 << 16)
def _ip(v: str) -> str:
    # Cached: every decode of a Pod, Service, Endpoints or EndpointSlice checks its IPs,
    # and at 10,000 Services the same few thousand strings came by ~100,000 times
    # (ipaddress's parser was a sixth of a controller's decode time). Errors are
    # not cached; they raise each time.
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address") from None


def _cidr(v: str) -> str:
    try:
        return str(ipaddress.ip_network(v, strict=True))
    except ValueError as e:
        raise ValueError(f"{v!r} is not a CIDR network ({e})") from None


DNSLabel = Annotated[str, AfterValidator(_dns1123_label)]
DNSSubdomain = Annotated[str, AfterValidator(_dns1123_subdomain)]
DNS1035Label = Annotated[str, AfterValidator(_dns1035_label)]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]
Quantity = Annotated[str | int | float, AfterValidator(_quantity)]
IPAddress = Annotated[str, AfterValidator(_ip)]
CIDR = Annotated[str, AfterValidator(_cidr)]
Port = Annotated[int, Field(ge=1, le=65535)]
Protocol = Literal["TCP", "UDP", "SCTP"]


# A Kubernetes field corral does not act on: any JSON value, kept as given, so what a
# real API server or client sends round-trips instead of being refused or dropped.
# Fields Kubernetes does not have are still refused ("unknown field").
Kept = Any


class Model(BaseModel):
    """Strict base: unknown fields are errors; camelCase on the wire."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=False,
        strict=True,  # "3" is not a number of replicas, as in Kubernetes
    )

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------- metadata


class OwnerReference(Model):
    api_version: str
    kind: str
    name: str
    uid: str
    controller: bool | None = None
    block_owner_deletion: bool | None = None


class ManagedFieldsEntry(Model):
    """Who set which fields (server-side apply's bookkeeping), kept as written."""

    manager: str | None = None
    operation: Literal["Apply", "Update"] | None = None
    api_version: str | None = None
    time: str | None = None
    fields_type: str | None = None
    fields_v1: dict[str, Any] | None = Field(default=None, alias="fieldsV1")
    subresource: str | None = None


class ObjectMeta(Model):
    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    deletion_grace_period_seconds: int | None = None
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    owner_references: list[OwnerReference] = Field(default_factory=list)
    finalizers: list[str] = Field(default_factory=list)
    managed_fields: list[ManagedFieldsEntry] | None = None
    self_link: str | None = None

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str | None) -> str | None:
        return None if v is None else _dns1123_label(v)


class TypedObject(Model):
    """An object with apiVersion/kind/metadata, stored under one etcd key."""

    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    KIND: ClassVar[str] = ""
    PLURAL: ClassVar[str] = ""
    NAMESPACED: ClassVar[bool] = True
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()
    NAME_RULE: ClassVar[Any] = staticmethod(_dns1123_subdomain)

    api_version: str = "v1"
    kind: str = ""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @model_validator(mode="after")
    def _check_type(self) -> TypedObject:
        cls = type(self)
        if not self.kind:
            self.kind = cls.KIND
        if self.kind != cls.KIND:
            raise ValueError(f"kind must be {cls.KIND!r}, not {self.kind!r}")
        if self.api_version not in cls.API_VERSIONS:
            raise ValueError(
                f"apiVersion {self.api_version!r} is not served for {cls.KIND}; "
                f"use {' or '.join(cls.API_VERSIONS)}"
            )
        if self.metadata.name is not None:
            cls.NAME_RULE(self.metadata.name)
        if cls.NAMESPACED:
            if self.metadata.namespace is None:
                self.metadata.namespace = "default"
        elif self.metadata.namespace is not None:
            raise ValueError(f"{cls.KIND} is not namespaced; remove metadata.namespace")
        return self

    @property
    def name(self) -> str:
        return self.metadata.name or ""

    @property
    def namespace(self) -> str | None:
        return self.metadata.namespace

    @property
    def key_name(self) -> str:
        """`namespace/name` for namespaced kinds, `name` otherwise."""
        if self.NAMESPACED:
            return f"{self.metadata.namespace}/{self.metadata.name}"
        return self.name


# ---------------------------------------------------------------- pods


_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def config_key(v: str) -> str:
    """A ConfigMap or Secret key (also an env name taken from envFrom)."""
    if not v or len(v) > 253 or not _CONFIG_KEY.match(v) or v in (".", ".."):
        raise ValueError(
            f"{v!r}: a valid config key must consist of alphanumeric characters, '-', '_' "
            "or '.' (at most 253), and not be '.' or '..'"
        )
    return v


ConfigKey = Annotated[str, AfterValidator(config_key)]

# fieldRef paths (pkg/apis/core/validation): env takes single labels/annotations,
# a downwardAPI volume whole maps, and only env the spec/status ones.
ENV_FIELD_PATHS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
)
VOLUME_FIELD_PATHS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "metadata.labels",
    "metadata.annotations",
)
RESOURCE_FIELDS = (
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.ephemeral-storage",
)
_SUBSCRIPTED = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def check_field_path(path: str, allowed: tuple[str, ...]) -> str:
    m = _SUBSCRIPTED.match(path)
    if m:
        (_labels if m[1] == "labels" else lambda d: d)({m[2]: ""})
        return path
    if path not in allowed:
        raise ValueError(
            f"fieldPath: Unsupported value: {path!r}: supported values: "
            + ", ".join(f'"{p}"' for p in allowed)
            + ", \"metadata.labels['<KEY>']\", \"metadata.annotations['<KEY>']\""
        )
    return path


class ObjectFieldSelector(Model):
    api_version: str | None = None
    field_path: str


class ResourceFieldSelector(Model):
    container_name: str | None = None
    resource: Literal[RESOURCE_FIELDS]  # type: ignore[valid-type]
    divisor: Quantity | None = None

    @field_validator("divisor")
    @classmethod
    def _divisor(cls, v: Quantity | None) -> Quantity | None:
        if v is not None and parse_quantity(v) <= 0:
            raise ValueError("divisor must be more than 0")
        return v


class ConfigMapKeySelector(Model):
    name: str
    key: ConfigKey
    optional: bool | None = None


class SecretKeySelector(Model):
    name: str
    key: ConfigKey
    optional: bool | None = None


class EnvVarSource(Model):
    field_ref: ObjectFieldSelector | None = None
    resource_field_ref: ResourceFieldSelector | None = None
    config_map_key_ref: ConfigMapKeySelector | None = None
    secret_key_ref: SecretKeySelector | None = None
    file_key_ref: Kept = None

    @model_validator(mode="after")
    def _one(self) -> EnvVarSource:
        n = sum(
            x is not None
            for x in (
                self.field_ref,
                self.resource_field_ref,
                self.config_map_key_ref,
                self.secret_key_ref,
                self.file_key_ref,
            )
        )
        if n != 1:
            raise ValueError(
                "valueFrom: may not have more than one field specified at a time (one of "
                "fieldRef, resourceFieldRef, configMapKeyRef or secretKeyRef)"
            )
        if self.file_key_ref is not None:
            raise ValueError("valueFrom.fileKeyRef: not supported by corral")
        if self.field_ref is not None:
            check_field_path(self.field_ref.field_path, ENV_FIELD_PATHS)
        return self


class EnvVar(Model):
    name: str = Field(min_length=1)
    value: str = ""
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value and self.value_from is not None:
            raise ValueError(
                f"env[{self.name}].valueFrom: may not be specified when `value` is not empty"
            )
        return self


class ConfigMapEnvSource(Model):
    name: str
    optional: bool | None = None


class SecretEnvSource(Model):
    name: str
    optional: bool | None = None


class EnvFromSource(Model):
    prefix: str | None = None
    config_map_ref: ConfigMapEnvSource | None = None
    secret_ref: SecretEnvSource | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvFromSource:
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("envFrom: exactly one of configMapRef or secretRef is required")
        return self


# ---------------------------------------------------------------- volumes


def _relative_path(v: str) -> str:
    """A path inside a volume: relative, no '..' element (validateLocalDescendingPath)."""
    if not v:
        raise ValueError("path: must not be empty")
    if v.startswith("/"):
        raise ValueError(f"path {v!r}: must be a relative path")
    if ".." in v.split("/"):
        raise ValueError(f"path {v!r}: must not contain '..'")
    return v


def _mode(v: int | None) -> int | None:
    if v is not None and not 0 <= v <= 0o777:
        raise ValueError(f"{v}: must be a number between 0 and 0777 (octal), both inclusive")
    return v


RelativePath = Annotated[str, AfterValidator(_relative_path)]
FileMode = Annotated[int | None, AfterValidator(_mode)]


class KeyToPath(Model):
    key: ConfigKey
    path: RelativePath
    mode: FileMode = None


class ConfigMapVolumeSource(Model):
    name: str
    items: list[KeyToPath] = Field(default_factory=list)
    default_mode: FileMode = None
    optional: bool | None = None


class SecretVolumeSource(Model):
    secret_name: str
    items: list[KeyToPath] = Field(default_factory=list)
    default_mode: FileMode = None
    optional: bool | None = None


class DownwardAPIVolumeFile(Model):
    path: RelativePath
    field_ref: ObjectFieldSelector | None = None
    resource_field_ref: ResourceFieldSelector | None = None
    mode: FileMode = None

    @model_validator(mode="after")
    def _one(self) -> DownwardAPIVolumeFile:
        if (self.field_ref is None) == (self.resource_field_ref is None):
            raise ValueError(f"items[{self.path}]: exactly one of fieldRef or resourceFieldRef")
        if self.field_ref is not None:
            check_field_path(self.field_ref.field_path, VOLUME_FIELD_PATHS)
        if self.resource_field_ref is not None and not self.resource_field_ref.container_name:
            raise ValueError(f"items[{self.path}].resourceFieldRef.containerName: Required value")
        return self


class DownwardAPIVolumeSource(Model):
    items: list[DownwardAPIVolumeFile] = Field(default_factory=list)
    default_mode: FileMode = None


class ConfigMapProjection(Model):
    name: str
    items: list[KeyToPath] = Field(default_factory=list)
    optional: bool | None = None


class SecretProjection(Model):
    name: str
    items: list[KeyToPath] = Field(default_factory=list)
    optional: bool | None = None


class DownwardAPIProjection(Model):
    items: list[DownwardAPIVolumeFile] = Field(default_factory=list)


class VolumeProjection(Model):
    config_map: ConfigMapProjection | None = None
    secret: SecretProjection | None = None
    downward_api: DownwardAPIProjection | None = Field(default=None, alias="downwardAPI")
    service_account_token: Kept = None
    cluster_trust_bundle: Kept = None

    @model_validator(mode="after")
    def _one(self) -> VolumeProjection:
        # serviceAccountToken and clusterTrustBundle are accepted (a real cluster's pods
        # round-trip); the node refuses to mount them (runtime/volumes.py).
        n = sum(
            x is not None
            for x in (
                self.config_map,
                self.secret,
                self.downward_api,
                self.service_account_token,
                self.cluster_trust_bundle,
            )
        )
        if n != 1:
            raise ValueError(
                "sources: each source needs exactly one of configMap, secret, downwardAPI, "
                "serviceAccountToken or clusterTrustBundle"
            )
        return self


class ProjectedVolumeSource(Model):
    sources: list[VolumeProjection] = Field(default_factory=list)
    default_mode: FileMode = None


class EmptyDirVolumeSource(Model):
    medium: Literal["", "Memory"] = ""
    size_limit: Quantity | None = None


HOST_PATH_TYPES = (
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
)


class HostPathVolumeSource(Model):
    path: str
    type: Literal[HOST_PATH_TYPES] = ""  # type: ignore[valid-type]

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r}: must be an absolute path")
        if ".." in v.split("/"):
            raise ValueError(f"{v!r}: must not contain '..'")
        return v


VOLUME_SOURCES = ("emptyDir", "configMap", "secret", "downwardAPI", "projected", "hostPath")


class Volume(Model):
    name: DNSLabel
    empty_dir: EmptyDirVolumeSource | None = None
    config_map: ConfigMapVolumeSource | None = None
    secret: SecretVolumeSource | None = None
    downward_api: DownwardAPIVolumeSource | None = Field(default=None, alias="downwardAPI")
    projected: ProjectedVolumeSource | None = None
    host_path: HostPathVolumeSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        n = sum(getattr(self, f) is not None for f in self.source_fields())
        if n != 1:
            raise ValueError(
                f"volumes[{self.name}]: must specify exactly one volume source "
                f"({', '.join(VOLUME_SOURCES)})"
            )
        return self

    @staticmethod
    def source_fields() -> tuple[str, ...]:
        return ("empty_dir", "config_map", "secret", "downward_api", "projected", "host_path")

    @property
    def kind(self) -> str:
        """The source's wire name (emptyDir, configMap, ...)."""
        for f, wire in zip(self.source_fields(), VOLUME_SOURCES, strict=True):
            if getattr(self, f) is not None:
                return wire
        return ""


class VolumeMount(Model):
    name: str
    mount_path: str
    read_only: bool | None = None
    sub_path: str | None = None
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    mount_propagation: Kept = None
    sub_path_expr: Kept = None
    recursive_read_only: Kept = None

    @field_validator("mount_path")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"{v!r}: must be an absolute path")
        if ".." in v.split("/"):
            raise ValueError(f"{v!r}: must not contain '..'")
        return v

    @field_validator("sub_path")
    @classmethod
    def _sub(cls, v: str | None) -> str | None:
        return None if not v else _relative_path(v)


class ContainerPort(Model):
    name: Annotated[str, Field(max_length=15, pattern=_IANA_SVC_NAME.pattern)] | None = None
    container_port: Port
    protocol: Protocol = "TCP"
    host_port: Port | None = None
    host_ip: IPAddress | None = Field(default=None, alias="hostIP")


class ResourceRequirements(Model):
    requests: dict[Literal["cpu", "memory", "pods", "ephemeral-storage"], Quantity] = Field(
        default_factory=dict
    )
    limits: dict[Literal["cpu", "memory", "pods", "ephemeral-storage"], Quantity] = Field(
        default_factory=dict
    )
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    claims: Kept = None


def _check_requests_within_limits(r: ResourceRequirements) -> ResourceRequirements:
    for res, req in r.requests.items():
        lim = r.limits.get(res)
        if lim is not None and parse_quantity(req) > parse_quantity(lim):
            raise ValueError(f"requests.{res} {req} is more than limits.{res} {lim}")
    return r


class ExecAction(Model):
    command: list[str] = Field(min_length=1)


class TCPSocketAction(Model):
    port: Port | str
    host: str | None = None


class HTTPHeader(Model):
    name: str
    value: str


class HTTPGetAction(Model):
    path: str = "/"
    port: Port | str
    host: str | None = None
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"
    http_headers: list[HTTPHeader] = Field(default_factory=list)


class Probe(Model):
    exec: ExecAction | None = None
    tcp_socket: TCPSocketAction | None = None
    http_get: HTTPGetAction | None = None
    initial_delay_seconds: int = Field(default=0, ge=0)
    period_seconds: int = Field(default=10, ge=1)
    timeout_seconds: int = Field(default=1, ge=1)
    success_threshold: int = Field(default=1, ge=1)
    failure_threshold: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_handler(self) -> Probe:
        n = sum(x is not None for x in (self.exec, self.tcp_socket, self.http_get))
        if n != 1:
            raise ValueError("a probe needs exactly one of exec, tcpSocket or httpGet")
        return self


# Linux capabilities by number (include/uapi/linux/capability.h), without the CAP_ prefix.
CAPABILITIES: tuple[str, ...] = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip


def capability_name(v: str) -> str:
    """`NET_ADMIN`, `CAP_NET_ADMIN` (any case) or `ALL` -> the bare upper-case name."""
    name = v.upper().removeprefix("CAP_")
    if name != "ALL" and name not in CAPABILITIES:
        raise ValueError(
            f"{v!r} is not a Linux capability: use a name such as NET_ADMIN or CAP_NET_RAW, or ALL"
        )
    return name


Capability = Annotated[str, AfterValidator(capability_name)]
UserID = Annotated[int, Field(ge=0, le=2**31 - 1)]


class Capabilities(Model):
    add: list[Capability] = Field(default_factory=list)
    drop: list[Capability] = Field(default_factory=list)


class SeccompProfile(Model):
    """RuntimeDefault: corral's filter (docs/runtime.md); Unconfined: none. There are no
    Localhost profiles."""

    type: Literal["RuntimeDefault", "Unconfined"]


class PodSecurityContext(Model):
    """spec.securityContext: as in Kubernetes, only the user and seccomp settings live at
    pod level (each container's own securityContext overrides them)."""

    run_as_user: UserID | None = None
    run_as_group: UserID | None = None
    run_as_non_root: bool | None = None
    seccomp_profile: SeccompProfile | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PodSecurityContext:
        if self.run_as_non_root and self.run_as_user == 0:
            raise ValueError("securityContext.runAsNonRoot is true but runAsUser is 0 (root)")
        return self


class SecurityContext(PodSecurityContext):
    """A container's securityContext (what the runtime applies: see docs/runtime.md)."""

    privileged: bool | None = None
    capabilities: Capabilities | None = None
    read_only_root_filesystem: bool | None = None
    allow_privilege_escalation: bool | None = None

    @model_validator(mode="after")
    def _escalation(self) -> SecurityContext:
        if self.allow_privilege_escalation is False:
            if self.privileged:
                raise ValueError(
                    "securityContext: cannot set allowPrivilegeEscalation to false and "
                    "privileged to true"
                )
            if self.capabilities is not None and {"SYS_ADMIN", "ALL"} & set(self.capabilities.add):
                raise ValueError(
                    "securityContext: cannot set allowPrivilegeEscalation to false and "
                    "add CAP_SYS_ADMIN in capabilities.add"
                )
        return self


class LifecycleHandler(Model):
    """What a lifecycle hook runs: a command in the container, or an HTTP GET to it."""

    exec: ExecAction | None = None
    http_get: HTTPGetAction | None = None

    @model_validator(mode="after")
    def _one_handler(self) -> LifecycleHandler:
        if (self.exec is None) == (self.http_get is None):
            raise ValueError("lifecycle.preStop needs exactly one of exec or httpGet")
        return self


class Lifecycle(Model):
    """Only preStop: it runs before SIGTERM, within terminationGracePeriodSeconds."""

    pre_stop: LifecycleHandler | None = None


class Container(Model):
    name: DNSLabel
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    working_dir: str | None = None
    env: list[EnvVar] = Field(default_factory=list)
    ports: list[ContainerPort] = Field(default_factory=list)
    resources: Annotated[ResourceRequirements, AfterValidator(_check_requests_within_limits)] = (
        Field(default_factory=ResourceRequirements)
    )
    readiness_probe: Probe | None = None
    liveness_probe: Probe | None = None
    startup_probe: Probe | None = None
    security_context: SecurityContext | None = None
    lifecycle: Lifecycle | None = None
    env_from: list[EnvFromSource] = Field(default_factory=list)
    volume_mounts: list[VolumeMount] = Field(default_factory=list)
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    resize_policy: Kept = None
    restart_policy: Kept = None
    volume_devices: Kept = None
    termination_message_path: Kept = None
    termination_message_policy: Kept = None
    stdin: Kept = None
    stdin_once: Kept = None
    tty: Kept = None

    @model_validator(mode="after")
    def _has_command(self) -> Container:
        if not self.command:
            raise ValueError(
                "command is required: corral runs the command you give (an image is a plain "
                "root filesystem with no entrypoint of its own)"
            )
        return self


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not have a value")
        if not self.key and self.operator != "Exists":
            raise ValueError("a toleration without a key needs operator Exists")
        return self


class PodSpec(Model):
    containers: list[Container] = Field(min_length=1)
    # Run one after another, each to exit 0, before the containers start.
    init_containers: list[Container] = Field(default_factory=list)
    # The node's own network namespace: no CNI, podIP = hostIP (docs/runtime.md).
    host_network: bool = False
    restart_policy: Literal["Always", "OnFailure", "Never"] = "Always"
    node_name: str | None = None
    node_selector: Labels = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    termination_grace_period_seconds: int = Field(default=30, ge=0)
    hostname: DNSLabel | None = None
    subdomain: DNSLabel | None = None
    dns_policy: Literal["ClusterFirst", "Default", "None", "ClusterFirstWithHostNet"] = (
        "ClusterFirst"
    )
    scheduler_name: str | None = None
    priority: int | None = None
    security_context: PodSecurityContext | None = None
    volumes: list[Volume] = Field(default_factory=list)
    service_account_name: str | None = None
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    ephemeral_containers: Kept = None
    active_deadline_seconds: Kept = None
    service_account: Kept = None
    automount_service_account_token: Kept = None
    host_pid: Kept = Field(default=None, alias="hostPID")
    host_ipc: Kept = Field(default=None, alias="hostIPC")
    share_process_namespace: Kept = None
    image_pull_secrets: Kept = None
    affinity: Kept = None
    host_aliases: Kept = None
    priority_class_name: Kept = None
    dns_config: Kept = None
    readiness_gates: Kept = None
    runtime_class_name: Kept = None
    enable_service_links: Kept = None
    preemption_policy: Kept = None
    overhead: Kept = None
    topology_spread_constraints: Kept = None
    set_hostname_as_fqdn: Kept = Field(default=None, alias="setHostnameAsFQDN")
    os: Kept = None
    host_users: Kept = None
    scheduling_gates: Kept = None
    resource_claims: Kept = None
    resources: Kept = None

    @field_validator("containers")
    @classmethod
    def _unique_names(cls, v: list[Container]) -> list[Container]:
        seen: set[str] = set()
        for c in v:
            if c.name in seen:
                raise ValueError(f"container name {c.name!r} is used twice")
            seen.add(c.name)
        return v

    @model_validator(mode="after")
    def _volumes(self) -> PodSpec:
        """Volume names unique; every mount names a volume, once per path (the messages
        name the field as Kubernetes' validation does)."""
        names: set[str] = set()
        for i, v in enumerate(self.volumes):
            if v.name in names:
                raise ValueError(f"volumes[{i}].name: Duplicate value: {v.name!r}")
            names.add(v.name)
        for group, cs in (
            ("containers", self.containers),
            ("initContainers", self.init_containers),
        ):
            for ci, c in enumerate(cs):
                paths: set[str] = set()
                for mi, m in enumerate(c.volume_mounts):
                    where = f"{group}[{ci}].volumeMounts[{mi}]"
                    if m.name not in names:
                        raise ValueError(
                            f"{where}.name: Not found: {m.name!r} (no volume of that name in "
                            "spec.volumes)"
                        )
                    if m.mount_path in paths:
                        raise ValueError(
                            f"{where}.mountPath: Invalid value: {m.mount_path!r}: must be unique"
                        )
                    paths.add(m.mount_path)
                for r in c.env:
                    ref = r.value_from.resource_field_ref if r.value_from else None
                    if ref is not None and ref.container_name not in (None, "", c.name):
                        raise ValueError(
                            f"{group}[{ci}].env[{r.name}].valueFrom.resourceFieldRef."
                            f"containerName: Invalid value: {ref.container_name!r}: must be "
                            "the container's own name"
                        )
        every = {c.name for c in (*self.containers, *self.init_containers)}
        for i, v in enumerate(self.volumes):
            files = []
            if v.downward_api is not None:
                files = v.downward_api.items
            elif v.projected is not None:
                files = [
                    f for s in v.projected.sources if s.downward_api for f in s.downward_api.items
                ]
            for f in files:
                ref = f.resource_field_ref
                if ref is not None and ref.container_name not in every:
                    raise ValueError(
                        f"volumes[{i}]: resourceFieldRef.containerName: Not found: "
                        f"{ref.container_name!r}"
                    )
        return self

    @model_validator(mode="after")
    def _init_containers(self) -> PodSpec:
        names = {c.name for c in self.containers}
        seen: set[str] = set()
        for c in self.init_containers:
            if c.name in names or c.name in seen:
                raise ValueError(
                    f"initContainers: container name {c.name!r} is used twice "
                    "(init and app containers share one name space)"
                )
            seen.add(c.name)
            for probe in ("readiness_probe", "liveness_probe", "startup_probe"):
                if getattr(c, probe) is not None:
                    field = "".join(w.title() if i else w for i, w in enumerate(probe.split("_")))
                    raise ValueError(
                        f"initContainers[{c.name}].{field}: init containers run to completion "
                        "and take no probes"
                    )
            if c.lifecycle is not None:
                raise ValueError(f"initContainers[{c.name}].lifecycle: not for init containers")
        return self


class PodCondition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    last_probe_time: Kept = None
    observed_generation: Kept = None


class ContainerStatus(Model):
    name: str
    ready: bool = False
    started: bool | None = None
    restart_count: int = 0
    state: dict[str, Any] = Field(default_factory=dict)
    last_state: dict[str, Any] = Field(default_factory=dict)
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    image: Kept = None
    image_id: Kept = Field(default=None, alias="imageID")
    container_id: Kept = Field(default=None, alias="containerID")
    allocated_resources: Kept = None
    allocated_resources_status: Kept = None
    resources: Kept = None
    volume_mounts: Kept = None
    user: Kept = None
    stop_signal: Kept = None


class PodIP(Model):
    ip: IPAddress


class PodStatus(Model):
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"] = "Pending"
    reason: str | None = None
    message: str | None = None
    host_ip: IPAddress | None = Field(default=None, alias="hostIP")
    pod_ip: IPAddress | None = Field(default=None, alias="podIP")
    pod_ips: list[PodIP] = Field(default_factory=list, alias="podIPs")
    start_time: str | None = None
    conditions: list[PodCondition] = Field(default_factory=list)
    init_container_statuses: list[ContainerStatus] = Field(default_factory=list)
    container_statuses: list[ContainerStatus] = Field(default_factory=list)
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    nominated_node_name: Kept = None
    host_ips: Kept = Field(default=None, alias="hostIPs")
    qos_class: Kept = None
    ephemeral_container_statuses: Kept = None
    resize: Kept = None
    resource_claim_statuses: Kept = None
    observed_generation: Kept = None

    def condition(self, type_: str) -> PodCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class Pod(TypedObject):
    KIND: ClassVar[str] = "Pod"
    PLURAL: ClassVar[str] = "pods"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("po", "pod")

    spec: PodSpec
    status: PodStatus = Field(default_factory=PodStatus)

    @property
    def ready(self) -> bool:
        c = self.status.condition("Ready")
        return c is not None and c.status == "True"


class PodTemplateSpec(Model):
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PodSpec


# ---------------------------------------------------------------- services


class ServicePort(Model):
    name: DNSLabel | None = None
    protocol: Protocol = "TCP"
    app_protocol: str | None = None
    port: Port
    target_port: Port | str | None = None
    node_port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @field_validator("target_port")
    @classmethod
    def _named(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, str) and (len(v) > 15 or not _IANA_SVC_NAME.match(v)):
            raise ValueError(f"{v!r} is neither a port number nor a valid port name")
        return v


class ClientIPConfig(Model):
    timeout_seconds: int = Field(default=10800, ge=1, le=86400)


class SessionAffinityConfig(Model):
    client_ip: ClientIPConfig = Field(default_factory=ClientIPConfig, alias="clientIP")


class ServiceSpec(Model):
    type: Literal["ClusterIP", "NodePort", "ExternalName", "LoadBalancer"] = "ClusterIP"
    selector: Labels | None = None
    ports: list[ServicePort] = Field(default_factory=list)
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    cluster_ips: list[str] = Field(default_factory=list, alias="clusterIPs")
    external_name: str | None = None
    external_ips: list[IPAddress] = Field(default_factory=list, alias="externalIPs")
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    publish_not_ready_addresses: bool = False
    external_traffic_policy: Literal["Cluster", "Local"] | None = None
    internal_traffic_policy: Literal["Cluster", "Local"] | None = None
    ip_families: list[Literal["IPv4", "IPv6"]] = Field(default_factory=list)
    ip_family_policy: Literal["SingleStack", "PreferDualStack", "RequireDualStack"] | None = None
    load_balancer_ip: IPAddress | None = Field(default=None, alias="loadBalancerIP")
    load_balancer_class: str | None = None
    health_check_node_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    # refused unless empty/true: corral has no source filtering, and its
    # LoadBalancer delivers through node ports (see _not_implemented)
    load_balancer_source_ranges: list[str] | None = None
    allocate_load_balancer_node_ports: bool | None = None
    # a topology hint (PreferClose): with no zones every endpoint is as close as any,
    # so kube-proxy's answer without hints (all endpoints) is the one corral gives
    traffic_distribution: Kept = None

    @field_validator("cluster_ip")
    @classmethod
    def _cluster_ip(cls, v: str | None) -> str | None:
        if v in (None, "", "None"):
            return v
        return _ip(v)

    # Fields Kubernetes has and corral does not implement are refused here, with the
    # reason, rather than accepted and ignored (every writer validates this model:
    # the API server, `corral apply`/`expose`, manifests).

    @field_validator("ip_families")
    @classmethod
    def _ipv4_only(cls, v: list[str]) -> list[str]:
        if "IPv6" in v or len(v) > 1:
            raise ValueError(
                f"{v}: this cluster is IPv4-only (no dual-stack): use [IPv4] or leave it out"
            )
        return v

    @field_validator("ip_family_policy")
    @classmethod
    def _single_stack(cls, v: str | None) -> str | None:
        if v == "RequireDualStack":
            raise ValueError(
                "RequireDualStack needs a dual-stack cluster and this one is IPv4-only: "
                "use SingleStack or PreferDualStack (which gets IPv4 only)"
            )
        return v

    @field_validator("cluster_ips")
    @classmethod
    def _one_cluster_ip(cls, v: list[str]) -> list[str]:
        if len(v) > 1:
            raise ValueError(f"{v}: one address only (this cluster is IPv4-only)")
        for ip in v:
            if ip not in ("", "None") and ":" in _ip(ip):
                raise ValueError(f"{ip}: this cluster is IPv4-only")
        return v

    @field_validator("external_ips", "load_balancer_ip")
    @classmethod
    def _ipv4(cls, v: Any) -> Any:
        for ip in v if isinstance(v, list) else [v] if v else []:
            if ":" in ip:
                raise ValueError(f"{ip}: this cluster is IPv4-only")
        return v

    @field_validator("load_balancer_source_ranges")
    @classmethod
    def _no_source_ranges(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError(
                "not implemented: corral's proxy does not filter LoadBalancer clients by "
                "source; leave it out"
            )
        return v

    @field_validator("allocate_load_balancer_node_ports")
    @classmethod
    def _node_ports_kept(cls, v: bool | None) -> bool | None:
        if v is False:
            raise ValueError(
                "false is not implemented: corral's LoadBalancer services always get "
                "node ports; leave it out or set true"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ServiceSpec:
        if self.type == "ExternalName":
            if not self.external_name:
                raise ValueError("spec.externalName is required when type is ExternalName")
            _dns1123_subdomain(self.external_name.rstrip("."))
            return self
        if self.external_name:
            raise ValueError("spec.externalName is only allowed when type is ExternalName")
        headless = self.cluster_ip == "None"
        if not self.ports and not headless:
            raise ValueError(
                "spec.ports must list at least one port (only headless "
                "services, clusterIP: None, may have none)"
            )
        if headless and self.type != "ClusterIP":
            raise ValueError("clusterIP: None (headless) needs type ClusterIP")
        names = [p.name for p in self.ports]
        if len(self.ports) > 1 and (None in names or len(set(names)) != len(names)):
            raise ValueError("when a service has several ports, each needs a unique name")
        seen: set[tuple[int, str]] = set()
        for p in self.ports:
            if (p.port, p.protocol) in seen:
                raise ValueError(f"port {p.port}/{p.protocol} is listed twice")
            seen.add((p.port, p.protocol))
            if p.node_port is not None and self.type not in ("NodePort", "LoadBalancer"):
                raise ValueError("nodePort may only be set when type is NodePort or LoadBalancer")
        external = self.type in ("NodePort", "LoadBalancer") or bool(self.external_ips)
        if self.external_traffic_policy is not None and not external:
            raise ValueError(
                "spec.externalTrafficPolicy may only be set for NodePort or LoadBalancer "
                "services or ones with spec.externalIPs"
            )
        if self.type != "LoadBalancer":
            for attr, wire in (
                ("health_check_node_port", "healthCheckNodePort"),
                ("load_balancer_class", "loadBalancerClass"),
                ("load_balancer_ip", "loadBalancerIP"),
            ):
                if getattr(self, attr) is not None:
                    raise ValueError(f"spec.{wire} may only be set when type is LoadBalancer")
        elif self.external_traffic_policy != "Local":
            # kube's rule on update: the health check port goes with the Local policy
            self.health_check_node_port = None
        if self.session_affinity == "ClientIP" and self.session_affinity_config is None:
            self.session_affinity_config = SessionAffinityConfig()
        if self.session_affinity == "None" and self.session_affinity_config is not None:
            raise ValueError("sessionAffinityConfig needs sessionAffinity: ClientIP")
        return self

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


class LoadBalancerStatus(Model):
    ingress: list[dict[str, Any]] = Field(default_factory=list)


class ServiceStatus(Model):
    load_balancer: LoadBalancerStatus = Field(default_factory=LoadBalancerStatus)
    conditions: Kept = None


class Service(TypedObject):
    KIND: ClassVar[str] = "Service"
    PLURAL: ClassVar[str] = "services"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("svc", "service")
    NAME_RULE: ClassVar[Any] = staticmethod(_dns1035_label)

    spec: ServiceSpec
    status: ServiceStatus = Field(default_factory=ServiceStatus)


# ---------------------------------------------------------------- endpoints


class ObjectReference(Model):
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None
    api_version: str | None = None
    resource_version: str | None = None
    field_path: str | None = None


class EndpointAddress(Model):
    ip: IPAddress
    hostname: DNSLabel | None = None
    node_name: str | None = None
    target_ref: ObjectReference | None = None


class EndpointPort(Model):
    name: str | None = None
    port: Port
    protocol: Protocol = "TCP"
    app_protocol: str | None = None


class EndpointSubset(Model):
    addresses: list[EndpointAddress] = Field(default_factory=list)
    not_ready_addresses: list[EndpointAddress] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)


class Endpoints(TypedObject):
    """The v1 Endpoints shape: ready addresses and not-ready ones per subset."""

    KIND: ClassVar[str] = "Endpoints"
    PLURAL: ClassVar[str] = "endpoints"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ep", "endpoint")

    subsets: list[EndpointSubset] = Field(default_factory=list)


class EndpointConditions(Model):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class Endpoint(Model):
    addresses: list[IPAddress] = Field(min_length=1)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    hostname: DNSLabel | None = None
    node_name: str | None = None
    target_ref: ObjectReference | None = None
    zone: str | None = None
    hints: Kept = None  # topology-aware routing's: the proxy ignores them
    deprecated_topology: dict[str, str] | None = None


class EndpointSlice(TypedObject):
    """discovery.k8s.io/v1 shape: each endpoint carries ready/serving/terminating."""

    API_VERSIONS: ClassVar[tuple[str, ...]] = ("discovery.k8s.io/v1",)
    KIND: ClassVar[str] = "EndpointSlice"
    PLURAL: ClassVar[str] = "endpointslices"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("endpointslice",)

    api_version: str = "discovery.k8s.io/v1"
    address_type: Literal["IPv4", "IPv6", "FQDN"] = "IPv4"
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)


# ---------------------------------------------------------------- nodes


class Taint(Model):
    key: str
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]
    time_added: str | None = None


class NodeSpec(Model):
    pod_cidr: CIDR | None = Field(default=None, alias="podCIDR")
    pod_cidrs: list[CIDR] = Field(default_factory=list, alias="podCIDRs")
    taints: list[Taint] = Field(default_factory=list)
    unschedulable: bool = False
    provider_id: str | None = Field(default=None, alias="providerID")
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    config_source: Kept = None
    external_id: Kept = Field(default=None, alias="externalID")


class NodeAddress(Model):
    type: Literal["InternalIP", "ExternalIP", "Hostname", "InternalDNS", "ExternalDNS"]
    address: str


class NodeCondition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_heartbeat_time: str | None = None
    last_transition_time: str | None = None


class NodeStatus(Model):
    addresses: list[NodeAddress] = Field(default_factory=list)
    capacity: dict[str, Quantity] = Field(default_factory=dict)
    allocatable: dict[str, Quantity] = Field(default_factory=dict)
    conditions: list[NodeCondition] = Field(default_factory=list)
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    phase: Kept = None
    daemon_endpoints: Kept = None
    node_info: Kept = None
    images: Kept = None
    volumes_in_use: Kept = None
    volumes_attached: Kept = None
    config: Kept = None
    runtime_handlers: Kept = None
    features: Kept = None

    def address(self, type_: str = "InternalIP") -> str | None:
        return next((a.address for a in self.addresses if a.type == type_), None)

    def condition(self, type_: str) -> NodeCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class Node(TypedObject):
    KIND: ClassVar[str] = "Node"
    PLURAL: ClassVar[str] = "nodes"
    NAMESPACED: ClassVar[bool] = False
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("no", "node")

    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)

    @property
    def ready(self) -> bool:
        c = self.status.condition("Ready")
        return c is not None and c.status == "True"


# ---------------------------------------------------------------- namespaces


class NamespaceCondition(Model):
    """Why a terminating namespace is not gone yet (NamespaceContentRemaining, ...)."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None


class NamespaceSpec(Model):
    finalizers: list[str] = Field(
        default_factory=list,
        description="Accepted for Kubernetes compatibility; corral's namespace controller "
        "is the only finalizer.",
    )


class NamespaceStatus(Model):
    phase: Literal["Active", "Terminating"] = Field(
        default="Active",
        description="Active, or Terminating once deleted: the namespace controller is "
        "removing what it holds, then the namespace.",
    )
    conditions: list[NamespaceCondition] = Field(default_factory=list)

    def condition(self, type_: str) -> NamespaceCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)


NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


class Namespace(TypedObject):
    """A scope for names: namespaced objects can only be created in one that exists.

    Deleting it deletes what it holds (pods gracefully), then the namespace itself.
    """

    KIND: ClassVar[str] = "Namespace"
    PLURAL: ClassVar[str] = "namespaces"
    NAMESPACED: ClassVar[bool] = False
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("ns", "namespace")
    NAME_RULE: ClassVar[Any] = staticmethod(_dns1123_label)

    spec: NamespaceSpec = Field(default_factory=NamespaceSpec)
    status: NamespaceStatus = Field(default_factory=NamespaceStatus)

    @model_validator(mode="after")
    def _name_label(self) -> Namespace:
        # What Kubernetes sets on every namespace (and NetworkPolicy selects by).
        if self.metadata.name and self.metadata.labels.get(NAMESPACE_NAME_LABEL) != self.name:
            self.metadata.labels[NAMESPACE_NAME_LABEL] = self.name
        return self

    @property
    def terminating(self) -> bool:
        return self.metadata.deletion_timestamp is not None or self.status.phase == "Terminating"


# ---------------------------------------------------------------- configuration

# What Kubernetes allows a ConfigMap's data or a Secret's (decoded) data to hold.
MAX_CONFIG_BYTES = 1024 * 1024


def _b64(key: str, v: str, field: str) -> bytes:
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}[{key}]: Invalid value: not valid base64") from None


class ConfigMap(TypedObject):
    """Configuration for pods: keys to UTF-8 strings (`data`) or bytes (`binaryData`,
    base64 on the wire), at most 1 MiB in all; `immutable: true` freezes it."""

    KIND: ClassVar[str] = "ConfigMap"
    PLURAL: ClassVar[str] = "configmaps"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("cm", "configmap")

    data: dict[ConfigKey, str] = Field(default_factory=dict)
    binary_data: dict[ConfigKey, str] = Field(default_factory=dict)
    immutable: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> ConfigMap:
        size = 0
        for k, v in self.data.items():
            size += len(k) + len(v.encode())
        for k, v in self.binary_data.items():
            if k in self.data:
                raise ValueError(f"binaryData[{k}]: Invalid value: duplicate of key {k!r} in data")
            size += len(k) + len(_b64(k, v, "binaryData"))
        if size > MAX_CONFIG_BYTES:
            raise ValueError(
                f"[]: Too long: must have at most {MAX_CONFIG_BYTES} bytes (data and binaryData "
                f"hold {size})"
            )
        return self

    def items(self) -> dict[str, bytes]:
        """Every key's value as bytes (data UTF-8 encoded, binaryData decoded)."""
        out = {k: v.encode() for k, v in self.data.items()}
        out.update({k: base64.b64decode(v) for k, v in self.binary_data.items()})
        return out


# Secret types and the keys each must have (pkg/apis/core/validation ValidateSecret).
SECRET_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "kubernetes.io/dockerconfigjson": (".dockerconfigjson",),
    "kubernetes.io/dockercfg": (".dockercfg",),
    "kubernetes.io/tls": ("tls.crt", "tls.key"),
    "kubernetes.io/ssh-auth": ("ssh-privatekey",),
}


class Secret(TypedObject):
    """Credentials for pods: `data` is base64 on the wire; `stringData` (write-only)
    is merged into it when written, as the API server does. At most 1 MiB decoded.
    The node keeps mounted secrets on tmpfs only (docs/runtime.md)."""

    KIND: ClassVar[str] = "Secret"
    PLURAL: ClassVar[str] = "secrets"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("secret",)

    type: str = "Opaque"
    data: dict[ConfigKey, str] = Field(default_factory=dict)
    string_data: dict[ConfigKey, str] | None = None
    immutable: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> Secret:
        if self.string_data:
            for k, v in self.string_data.items():
                self.data[k] = base64.b64encode(v.encode()).decode()
        self.string_data = None
        size = 0
        decoded = {}
        for k, v in self.data.items():
            decoded[k] = _b64(k, v, "data")
            size += len(decoded[k])
        if size > MAX_CONFIG_BYTES:
            raise ValueError(
                f"data: Too long: must have at most {MAX_CONFIG_BYTES} bytes (it holds {size})"
            )
        if not self.type:
            self.type = "Opaque"
        for key in SECRET_REQUIRED_KEYS.get(self.type, ()):
            if key not in self.data:
                raise ValueError(f"data[{key}]: Required value (a {self.type} secret needs it)")
        if self.type == "kubernetes.io/dockerconfigjson":
            try:
                doc = json.loads(decoded[".dockerconfigjson"])
            except ValueError as e:
                raise ValueError(f"data[.dockerconfigjson]: Invalid value: not JSON: {e}") from None
            if not isinstance(doc, dict):
                raise ValueError("data[.dockerconfigjson]: Invalid value: not a JSON object")
        if self.type == "kubernetes.io/basic-auth" and not (
            {"username", "password"} & set(self.data)
        ):
            raise ValueError("data[username]: Required value (or data[password])")
        if self.type == "kubernetes.io/service-account-token" and not self.metadata.annotations.get(
            "kubernetes.io/service-account.name"
        ):
            raise ValueError(
                "metadata.annotations[kubernetes.io/service-account.name]: Required value"
            )
        return self

    def items(self) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in self.data.items()}


def update_forbidden(old: TypedObject, new: TypedObject) -> list[tuple[str, str]]:
    """What an update may not change, as (field, message) pairs (empty: allowed):
    an immutable ConfigMap's or Secret's data, and a Secret's type."""
    out: list[tuple[str, str]] = []
    if isinstance(old, Secret) and isinstance(new, Secret) and old.type != new.type:
        out.append(("type", f"Invalid value: {new.type!r}: field is immutable"))
    if isinstance(old, ConfigMap | Secret) and old.immutable:
        frozen = "Forbidden: field is immutable when `immutable` is set"
        fields = ("data", "binary_data") if isinstance(old, ConfigMap) else ("data",)
        for f in fields:
            if getattr(old, f) != getattr(new, f):
                out.append((to_camel(f), frozen))
        if not new.immutable:  # type: ignore[union-attr]
            out.append(("immutable", frozen))
    return out


# ---------------------------------------------------------------- controllers


class ReplicationControllerSpec(Model):
    replicas: int = Field(default=1, ge=0)
    min_ready_seconds: int = Field(default=0, ge=0)
    selector: Labels | None = None
    template: PodTemplateSpec

    @model_validator(mode="after")
    def _selector(self) -> ReplicationControllerSpec:
        labels = self.template.metadata.labels
        if self.selector is None:
            if not labels:
                raise ValueError(
                    "spec.template.metadata.labels is required (the selector defaults to them)"
                )
            self.selector = dict(labels)
        if not self.selector:
            raise ValueError("spec.selector must not be empty")
        for k, v in self.selector.items():
            if labels.get(k) != v:
                raise ValueError(
                    f"spec.selector {k}={v} does not match spec.template.metadata.labels; "
                    "the controller would never see its own pods"
                )
        return self


class ReplicationControllerStatus(Model):
    replicas: int = 0
    ready_replicas: int = 0
    available_replicas: int = 0
    observed_generation: int | None = None
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    fully_labeled_replicas: Kept = None
    updated_replicas: Kept = None
    unavailable_replicas: Kept = None
    terminating_replicas: Kept = None
    collision_count: Kept = None
    conditions: Kept = None


class ReplicationController(TypedObject):
    KIND: ClassVar[str] = "ReplicationController"
    PLURAL: ClassVar[str] = "replicationcontrollers"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("rc", "replicationcontroller")

    spec: ReplicationControllerSpec
    status: ReplicationControllerStatus = Field(default_factory=ReplicationControllerStatus)


class LabelSelectorRequirement(Model):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelector(Model):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)


class DeploymentSpec(Model):
    replicas: int = Field(default=1, ge=0)
    selector: LabelSelector
    template: PodTemplateSpec
    min_ready_seconds: int = Field(default=0, ge=0)
    strategy: dict[str, Any] | None = None
    revision_history_limit: int | None = None
    # Kubernetes fields corral does not act on, kept round trip (see Kept)
    paused: Kept = None
    progress_deadline_seconds: Kept = None

    @model_validator(mode="after")
    def _selector(self) -> DeploymentSpec:
        if not self.selector.match_labels and not self.selector.match_expressions:
            raise ValueError("spec.selector must not be empty")
        labels = self.template.metadata.labels
        for k, v in self.selector.match_labels.items():
            if labels.get(k) != v:
                raise ValueError(
                    f"spec.selector.matchLabels {k}={v} does not match "
                    "spec.template.metadata.labels"
                )
        return self


class Deployment(TypedObject):
    """apps/v1 Deployment, kept by the replication controller as an alias."""

    API_VERSIONS: ClassVar[tuple[str, ...]] = ("apps/v1",)
    KIND: ClassVar[str] = "Deployment"
    PLURAL: ClassVar[str] = "deployments"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("deploy", "deployment")

    api_version: str = "apps/v1"
    spec: DeploymentSpec
    status: ReplicationControllerStatus = Field(default_factory=ReplicationControllerStatus)


# ---------------------------------------------------------------- network policy


class IPBlock(Model):
    cidr: str
    except_: list[str] = Field(default_factory=list, alias="except")

    @model_validator(mode="after")
    def _within(self) -> IPBlock:
        try:
            net = ipaddress.ip_network(self.cidr, strict=False)
        except ValueError as e:
            raise ValueError(f"ipBlock.cidr: {self.cidr!r} is not a CIDR ({e})") from None
        for x in self.except_:
            try:
                sub = ipaddress.ip_network(x, strict=False)
            except ValueError as e:
                raise ValueError(f"ipBlock.except: {x!r} is not a CIDR ({e})") from None
            if (
                sub.version != net.version
                or not sub.subnet_of(net)  # type: ignore[arg-type]
                or sub.prefixlen <= net.prefixlen
            ):
                raise ValueError(
                    f"ipBlock.except: {x} must be a strict subset of ipBlock.cidr {self.cidr}"
                )
        return self


class NetworkPolicyPeer(Model):
    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    @model_validator(mode="after")
    def _one(self) -> NetworkPolicyPeer:
        selectors = self.pod_selector is not None or self.namespace_selector is not None
        if self.ip_block is not None and selectors:
            raise ValueError("a peer may have ipBlock or podSelector/namespaceSelector, not both")
        if self.ip_block is None and not selectors:
            raise ValueError("a peer must have podSelector, namespaceSelector or ipBlock")
        for sel in (self.pod_selector, self.namespace_selector):
            for req in sel.match_expressions if sel else ():
                _check_requirement(req)
        return self


class NetworkPolicyPort(Model):
    protocol: Protocol = "TCP"
    port: int | str | None = None
    end_port: int | None = None

    @model_validator(mode="after")
    def _port(self) -> NetworkPolicyPort:
        if isinstance(self.port, int) and not 1 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} must be between 1 and 65535")
        if isinstance(self.port, str) and (
            len(self.port) > 15 or not _IANA_SVC_NAME.match(self.port)
        ):
            raise ValueError(f"port: {self.port!r} is neither a port number nor a port name")
        if self.end_port is not None:
            if not isinstance(self.port, int):
                raise ValueError("endPort: may only be set with a numeric port")
            if not self.port <= self.end_port <= 65535:
                raise ValueError(
                    f"endPort: {self.end_port} must be >= port {self.port} and <= 65535"
                )
        return self


class NetworkPolicyIngressRule(Model):
    ports: list[NetworkPolicyPort] = Field(default_factory=list)
    from_: list[NetworkPolicyPeer] = Field(default_factory=list, alias="from")


class NetworkPolicyEgressRule(Model):
    ports: list[NetworkPolicyPort] = Field(default_factory=list)
    to: list[NetworkPolicyPeer] = Field(default_factory=list)


class NetworkPolicySpec(Model):
    pod_selector: LabelSelector = Field(default_factory=LabelSelector)
    ingress: list[NetworkPolicyIngressRule] = Field(default_factory=list)
    egress: list[NetworkPolicyEgressRule] = Field(default_factory=list)
    policy_types: list[Literal["Ingress", "Egress"]] | None = None

    @model_validator(mode="after")
    def _types(self) -> NetworkPolicySpec:
        # Kubernetes' defaulting: Ingress always, Egress when there are egress rules.
        if not self.policy_types:
            self.policy_types = ["Ingress", *(["Egress"] if self.egress else [])]
        elif len(set(self.policy_types)) != len(self.policy_types):
            raise ValueError("policyTypes: each of Ingress and Egress at most once")
        for req in self.pod_selector.match_expressions:
            _check_requirement(req)
        return self


def _check_requirement(req: LabelSelectorRequirement) -> None:
    if req.operator in ("In", "NotIn") and not req.values:
        raise ValueError(f"matchExpressions {req.key}: {req.operator} needs values")
    if req.operator in ("Exists", "DoesNotExist") and req.values:
        raise ValueError(f"matchExpressions {req.key}: {req.operator} takes no values")


class NetworkPolicy(TypedObject):
    """networking.k8s.io/v1: which traffic the selected pods may receive and send."""

    API_VERSIONS: ClassVar[tuple[str, ...]] = ("networking.k8s.io/v1",)
    KIND: ClassVar[str] = "NetworkPolicy"
    PLURAL: ClassVar[str] = "networkpolicies"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("netpol", "networkpolicy")

    api_version: str = "networking.k8s.io/v1"
    spec: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)


# ---------------------------------------------------------------- network records


class BackendConfig(Model):
    type: Literal["vxlan"] = "vxlan"
    vni: int = Field(default=1, ge=1, le=16777215, alias="vni")
    port: Port = 4789
    direct_routing: bool = False
    mtu: int | None = Field(default=None, ge=576, le=9000, alias="mtu")


class NetworkSpec(Model):
    network: CIDR = "10.244.0.0/16"
    subnet_len: int = Field(default=24, ge=8, le=30)
    subnet_min: IPAddress | None = None
    subnet_max: IPAddress | None = None
    service_cidr: CIDR = Field(default="10.96.0.0/12", alias="serviceCIDR")
    cluster_dns: IPAddress = Field(default="10.96.0.10", alias="clusterDNS")
    cluster_domain: DNSSubdomain = "cluster.local"
    ip_masq: bool = True
    backend: BackendConfig = Field(default_factory=BackendConfig)

    @model_validator(mode="after")
    def _consistent(self) -> NetworkSpec:
        net = ipaddress.ip_network(self.network)
        svc = ipaddress.ip_network(self.service_cidr)
        if net.version != 4:
            raise ValueError("spec.network: only IPv4 networks are supported")
        if net.overlaps(svc):
            raise ValueError(
                f"spec.network {net} overlaps spec.serviceCIDR {svc}; "
                "pods and service VIPs need separate ranges"
            )
        if self.subnet_len <= net.prefixlen:
            raise ValueError(
                f"spec.subnetLen {self.subnet_len} must be longer than the "
                f"network's prefix /{net.prefixlen}, or there is one subnet at most"
            )
        if self.subnet_len - net.prefixlen < 1:
            raise ValueError("spec.subnetLen leaves room for fewer than 2 node subnets")
        if ipaddress.ip_address(self.cluster_dns) not in svc:
            raise ValueError(
                f"spec.clusterDNS {self.cluster_dns} is outside spec.serviceCIDR {svc}"
            )
        for f in ("subnet_min", "subnet_max"):
            v = getattr(self, f)
            if v is not None and ipaddress.ip_address(v) not in net:
                raise ValueError(f"spec.{to_camel(f)} {v} is outside spec.network {net}")
        return self


class NetworkConfig(TypedObject):
    """The cluster's network configuration (one object, name `cluster`)."""

    API_VERSIONS: ClassVar[tuple[str, ...]] = ("corral.dev/v1",)
    KIND: ClassVar[str] = "NetworkConfig"
    PLURAL: ClassVar[str] = "networkconfigs"
    NAMESPACED: ClassVar[bool] = False
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("network", "networkconfig")

    api_version: str = "corral.dev/v1"
    spec: NetworkSpec = Field(default_factory=NetworkSpec)


class LoadBalancerPoolSpec(Model):
    cidrs: list[CIDR] = Field(
        min_length=1,
        description="Where LoadBalancer Services' addresses come from (IPv4 networks on "
        "the nodes' own layer-2 network: one node answers ARP for each address).",
    )
    node_selector: Labels | None = Field(
        default=None,
        description="Only nodes with these labels announce this pool's addresses "
        "(default: every Ready node).",
    )

    @field_validator("cidrs")
    @classmethod
    def _ipv4(cls, v: list[str]) -> list[str]:
        for c in v:
            if ":" in c:
                raise ValueError(f"{c}: this cluster is IPv4-only")
        return v


class LoadBalancerPool(TypedObject):
    """Addresses for type: LoadBalancer Services on bare metal (MetalLB's L2 mode):
    one is allocated to each Service (status.loadBalancer.ingress) and announced
    with ARP by exactly one Ready node at a time."""

    API_VERSIONS: ClassVar[tuple[str, ...]] = ("corral.dev/v1",)
    KIND: ClassVar[str] = "LoadBalancerPool"
    PLURAL: ClassVar[str] = "loadbalancerpools"
    NAMESPACED: ClassVar[bool] = False
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("lbpool", "loadbalancerpool")

    api_version: str = "corral.dev/v1"
    spec: LoadBalancerPoolSpec


class SubnetLease(Model):
    """A node's claim on one subnet; its etcd key carries an etcd lease (TTL)."""

    subnet: CIDR
    node_name: str
    public_ip: IPAddress = Field(alias="publicIP")
    backend_type: Literal["vxlan"] = "vxlan"
    vtep_mac: str | None = Field(default=None, alias="vtepMAC")
    renewed_at: str | None = None


class IPAllocation(Model):
    """One IP handed to one (containerID, ifname) attachment."""

    ip: IPAddress
    pool: str
    container_id: str = Field(alias="containerID")
    ifname: str
    node_name: str | None = None
    pod_namespace: str | None = None
    pod_name: str | None = None
    created_at: str | None = None
    # "corral-cni" when corral-cni made the attachment (its host veth is then named
    # from containerID/ifname, so the node can tell a vanished one); "corral-ipam"
    # under another plugin. None in records written before the field existed.
    plugin: str | None = None


KINDS: tuple[type[TypedObject], ...] = (
    Node,
    Namespace,
    Pod,
    Service,
    Endpoints,
    EndpointSlice,
    ReplicationController,
    Deployment,
    NetworkPolicy,
    NetworkConfig,
    LoadBalancerPool,
    ConfigMap,
    Secret,
)
