"""The examples each `corral VERB --help` ends with (its epilog), by verb path.

A verb module may set its own `epilog` instead; every verb must have one
(tests/test_cli_kubectl.py checks that, and that each example parses).
"""

from __future__ import annotations

EXAMPLES: dict[str, list[str]] = {
    "": [
        "# a local three-node cluster, then what runs on it",
        "corral up --nodes 3",
        "corral get pods -A -o wide",
        "# the commands, with their examples",
        "corral get --help",
    ],
    "up": [
        "corral up --nodes 3",
        "corral up --name dev --underlay-cidr 10.250.7.0/24 --etcd-members 3",
    ],
    "down": ["corral down", "corral down --name dev"],
    "status": ["corral status", "corral status --name dev"],
    "apiserver": [
        "corral apiserver --etcd https://10.0.0.1:2379 --bind-address 10.0.0.1 "
        "--tls-cert-file apiserver.crt --tls-private-key-file apiserver.key "
        "--client-ca-file ca.crt",
    ],
    "kubeconfig": ["corral kubeconfig", "corral kubeconfig --name dev > dev.kubeconfig"],
    "node-exec": [
        "corral node-exec node-1 -- ip route",
        "corral node-exec 2 -- ss -tlnp",
    ],
    "scheduler": ["corral scheduler --etcd http://10.0.0.1:2379 --seed 1"],
    "controllers": [
        "corral controllers --etcd http://10.0.0.1:2379",
        "corral controllers --controllers replication,endpoints,namespaces",
    ],
    "network": ["corral network show", "corral network set --vni 42"],
    "network show": ["corral network show", "corral network show -o yaml"],
    "network set": [
        "corral network set --network 10.244.0.0/16 --subnet-len 24",
        "corral network set -f network.yaml",
    ],
    "node": [
        "corral node --etcd http://10.0.0.1:2379 --name worker-1",
        "corral node remove node-3",
    ],
    "node remove": ["corral node remove node-3"],
    "proxy": ["corral proxy --etcd http://10.0.0.1:2379 --node worker-1 --mode iptables"],
    "net": [
        "corral net check",
        "corral net trace web-q5d6t web:80/tcp",
        "corral net services --node node-1",
    ],
    "net check": [
        "corral net check",
        "corral net check --node node-2 --fix",
        "corral net check -o json",
    ],
    "net trace": [
        "corral net trace web-q5d6t web",
        "corral net trace default/client-1 10.96.0.10:53/udp",
        "corral net trace client-1 shop/db-0:5432",
    ],
    "net policy": [
        "corral net policy shop/web-7x2k",
        "corral net policy web-7x2k -n shop -o json",
    ],
    "net ipam": ["corral net ipam", "corral net ipam --node node-1 --release 10.244.1.7"],
    "net services": ["corral net services", "corral net services --node node-2 -o json"],
    "net capture": [
        "corral net capture --node node-1 -c 20",
        "corral net capture --node node-2 --pod web-q5d6t -w web.pcap",
    ],
    "net resync": ["corral net resync node-1", "corral net resync node-1 --daemon proxy"],
    "dns": [
        "corral dns --etcd http://10.0.0.1:2379 --listen 10.0.0.5:53",
        "corral dns --etcd http://10.0.0.1:2379 --upstream 1.1.1.1 --pods verified --ttl 10",
    ],
    "apply": [
        "corral apply -f web.yaml",
        "corral apply -f manifests/ -n shop",
        "cat web.yaml | corral apply -f -",
    ],
    "create": [
        "corral create namespace shop",
        "corral create -f web.yaml -n shop",
    ],
    "get": [
        "corral get pods",
        "corral get pods -A -o wide",
        "corral get svc web -o yaml",
        "corral get pods -l app=web -n shop",
        "# the list, then every change as it happens",
        "corral get pods -w",
        "corral get pods -w --watch-only --output-watch-events -o name",
        "corral get ns",
    ],
    "delete": [
        "corral delete pod web-x7k2p",
        "corral delete pod web-x7k2p --grace-period 5",
        "corral delete -f web.yaml",
        "# and everything in it (pods gracefully); --wait: until it is gone",
        "corral delete namespace shop",
        "corral delete namespace shop --wait --timeout 120",
    ],
    "describe": [
        "corral describe pod web-x7k2p",
        "corral describe node node-1",
        "corral describe namespace shop",
    ],
    "logs": [
        "corral logs web-x7k2p",
        "corral logs web-x7k2p -c sidecar --tail 20",
        "corral logs -f web-x7k2p",
        "corral logs -p web-x7k2p",
    ],
    "exec": [
        "corral exec web-x7k2p -- ip addr",
        "corral exec -n shop web-x7k2p -c sidecar -- sh -c 'cat /etc/resolv.conf'",
    ],
    "run": [
        "corral run hello -- sleep 3600",
        "corral run web --replicas 3 --port 8080 --expose -- python3 -m http.server 8080",
    ],
    "expose": [
        "corral expose rc web --port 80 --target-port 8080",
        "corral expose deploy/api --port 80 --type NodePort",
    ],
    "scale": ["corral scale rc web --replicas 5", "corral scale deploy/api --replicas 0"],
    "label": [
        "corral label pods web-x7k2p tier=front",
        "corral label pod web-x7k2p tier=back --overwrite",
        "corral label pod/web-x7k2p tier-",
        "corral label pods --all -n shop team=a",
        "corral label nodes -l kubernetes.io/hostname=node-1 disk=ssd",
    ],
    "annotate": [
        "corral annotate svc web owner='team a'",
        "corral annotate svc web owner-",
        "corral annotate pods -l app=web note=draining --overwrite",
    ],
    "patch": [
        "# strategic merge (default): containers and env merge by name",
        'corral patch rc web -p \'{"spec":{"template":{"spec":{"containers":'
        '[{"name":"web","env":[{"name":"LOG","value":"debug"}]}]}}}}\'',
        'corral patch svc web --type merge -p \'{"spec":{"sessionAffinity":"ClientIP"}}\'',
        'corral patch rc/web --type json -p \'[{"op":"replace","path":"/spec/replicas",'
        '"value":2}]\'',
        'corral patch node node-1 -p \'{"spec":{"unschedulable":true}}\'',
    ],
    "edit": [
        "corral edit rc web",
        "KUBE_EDITOR=nano corral edit svc web -n shop",
        "corral edit deploy api -o json",
    ],
    "explain": [
        "corral explain pods",
        "corral explain pod.spec.containers.ports",
        "corral explain svc.spec --recursive",
    ],
    "completion": [
        "source <(corral completion bash)",
        "corral completion bash > /etc/bash_completion.d/corral",
        "source <(corral completion zsh)",
    ],
}


def epilog(verb: str) -> str | None:
    lines = EXAMPLES.get(verb)
    if not lines:
        return None
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)
