"""Well-known label names, written in one place for every reader and writer."""

# An EndpointSlice's Service (discovery.k8s.io/v1).
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Which controller manages an EndpointSlice; the endpoints controller only touches its own.
ENDPOINTSLICE_MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
# A Node's hostname, as the kubelet labels it.
HOSTNAME_LABEL = "kubernetes.io/hostname"
