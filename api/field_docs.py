"""What `corral explain` says about fields whose model carries no description of its
own (a pydantic `description=` or attribute docstring wins over this table).

Keyed by (model class name, wire field name). Kept apart from api/objects.py so the
model's definitions stay short; a new field is best documented where it is defined.
"""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import BaseModel

DOCS: dict[tuple[str, str], str] = {
    # every object
    ("TypedObject", "apiVersion"): "The versioned schema of this object: v1, apps/v1, "
    "discovery.k8s.io/v1, networking.k8s.io/v1 or corral.dev/v1 depending on the kind.",
    ("TypedObject", "kind"): "The kind of object (Pod, Service, ...).",
    ("TypedObject", "metadata"): "Name, namespace, labels and the bookkeeping the store "
    "keeps (uid, resourceVersion, creationTimestamp).",
    ("ObjectMeta", "name"): "Unique within the namespace (or the cluster, for "
    "cluster-scoped kinds); a DNS subdomain (a DNS label for some kinds).",
    ("ObjectMeta", "generateName"): "A prefix: the store appends 5 random characters "
    "when name is empty.",
    ("ObjectMeta", "namespace"): "The namespace the object lives in (default: default); "
    "it must exist (corral get ns).",
    ("ObjectMeta", "uid"): "Set by the store when the object is created; never reused.",
    ("ObjectMeta", "resourceVersion"): "The etcd revision the object was last written "
    "at; an update is a compare-and-swap on it.",
    ("ObjectMeta", "generation"): "Bumped by the store on every change of spec.",
    ("ObjectMeta", "creationTimestamp"): "When the object was created (RFC 3339, UTC).",
    ("ObjectMeta", "deletionTimestamp"): "Set when a graceful deletion began: the object "
    "goes once whoever owns its end (a node, the namespace controller) is done.",
    ("ObjectMeta", "deletionGracePeriodSeconds"): "The seconds a terminating pod's "
    "containers get to stop.",
    ("ObjectMeta", "labels"): "Key/value pairs that selectors match (services, controllers, -l).",
    ("ObjectMeta", "annotations"): "Key/value pairs for tools; corral's runtime records "
    "where a pod's files and processes are here.",
    ("ObjectMeta", "ownerReferences"): "The objects this one belongs to; a controller "
    "deletes what it owns with it.",
    ("ObjectMeta", "finalizers"): "Accepted for Kubernetes compatibility.",
    # network policy (docs/netpolicy.md)
    ("NetworkPolicy", "spec"): "Which pods of the namespace it selects, and what they may "
    "receive (ingress) and send (egress).",
    ("NetworkPolicySpec", "podSelector"): "The pods of the policy's namespace it applies "
    "to; empty selects them all.",
    ("NetworkPolicySpec", "policyTypes"): "Ingress, Egress or both: the directions the "
    "selected pods are isolated in (default: Ingress, plus Egress when there are egress "
    "rules).",
    ("NetworkPolicySpec", "ingress"): "What the selected pods may receive: each rule allows "
    "its peers on its ports; the rules of every policy selecting a pod add up.",
    ("NetworkPolicySpec", "egress"): "What the selected pods may send.",
    ("NetworkPolicyIngressRule", "from"): "The peers allowed; empty allows every source.",
    ("NetworkPolicyIngressRule", "ports"): "The ports allowed on the selected pod; empty "
    "allows every port.",
    ("NetworkPolicyEgressRule", "to"): "The peers allowed; empty allows every destination.",
    ("NetworkPolicyEgressRule", "ports"): "The destination ports allowed; a name is resolved "
    "on each destination pod.",
    ("NetworkPolicyPeer", "podSelector"): "Pods of the policy's namespace (with "
    "namespaceSelector: of the namespaces it selects).",
    ("NetworkPolicyPeer", "namespaceSelector"): "Every pod of the namespaces it selects "
    "(by their labels, kubernetes.io/metadata.name among them); empty selects all.",
    ("NetworkPolicyPeer", "ipBlock"): "Addresses: cidr minus except, pods included.",
    ("IPBlock", "cidr"): "The addresses allowed, e.g. 10.0.0.0/8.",
    ("IPBlock", "except"): "CIDRs inside cidr that are not allowed.",
    ("NetworkPolicyPort", "protocol"): "TCP (default), UDP or SCTP.",
    ("NetworkPolicyPort", "port"): "A number or a named container port; absent: every port.",
    ("NetworkPolicyPort", "endPort"): "With a numeric port: the last port of the range.",
    # pods
    ("Pod", "spec"): "What the pod runs.",
    ("Pod", "status"): "What the node reports about the pod.",
    ("PodSpec", "containers"): "The containers of the pod: at least one, names unique.",
    ("PodSpec", "restartPolicy"): "When the node restarts a container that exits.",
    ("PodSpec", "nodeName"): "The node the pod runs on: set by the scheduler (or by you, "
    "to skip it).",
    ("PodSpec", "nodeSelector"): "Labels a node must have for the pod to be scheduled there.",
    ("PodSpec", "tolerations"): "Taints of nodes the pod may be scheduled on anyway.",
    ("PodSpec", "terminationGracePeriodSeconds"): "Seconds between SIGTERM and SIGKILL "
    "when the pod is deleted.",
    ("PodSpec", "hostname"): "The pod's hostname (default: its name).",
    ("PodSpec", "subdomain"): "With a headless Service of this name: the pod gets the "
    "DNS name <hostname>.<subdomain>.<namespace>.svc.<cluster domain>.",
    ("PodSpec", "dnsPolicy"): "Where the pod's resolv.conf points: ClusterFirst is the "
    "cluster DNS.",
    ("PodSpec", "schedulerName"): "Which scheduler binds the pod (corral's answers to "
    "empty, default-scheduler and corral-scheduler).",
    ("PodSpec", "priority"): "Accepted for Kubernetes compatibility; not used to preempt.",
    ("PodSpec", "securityContext"): "User, group and seccomp settings for every "
    "container (each container's own securityContext overrides them).",
    ("Container", "name"): "Unique within the pod; a DNS label.",
    ("Container", "image"): "A root filesystem directory on the node to run in (there are "
    "no registries); without it, the node's own filesystem.",
    ("Container", "imagePullPolicy"): "Accepted for Kubernetes compatibility.",
    ("Container", "command"): "The program and its arguments: required, as images have "
    "no entrypoint of their own.",
    ("Container", "args"): "More arguments, appended to command.",
    ("Container", "workingDir"): "The directory the command starts in.",
    ("Container", "env"): "Environment variables (merged by name in a patch).",
    ("Container", "ports"): "Ports the container serves on; a Service's targetPort may "
    "name one (merged by containerPort in a patch).",
    ("Container", "resources"): "CPU and memory requests (what the scheduler counts) and "
    "limits (what the cgroup enforces).",
    ("Container", "readinessProbe"): "Until it passes, the pod is not Ready and not in "
    "its Services' endpoints.",
    ("Container", "livenessProbe"): "When it fails, the container is restarted.",
    ("Container", "startupProbe"): "Holds the other probes off until it passes.",
    ("Container", "securityContext"): "Capabilities, user, privilege and the seccomp "
    "filter the runtime applies.",
    ("ContainerPort", "containerPort"): "The port number, 1-65535.",
    ("ContainerPort", "name"): "An IANA service name a Service's targetPort can refer to.",
    ("ContainerPort", "protocol"): "TCP, UDP or SCTP.",
    ("EnvVar", "name"): "The variable's name.",
    ("EnvVar", "value"): "Its value.",
    ("PodStatus", "phase"): "Pending, Running, Succeeded, Failed or Unknown.",
    ("PodStatus", "podIP"): "The IP corral's IPAM gave the pod.",
    ("PodStatus", "conditions"): "PodScheduled, Initialized, ContainersReady, Ready: "
    "with reasons saying why not.",
    # services
    ("Service", "spec"): "How the Service is reached and which pods serve it.",
    ("ServiceSpec", "type"): "ClusterIP (a virtual IP), NodePort (also a port on every "
    "node), LoadBalancer (a NodePort plus an address from a LoadBalancerPool, announced "
    "with ARP by one node) or ExternalName (a DNS alias).",
    ("ServiceSpec", "externalTrafficPolicy"): "For NodePort, LoadBalancer and externalIPs "
    "traffic: Cluster (any endpoint, client address masqueraded) or Local (only the "
    "receiving node's endpoints, client address kept; dropped on a node without one).",
    ("ServiceSpec", "internalTrafficPolicy"): "For in-cluster traffic to the clusterIP: "
    "Cluster (any endpoint) or Local (only endpoints on the client's node; else dropped).",
    ("ServiceSpec", "externalIPs"): "Addresses routed to the nodes by you: traffic to "
    "them on a service port reaches the endpoints.",
    ("ServiceSpec", "healthCheckNodePort"): "LoadBalancer with externalTrafficPolicy "
    "Local: every node answers HTTP on it, 200 with its local endpoint count, else 503 "
    "(allocated unless given).",
    ("ServiceSpec", "loadBalancerIP"): "The address to take from a LoadBalancerPool.",
    ("ServiceSpec", "loadBalancerClass"): "Unset or corral.dev/l2: corral allocates and "
    "announces; another class is left to its implementation.",
    ("ServiceSpec", "ipFamilies"): "[IPv4] only: the cluster is IPv4-only.",
    ("ServiceSpec", "loadBalancerSourceRanges"): "Not implemented: refused unless empty.",
    ("ServiceSpec", "allocateLoadBalancerNodePorts"): "Only true (the default): corral's "
    "LoadBalancer delivers through node ports.",
    ("ServiceSpec", "selector"): "The labels of the pods that serve it; without one, "
    "its Endpoints are yours to write.",
    ("ServiceSpec", "ports"): "The ports it serves (merged by port in a patch).",
    ("ServiceSpec", "clusterIP"): "The virtual IP, allocated from the network's "
    "serviceCIDR unless given; None makes it headless. May not change once set.",
    ("ServiceSpec", "sessionAffinity"): "ClientIP keeps a client on one pod.",
    ("ServicePort", "port"): "The port of the virtual IP.",
    ("ServicePort", "targetPort"): "The pods' port: a number or a container port's name "
    "(default: port).",
    ("ServicePort", "nodePort"): "For NodePort: the port on every node (30000-32767, "
    "allocated unless given).",
    # controllers
    ("ReplicationControllerSpec", "replicas"): "How many pods to keep.",
    ("ReplicationControllerSpec", "selector"): "The labels of the pods it keeps "
    "(default: the template's).",
    ("ReplicationControllerSpec", "template"): "The pods it makes.",
    ("DeploymentSpec", "replicas"): "How many pods to keep.",
    ("DeploymentSpec", "selector"): "The pods it keeps: matchLabels and matchExpressions.",
    ("DeploymentSpec", "template"): "The pods it makes; a change rolls out by strategy.",
    ("DeploymentSpec", "strategy"): "RollingUpdate (maxSurge, maxUnavailable) or Recreate.",
    # namespaces
    ("Namespace", "spec"): "Finalizers, accepted for Kubernetes compatibility.",
    ("Namespace", "status"): "Active or Terminating, and while terminating, conditions "
    "saying what is left.",
    ("NamespaceStatus", "conditions"): "NamespaceContentRemaining (which kinds still "
    "have objects) and NamespaceDeletionContentFailure (a delete that failed).",
    # kinds without a docstring of their own (key: (KIND, ""))
    ("Pod", ""): "One or more containers that share a network namespace (one IP from "
    "the node's subnet) and run on one node.",
    ("Service", ""): "A stable virtual IP (and DNS name) in front of the pods its "
    "selector picks; the proxy on every node balances over their endpoints.",
    ("ReplicationController", ""): "Keeps spec.replicas pods made from its template.",
    ("Node", ""): "A machine that runs pods: its pod subnet, taints, capacity and readiness.",
    # nodes, network
    ("NodeSpec", "podCIDR"): "The node's pod subnet, from its subnet lease.",
    ("NodeSpec", "taints"): "Pods that do not tolerate these are not scheduled here.",
    ("NodeSpec", "unschedulable"): "No new pods are scheduled here (cordoned).",
    ("NetworkSpec", "network"): "The pods' network; each node leases a subnet of it.",
    ("NetworkSpec", "subnetLen"): "The prefix length of each node's subnet.",
    ("NetworkSpec", "serviceCIDR"): "Where Service virtual IPs come from.",
    ("NetworkSpec", "clusterDNS"): "The cluster DNS Service's IP (in serviceCIDR).",
    ("NetworkSpec", "backend"): "The overlay: VXLAN VNI, port, direct routing, MTU.",
}


def doc_for(model_name: str, field: str, bases: tuple[str, ...] = ()) -> str | None:
    for name in (model_name, *bases):
        text = DOCS.get((name, field))
        if text:
            return text
    return None


def _bases(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(c.__name__ for c in model.__mro__[1:] if issubclass(c, BaseModel))


def describe_field(model: type[BaseModel], wire: str, info: Any) -> str:
    """A field's documentation: its own description, else this table's (bases too)."""
    return info.description or doc_for(model.__name__, wire, _bases(model)) or ""


def describe_model(model: type[BaseModel] | None) -> str:
    """A model's documentation: its docstring, else this table's entry for it."""
    if model is None:
        return ""
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else (doc_for(model.__name__, "") or "")
