"""Manifests: real Kubernetes YAML for each kind loads; each invalid case names the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from corral.api.manifest import ManifestError, load_manifests, resolve_kind
from corral.api.objects import (
    Deployment,
    Endpoints,
    EndpointSlice,
    NetworkConfig,
    Node,
    Pod,
    ReplicationController,
    Service,
)
from corral.api.quantity import cpu_millis, memory_bytes


def load(text: str):
    return load_manifests(textwrap.dedent(text))


def test_kubernetes_yaml_for_every_kind_loads() -> None:
    objs = load("""
        apiVersion: v1
        kind: Pod
        metadata:
          name: web-0
          namespace: shop
          labels: {app: web, app.kubernetes.io/part-of: shop}
        spec:
          hostname: web-0
          subdomain: web
          nodeSelector: {disk: ssd}
          tolerations: [{key: dedicated, operator: Equal, value: web, effect: NoSchedule}]
          terminationGracePeriodSeconds: 5
          containers:
          - name: web
            image: rootfs/alpine
            imagePullPolicy: IfNotPresent
            command: [python3, -m, http.server]
            args: ["8080"]
            workingDir: /srv
            env: [{name: MODE, value: prod}]
            ports: [{name: http, containerPort: 8080, protocol: TCP}]
            resources:
              requests: {cpu: 100m, memory: 64Mi}
              limits: {cpu: "1", memory: 128Mi}
            readinessProbe:
              httpGet: {path: /healthz, port: http}
              periodSeconds: 2
            livenessProbe:
              tcpSocket: {port: 8080}
            startupProbe:
              exec: {command: ["true"]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop}
        spec:
          type: NodePort
          selector: {app: web}
          sessionAffinity: ClientIP
          sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
          ports:
          - {name: http, port: 80, targetPort: http, protocol: TCP, nodePort: 30080}
          - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: db}
        spec: {clusterIP: None, selector: {app: db}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: ext}
        spec: {type: ExternalName, externalName: example.internal}
        ---
        apiVersion: v1
        kind: Endpoints
        metadata: {name: manual}
        subsets:
        - addresses: [{ip: 10.244.1.5, hostname: a, nodeName: node-1}]
          notReadyAddresses: [{ip: 10.244.2.7}]
          ports: [{name: http, port: 8080, protocol: TCP}]
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: manual-abc, labels: {kubernetes.io/service-name: manual}}
        addressType: IPv4
        endpoints:
        - addresses: [10.244.1.5]
          conditions: {ready: false, serving: true, terminating: true}
          nodeName: node-1
        ports: [{name: http, port: 8080, protocol: TCP}]
        ---
        apiVersion: v1
        kind: ReplicationController
        metadata: {name: web}
        spec:
          replicas: 3
          selector: {app: web}
          template:
            metadata: {labels: {app: web}}
            spec:
              containers: [{name: web, command: [sleep, infinity]}]
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: api}
        spec:
          replicas: 2
          selector: {matchLabels: {app: api}}
          template:
            metadata: {labels: {app: api}}
            spec:
              containers: [{name: api, command: [sleep, infinity]}]
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: node-1}
        spec: {podCIDR: 10.244.1.0/24, taints: [{key: a, value: b, effect: NoSchedule}]}
        ---
        apiVersion: corral.dev/v1
        kind: NetworkConfig
        metadata: {name: cluster}
        spec:
          network: 10.244.0.0/16
          subnetLen: 24
          backend: {type: vxlan, vni: 1, port: 4789, directRouting: true}
        """)
    kinds = [type(o) for o in objs]
    assert kinds == [
        Pod,
        Service,
        Service,
        Service,
        Endpoints,
        EndpointSlice,
        ReplicationController,
        Deployment,
        Node,
        NetworkConfig,
    ]
    pod, svc, headless, ext = objs[:4]
    assert pod.namespace == "shop"
    assert pod.spec.containers[0].readiness_probe.http_get.port == "http"
    assert svc.spec.session_affinity_config.client_ip.timeout_seconds == 600
    assert svc.spec.ports[0].target_port == "http" and svc.spec.ports[1].target_port == 5353
    assert headless.spec.headless and headless.namespace == "default"
    assert ext.spec.external_name == "example.internal"
    assert objs[6].spec.selector == {"app": "web"}
    # Round trip: what we store is what was written, in camelCase.
    dumped = svc.dump()
    assert dumped["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 600}}
    assert dumped["spec"]["ports"][0]["targetPort"] == "http"
    assert Service.model_validate(dumped).dump() == dumped


def test_client_ip_affinity_gets_the_kubernetes_default_timeout() -> None:
    [svc] = load("""
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec: {selector: {app: web}, sessionAffinity: ClientIP, ports: [{port: 80}]}
        """)
    assert svc.spec.session_affinity_config.client_ip.timeout_seconds == 10800


def test_list_kind_expands() -> None:
    objs = load("""
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Node, metadata: {name: a}}
        - {apiVersion: v1, kind: Node, metadata: {name: b}}
        """)
    assert [o.name for o in objs] == ["a", "b"]


POD = """
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers: [{name: c, command: [x]}]
"""


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (
            POD.replace("containers: [{name: c, command: [x]}]", "containers: []"),
            "spec.containers",
            "at least 1",
        ),
        (POD.replace("spec:\n", "spec:\n  nodeNmae: x\n"), "spec.nodeNmae", "unknown field"),
        (
            POD.replace("command:", "resources: {limits: {memory: lots}}, command:"),
            "spec.containers[0].resources.limits.memory",
            "not a quantity",
        ),
        (
            POD.replace("command:", "resources: {requests: {cpu: -1}}, command:"),
            "spec.containers[0].resources.requests.cpu",
            "negative",
        ),
        (POD.replace("name: p", "name: Bad_Name"), "", "DNS subdomain"),
        (POD.replace("apiVersion: v1", "apiVersion: v2"), "", "apiVersion 'v2'"),
        (
            POD.replace("name: c,", "name: c, ports: [{containerPort: 70000}],"),
            "spec.containers[0].ports[0].containerPort",
            "less than or equal to 65535",
        ),
        (
            POD.replace("spec:\n", "spec:\n  restartPolicy: Sometimes\n"),
            "spec.restartPolicy",
            "'Always', 'OnFailure' or 'Never'",
        ),
        (
            POD.replace(
                "command:", "resources: {requests: {cpu: '2'}, limits: {cpu: '1'}}, command:"
            ),
            "spec.containers[0].resources",
            "requests.cpu 2 is more than limits.cpu 1",
        ),
        (POD.replace(", command: [x]", ""), "spec.containers[0]", "command is required"),
        (
            POD.replace("spec:\n", "spec:\n  nodeSelector: {'bad key!': x}\n"),
            "spec.nodeSelector",
            "label key 'bad key!' is not valid",
        ),
        (
            POD.replace(
                "spec:\n", "spec:\n  tolerations: [{key: k, operator: Exists, value: v}]\n"
            ),
            "spec.tolerations[0]",
            "must not have a value",
        ),
        (
            POD.replace("spec:\n", "spec:\n  terminationGracePeriodSeconds: '30'\n"),
            "spec.terminationGracePeriodSeconds",
            "valid integer",
        ),
    ],
)
def test_invalid_pod_names_the_field(text: str, field: str, words: str) -> None:
    with pytest.raises(ManifestError) as e:
        load_manifests(text, source="pod.yaml")
    msg = str(e.value)
    assert msg.startswith("pod.yaml: Pod")
    assert field in msg and words in msg, msg


TEMPLATE = "{metadata: {labels: {a: b}}, spec: {containers: [{name: c, command: [x]}]}}"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (
            "replicas: -1\n  template: " + TEMPLATE,
            "spec.replicas: Input should be greater than or equal to 0",
        ),
        (
            "selector: {a: x}\n  template: " + TEMPLATE,
            "does not match spec.template.metadata.labels",
        ),
        (
            "template: {spec: {containers: [{name: c, command: [x]}]}}",
            "spec.template.metadata.labels is required",
        ),
        ("replicas: 2", "spec.template: required field is missing"),
        (
            'replicas: "3"\n  template: ' + TEMPLATE,
            "spec.replicas: Input should be a valid integer",
        ),
    ],
)
def test_invalid_replication_controller(spec: str, words: str) -> None:
    text = f"apiVersion: v1\nkind: ReplicationController\nmetadata: {{name: rc}}\nspec:\n  {spec}\n"
    with pytest.raises(ManifestError) as e:
        load_manifests(text)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("{ports: [{port: 80, protocol: HTTP}]}", "spec.ports[0].protocol"),
        ("{ports: [{port: 80}, {port: 81}]}", "each needs a unique name"),
        ("{ports: []}", "at least one port"),
        ("{type: ExternalName}", "externalName is required"),
        ("{ports: [{port: 80, targetPort: Not_A_Port}]}", "neither a port number nor"),
        ("{sessionAffinity: Sticky, ports: [{port: 80}]}", "spec.sessionAffinity"),
        (
            "{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}},"
            " ports: [{port: 80}]}",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ),
        ("{ports: [{port: 80, nodePort: 30001}]}", "nodePort may only be set"),
        ("{clusterIP: 10.96.0.300, ports: [{port: 80}]}", "spec.clusterIP"),
    ],
)
def test_invalid_service(spec: str, words: str) -> None:
    text = f"apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n"
    with pytest.raises(ManifestError) as e:
        load_manifests(text)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("{network: 10.96.0.0/16}", "overlaps spec.serviceCIDR"),
        ("{network: 10.244.0.0/16, subnetLen: 16}", "must be longer than"),
        ("{network: 10.244.0.0/33}", "spec.network"),
        ("{network: 10.244.0.1/16}", "has host bits set"),
        ("{backend: {type: geneve}}", "spec.backend.type"),
        ("{clusterDNS: 10.244.0.10}", "outside spec.serviceCIDR"),
    ],
)
def test_invalid_network_config(spec: str, words: str) -> None:
    text = (
        "apiVersion: corral.dev/v1\nkind: NetworkConfig\nmetadata: {name: cluster}\n"
        f"spec: {spec}\n"
    )
    with pytest.raises(ManifestError) as e:
        load_manifests(text)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("kind: Pod\nmetadata: {name: x}\n", "apiVersion is missing"),
        ("apiVersion: v1\nkind: Widget\nmetadata: {name: x}\n", "kind 'Widget' is not known"),
        ("apiVersion: v1\nmetadata: {name: x}\n", "kind is missing"),
        ("- just\n- a list\n", "expected a mapping"),
        (
            "apiVersion: v1\nkind: Pod\nspec: {containers: [{name: c, command: [x]}]\n",
            "not valid YAML at line",
        ),
        ("apiVersion: v1\nkind: Node\nmetadata: {name: n, namespace: x}\n", "not namespaced"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {}\n"
            "spec: {containers: [{name: c, command: [x]}]}\n",
            "metadata.name is required",
        ),
        ("", "no objects found"),
    ],
)
def test_malformed_documents(text: str, words: str) -> None:
    with pytest.raises(ManifestError) as e:
        load_manifests(text)
    assert words in str(e.value), str(e.value)


def test_quantities() -> None:
    assert cpu_millis("100m") == 100
    assert cpu_millis("1.5") == 1500
    assert cpu_millis(2) == 2000
    assert memory_bytes("64Mi") == 64 * 2**20
    assert memory_bytes("1G") == 10**9
    assert memory_bytes("1e3") == 1000


def test_resolve_kind_accepts_kubectl_words() -> None:
    assert resolve_kind("svc") is Service
    assert resolve_kind("Pods") is Pod
    assert resolve_kind("rc") is ReplicationController
    assert resolve_kind("ep") is Endpoints
    with pytest.raises(ValueError, match="known types"):
        resolve_kind("widgets")


def test_a_file_that_is_not_utf8_names_the_byte(tmp_path: Path) -> None:
    from corral.api.manifest import load_file

    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"apiVersion: v1\nkind: Pod\nmetadata: {name: caf\xe9}\n")
    with pytest.raises(ManifestError, match=r"not UTF-8 text \(byte 0xe9 at offset 45\)"):
        load_file(str(p))


def test_an_object_too_large_for_etcd_is_refused_before_anything_is_sent() -> None:
    big = "y" * (1024 * 1024)
    text = (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: big, annotations: {x: " + big + "}}\n"
        "spec: {containers: [{name: c, command: [sleep, '1']}]}\n"
    )
    with pytest.raises(ManifestError, match=r"Pod 'big' is \d+ bytes; an object may be at most"):
        load_manifests(text)
