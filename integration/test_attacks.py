"""What an ordinary pod tries against its cluster, each attack asserted to fail.

The pod is what `corral run x --command -- sleep 3600` makes: no securityContext.
It tries etcd (no certificate: refused), its node (no mount, no address changes,
no view of corral's state or the CNI socket), the overlay (forged VXLAN to another
node is dropped) and other pods' addresses (spoofed sources never arrive). Pods
that ask for more in their manifest get it: NET_ADMIN can add an address,
privileged can mount.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator

import pytest

from integration.cluster_helpers import wait_for
from integration.clusters import LocalCluster

pytestmark = pytest.mark.slow

# A UDP listener that writes every sender it hears from to its log, one per line.
LISTEN = "import socket; s=socket.socket(2,2); s.bind(('0.0.0.0',9999))\n" + (
    "while True:\n d,a=s.recvfrom(2048); print(a[0], d[:40], flush=True)"
)

# Sends one UDP datagram to the VXLAN port of `node_ip` whose payload is a whole
# VXLAN frame (VNI 1) carrying an IPv4/UDP packet from `src` to `dst`:9999.
FORGE_VXLAN = r"""
import socket, struct, sys
node_ip, src, dst = sys.argv[1:4]
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
payload = b"forged-vxlan"
udp = struct.pack("!HHHH", 5555, 9999, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
eth = bytes.fromhex("ffffffffffff") + bytes.fromhex("02aabbccddee") + b"\x08\x00"
vxlan = struct.pack("!II", 0x08000000, 1 << 8)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(vxlan + eth + ip + udp, (node_ip, 4789))
print("sent")
"""


def _pod(name: str, node: str, cmd: list[str], security: dict | None = None) -> str:
    container: dict = {"name": "c", "command": cmd}
    if security:
        container["securityContext"] = security
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [container]},
        }
    )


def _running(c: LocalCluster, name: str) -> dict:
    def ready() -> dict | None:
        r = c.corral("get", "pod", name, "-o", "json")
        if r.returncode != 0:
            return None
        p = json.loads(r.stdout)
        return p if p.get("status", {}).get("phase") == "Running" else None

    return wait_for(ready, f"pod {name} Running")


@pytest.fixture(scope="module")
def pods(cluster: LocalCluster) -> Iterator[dict[str, dict]]:
    n1, n2 = cluster.nodes[0], cluster.nodes[1]
    specs = {
        "atk": _pod("atk", n1, ["sleep", "3600"]),
        "victim": _pod("victim", n2, ["python3", "-c", LISTEN]),
        "netadmin": _pod(
            "netadmin", n1, ["sleep", "3600"], {"capabilities": {"add": ["NET_ADMIN"]}}
        ),
        "priv": _pod("priv", n1, ["sleep", "3600"], {"privileged": True}),
    }
    r = cluster.corral("apply", "-f", "-", input="\n---\n".join(specs.values()))
    assert r.returncode == 0, r.stderr
    try:
        yield {name: _running(cluster, name) for name in specs}
    finally:
        cluster.corral("delete", "pod", *specs, "--grace-period", "0")


def _exec(c: LocalCluster, pod: str, *cmd: str) -> tuple[int, str]:
    r = c.corral("exec", pod, "--", *cmd, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_a_pod_cannot_read_or_write_etcd(cluster: LocalCluster, pods: dict) -> None:
    url = cluster.etcd_node_urls[0]
    base = url.replace("https://", "")
    for attempt in (f"https://{base}/v3/kv/range", f"http://{base}/v3/kv/range"):
        rc, out = _exec(
            cluster,
            "atk",
            "curl",
            "-sk",
            "--max-time",
            "5",
            "-X",
            "POST",
            "-d",
            '{"key": "Lw==", "range_end": "MA=="}',
            attempt,
        )
        assert rc != 0 and '"kvs"' not in out and '"header"' not in out, (attempt, out)


def test_a_pod_cannot_touch_its_node(cluster: LocalCluster, pods: dict) -> None:
    rc, out = _exec(cluster, "atk", "mount", "-t", "tmpfs", "x", "/mnt")
    assert rc != 0 and "permission denied" in out.lower(), out
    rc, out = _exec(cluster, "atk", "ip", "addr", "add", "10.9.9.9/32", "dev", "eth0")
    assert rc != 0 and "not permitted" in out.lower(), out
    node_run = f"{cluster.state_dir}/nodes/{cluster.nodes[0]}/run"
    for path in (cluster.state_dir, f"{node_run}/cni.sock", "/run/corral/cni.sock"):
        rc, out = _exec(cluster, "atk", "sh", "-c", f"ls -d {path} && cat {path}/state.json")
        assert rc != 0, (path, out)
    rc, out = _exec(cluster, "atk", "grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/self/status")
    eff = int(next(ln for ln in out.splitlines() if ln.startswith("CapEff")).split()[1], 16)
    assert not eff & (1 << 21) and not eff & (1 << 12), out  # no SYS_ADMIN, no NET_ADMIN


def test_forged_vxlan_from_a_pod_never_reaches_another_node(
    cluster: LocalCluster, pods: dict
) -> None:
    victim_ip = pods["victim"]["status"]["podIP"]
    atk_ip = pods["atk"]["status"]["podIP"]
    # The listener works: an honest datagram arrives, with the sender's own address.
    rc, out = _exec(
        cluster,
        "atk",
        "python3",
        "-c",
        f"import socket; socket.socket(2,2).sendto(b'honest', ('{victim_ip}', 9999))",
    )
    assert rc == 0, out
    wait_for(lambda: f"{atk_ip} b'honest'" in cluster.corral("logs", "victim").stdout, "honest")
    node2 = cluster.ips[cluster.nodes[1]]
    rc, out = _exec(cluster, "atk", "python3", "-c", FORGE_VXLAN, node2, "10.244.77.7", victim_ip)
    assert rc == 0 and "sent" in out, out
    time.sleep(2)  # nothing to wait for: the forged frames must never arrive
    assert "forged-vxlan" not in cluster.corral("logs", "victim").stdout


def test_spoofed_sources_never_arrive(cluster: LocalCluster, pods: dict) -> None:
    victim_ip = pods["victim"]["status"]["podIP"]
    other = pods["priv"]["status"]["podIP"]  # another pod's address
    # NET_ADMIN was asked for, so this pod may add an address...
    rc, out = _exec(cluster, "netadmin", "ip", "addr", "add", f"{other}/32", "dev", "eth0")
    assert rc == 0, out
    send = textwrap.dedent(
        f"""
        import socket
        s = socket.socket(2, 2)
        s.bind(('{other}', 0))
        for _ in range(5):
            s.sendto(b'spoofed', ('{victim_ip}', 9999))
        """
    )
    rc, out = _exec(cluster, "netadmin", "python3", "-c", send)
    assert rc == 0, out
    time.sleep(2)  # nothing to wait for: the spoofed datagrams must never arrive
    logs = cluster.corral("logs", "victim").stdout
    assert "spoofed" not in logs, logs


def test_a_privileged_pod_behaves_as_asked(cluster: LocalCluster, pods: dict) -> None:
    rc, out = _exec(cluster, "priv", "sh", "-c", "mount -t tmpfs x /mnt && umount /mnt")
    assert rc == 0, out


def test_a_pod_cannot_read_the_dns_pods_certificate(cluster: LocalCluster, pods: dict) -> None:
    # The nodes keep the cluster DNS's etcd certificate for its pods alone
    # (runtime/credentials.py): an ordinary pod sees neither the node's copy nor a mount.
    creds = f"{cluster.state_dir}/pod-credentials/etcd-dns"
    for path in (f"{creds}/tls.key", "/run/secrets/corral/etcd-dns/tls.key"):
        rc, out = _exec(cluster, "atk", "cat", path)
        assert rc != 0 and "PRIVATE KEY" not in out, (path, out)
