"""`corral net capture -w FILE` as a user runs it: a subprocess, a real sniffer in a
namespace, real packets, stopped by SIGTERM, by `-c` and by `--duration`.

The "node" is a pair of namespaces joined by a veth (`ul0` is its underlay) and
etcd holds its Node; `--via` reaches it through a script that runs commands in the
node's namespace and answers the debug-socket query with that one fact the
capture reads (the underlay's name), so no cluster is needed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from corral.api.objects import Node, ObjectMeta
from corral.netdebug.render import JsonStream, dump_json
from corral.node import netns
from tests.cni_helpers import wait_until
from tests.etcd_helpers import on_store

NODE = "cap-node"
NODE_IP, PEER_IP = "10.77.31.1", "10.77.31.2"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def node(etcd_url: str, tmp_path: Any) -> Iterator[dict[str, str]]:
    """The node's namespace, its peer's, and the environment that makes `corral net` reach it."""
    tag = f"{os.getpid()}"
    ns, peer = f"ndcap-n-{tag}", f"ndcap-p-{tag}"
    netns.add(ns)
    netns.add(peer)
    try:
        _sh("ip", "-n", ns, "link", "add", "ul0", "type", "veth", "peer", "eth0", "netns", peer)
        _sh("ip", "-n", ns, "addr", "add", f"{NODE_IP}/24", "dev", "ul0")
        _sh("ip", "-n", peer, "addr", "add", f"{PEER_IP}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "ul0", "up")
        _sh("ip", "-n", peer, "link", "set", "eth0", "up")
        dump = tmp_path / "dump.json"
        dump.write_text(
            json.dumps(
                {
                    "node": NODE,
                    "components": {
                        "overlay": {"debug": {"underlay": {"iface": "ul0"}, "links": []}}
                    },
                }
            )
        )
        via = tmp_path / "via.sh"
        via.write_text(
            "#!/bin/sh\n"
            f'case "$*" in *corral.daemon.debug*) exec cat {dump} ;; esac\n'
            f'exec ip netns exec {ns} sh -c "exec $*"\n'
        )
        via.chmod(0o755)

        async def put(s: Any) -> None:
            await s.create(Node(metadata=ObjectMeta(name=NODE)))

        on_store(etcd_url, put)
        env = os.environ | {
            "CORRAL_ETCD": etcd_url,
            "CORRAL_NET_VIA": str(via),
            "CORRAL_NET_PYTHON": sys.executable,
        }
        yield {"env": env, "peer": peer}  # type: ignore[misc]
    finally:
        netns.remove(ns)
        netns.remove(peer)


def _capture(node: dict, pcap: Any, *flags: str) -> subprocess.Popen:
    cap = subprocess.Popen(
        [sys.executable, "-m", "corral", "net", "capture", "--node", NODE, "-w", str(pcap), *flags],
        env=node["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert cap.stdout is not None
    first = cap.stdout.readline()
    if "capturing on" not in first:
        cap.kill()
        out, err = cap.communicate()
        pytest.fail(f"the capture did not start: {first}{out}{err}")
    return cap


@pytest.fixture
def ping(node: dict) -> Iterator[None]:
    """The peer pings the node until the test ends."""
    p = subprocess.Popen(
        ["ip", "netns", "exec", node["peer"], "ping", "-i", "0.2", NODE_IP],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        p.terminate()
        p.wait()


def _pings(pcap: Any) -> list[Any]:
    from scapy.layers.inet import ICMP, IP
    from scapy.utils import rdpcap

    try:
        pkts = rdpcap(str(pcap))
    except (OSError, EOFError):  # not written yet
        return []
    return [p for p in pkts if p.haslayer(ICMP) and p[IP].src == PEER_IP]


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM,), (signal.SIGHUP,), (signal.SIGTERM, signal.SIGTERM)],
    ids=["term", "hup", "term-twice"],
)
def test_sigterm_or_sighup_leaves_a_whole_pcap_written_as_packets_came(
    node: dict, ping: None, tmp_path: Any, signals: tuple[signal.Signals, ...]
) -> None:
    pcap = tmp_path / "term.pcap"
    cap = _capture(node, pcap)
    try:
        # The file grows while the capture runs: packets are written as they come,
        # not kept until the end.
        seen = wait_until(
            lambda: p if len(p := _pings(pcap)) >= 3 else None, what="pings in the pcap"
        )
        assert cap.poll() is None
        for sig in signals:
            cap.send_signal(sig)
        out, err = cap.communicate(timeout=30)
    finally:
        if cap.poll() is None:
            cap.kill()
    assert cap.returncode == 0, err
    assert "packet(s) written to" in out, out
    after = _pings(pcap)
    assert len(after) >= len(seen)
    assert all(p.time > 0 for p in after)


def test_count_stops_after_count_packets(node: dict, ping: None, tmp_path: Any) -> None:
    from scapy.utils import rdpcap

    pcap = tmp_path / "count.pcap"
    cap = _capture(node, pcap, "-c", "3")
    out, err = cap.communicate(timeout=60)
    assert cap.returncode == 0, err
    assert len(rdpcap(str(pcap))) == 3
    assert "3 packet(s) written" in out, out


def test_duration_stops_by_itself_with_a_valid_pcap(node: dict, tmp_path: Any) -> None:
    from scapy.utils import rdpcap

    pcap = tmp_path / "quiet.pcap"
    cap = _capture(node, pcap, "--duration", "1")
    out, err = cap.communicate(timeout=60)  # nothing to capture: only --duration ends it
    assert cap.returncode == 0, err
    assert len(rdpcap(str(pcap))) == 0
    assert "0 packet(s) written" in out, out


@pytest.mark.parametrize("n", [0, 1, 3])
def test_json_stream_writes_what_dump_json_prints(
    n: int, capsys: pytest.CaptureFixture[str]
) -> None:
    head = {"node": "n1", "interfaces": ["eth0", "veth1"]}
    items = [{"inner": {"src": f"10.0.0.{i}", "dst": "10.0.0.9"}, "time": i} for i in range(n)]
    dump_json(head | {"packets": items})
    want = capsys.readouterr().out
    buf = io.StringIO()
    stream = JsonStream(head, "packets", buf)
    for it in items:
        stream.item(it)
    stream.close()
    assert buf.getvalue() == want
