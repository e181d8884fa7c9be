"""The libcni-like CNI client against the reference plugins (bridge + host-local + loopback).

Plugins run inside a test-made "node" namespace (exec_prefix = nsenter), so the
bridge and host-side veths land there; pods are test-made namespaces too.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from corral.cni.client import (
    CNIClient,
    CNIError,
    RuntimeConf,
    is_pod_sandbox,
    load_conflist,
    pod_args,
    result_ips,
)
from corral.node import netns

REF_BIN = "/usr/lib/cni"
pytestmark = pytest.mark.skipif(
    not os.path.exists(f"{REF_BIN}/bridge"), reason="reference CNI plugins not installed"
)


def ref_conflist(name: str, subnet: str, data_dir: str, loopback: bool = True) -> dict:
    plugins: list[dict] = [
        {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": data_dir},
        }
    ]
    if loopback:
        plugins.append({"type": "loopback"})
    return {"cniVersion": "1.0.0", "name": name, "plugins": plugins}


@dataclass
class Env:
    node: str
    tmp: str
    conf_dir: str
    data_dir: str
    client: CNIClient

    def pod_ns(self) -> str:
        name = f"ccp-{secrets.token_hex(4)}"
        netns.add(name)
        self._pods.append(name)
        return name

    _pods: list[str]


@pytest.fixture
def env() -> Iterator[Env]:
    node = f"ccn-{secrets.token_hex(4)}"
    tmp = tempfile.mkdtemp(prefix="corral-cni-client-")
    netns.add(node)
    conf_dir, data_dir = os.path.join(tmp, "net.d"), os.path.join(tmp, "ipam")
    os.makedirs(conf_dir)
    client = CNIClient(
        [REF_BIN],
        os.path.join(tmp, "cache"),
        exec_prefix=["nsenter", f"--net={netns.path(node)}", "--"],
    )
    e = Env(node, tmp, conf_dir, data_dir, client, [])
    try:
        yield e
    finally:
        for p in e._pods:
            netns.remove(p)
        netns.remove(node)
        shutil.rmtree(tmp, ignore_errors=True)


def write_conf(env: Env, fname: str, doc: dict) -> None:
    with open(os.path.join(env.conf_dir, fname), "w") as f:
        json.dump(doc, f)


def rt_for(pod: str, cid: str) -> RuntimeConf:
    return RuntimeConf(
        container_id=cid,
        netns=netns.path(pod),
        ifname="eth0",
        args=pod_args("default", "p1", "uid-1", cid),
    )


async def test_add_check_del_with_reference_plugins(env: Env) -> None:
    write_conf(env, "10-ref.conflist", ref_conflist("refnet", "10.244.7.0/24", env.data_dir))
    net = load_conflist(env.conf_dir)
    pod = env.pod_ns()
    cid = secrets.token_hex(32)
    result = await env.client.add(net, rt_for(pod, cid))
    ip = result_ips(result)[0]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.7.0/24")
    # The pod really has the address, and the node reaches it over the bridge.
    out = netns.run(pod, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert ip in out
    assert netns.run(env.node, ["ping", "-c1", "-W2", ip], check=False).returncode == 0
    assert "UP" in netns.run(pod, ["ip", "-o", "link", "show", "lo"]).stdout
    # Cached in libcni's format, where cnitool/containerd look for it.
    path = os.path.join(env.tmp, "cache", "results", f"refnet-{cid}-eth0")
    with open(path) as f:
        cached = json.load(f)
    assert cached["kind"] == "cniCacheV1" and cached["containerId"] == cid
    assert json.loads(base64.b64decode(cached["config"]))["name"] == "refnet"
    assert ["K8S_POD_INFRA_CONTAINER_ID", cid] in cached["cniArgs"]
    assert cached["result"]["ips"][0]["address"].startswith(ip + "/")
    # host-local recorded the allocation under the container ID.
    with open(os.path.join(env.data_dir, "refnet", ip)) as f:
        assert f.read().startswith(cid)

    await env.client.check(net, rt_for(pod, cid))

    await env.client.delete(net, rt_for(pod, cid))
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.join(env.data_dir, "refnet", ip))
    assert "eth0" not in netns.run(pod, ["ip", "-o", "link"]).stdout


async def test_failed_add_is_undone(env: Env) -> None:
    doc = ref_conflist("refnet", "10.244.8.0/24", env.data_dir, loopback=False)
    doc["plugins"].append({"type": "no-such-plugin"})
    write_conf(env, "10-ref.conflist", doc)
    net = load_conflist(env.conf_dir)
    pod = env.pod_ns()
    cid = secrets.token_hex(32)
    with pytest.raises(CNIError, match="no-such-plugin"):
        await env.client.add(net, rt_for(pod, cid))
    # bridge+host-local were DELeted again: no IP held, no veth left, nothing cached.
    held = (
        [n for n in os.listdir(os.path.join(env.data_dir, "refnet")) if n[0].isdigit()]
        if os.path.isdir(os.path.join(env.data_dir, "refnet"))
        else []
    )
    assert held == []
    assert "eth0" not in netns.run(pod, ["ip", "-o", "link"]).stdout
    assert env.client.cache.entries() == []


async def test_plugin_error_object_is_reported(env: Env) -> None:
    doc = ref_conflist("refnet", "10.244.9.0/24", env.data_dir)
    doc["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "not-a-subnet"}]]
    write_conf(env, "10-ref.conflist", doc)
    pod = env.pod_ns()
    with pytest.raises(CNIError) as ei:
        await env.client.add(load_conflist(env.conf_dir), rt_for(pod, secrets.token_hex(8)))
    assert "bridge" in str(ei.value) and "not-a-subnet" in str(ei.value)


async def test_gc_deletes_unknown_attachments(env: Env) -> None:
    write_conf(env, "10-ref.conflist", ref_conflist("refnet", "10.244.10.0/24", env.data_dir))
    net = load_conflist(env.conf_dir)
    pods = [env.pod_ns(), env.pod_ns()]
    cids = [secrets.token_hex(32) for _ in pods]
    ips = [
        result_ips(await env.client.add(net, rt_for(p, c)))[0]
        for p, c in zip(pods, cids, strict=True)
    ]
    removed = await env.client.gc(keep={cids[0]}, netns_of={cids[1]: netns.path(pods[1])})
    assert removed == [cids[1]]
    assert os.path.exists(os.path.join(env.data_dir, "refnet", ips[0]))
    assert not os.path.exists(os.path.join(env.data_dir, "refnet", ips[1]))
    assert [e.container_id for e in env.client.cache.entries()] == [cids[0]]
    # GC also works when the pod's namespace is already gone (DEL with no netns).
    netns.remove(pods[0])
    assert await env.client.gc(keep=set()) == [cids[0]]
    assert not os.path.exists(os.path.join(env.data_dir, "refnet", ips[0]))


async def test_pod_runtime_gc_leaves_other_runtimes_attachments(env: Env) -> None:
    """The result cache is shared with podman/ctr on the node: the pod runtime's GC
    (`ours=is_pod_sandbox`) DELs only the pod sandboxes it made."""
    write_conf(env, "10-ref.conflist", ref_conflist("refnet", "10.244.11.0/24", env.data_dir))
    net = load_conflist(env.conf_dir)
    sandbox, other = env.pod_ns(), env.pod_ns()
    sid, oid = secrets.token_hex(32), secrets.token_hex(32)
    await env.client.add(net, rt_for(sandbox, sid))
    podman_like = RuntimeConf(  # what podman 4 passes: no pod UID, no infra ID
        container_id=oid,
        netns=netns.path(other),
        ifname="eth0",
        args=[("IgnoreUnknown", "1"), ("K8S_POD_NAME", "pm")],
    )
    await env.client.add(net, podman_like)
    assert await env.client.gc(keep=set(), ours=is_pod_sandbox) == [sid]
    assert [e.container_id for e in env.client.cache.entries()] == [oid]
    await env.client.delete(net, podman_like)


def test_first_config_file_in_name_order(tmp_path: str) -> None:
    d = str(tmp_path)
    with open(os.path.join(d, "20-b.conflist"), "w") as f:
        json.dump(ref_conflist("second", "10.244.1.0/24", "/nonexistent"), f)
    with open(os.path.join(d, "10-a.conf"), "w") as f:  # a single-plugin .conf is lifted
        json.dump({"cniVersion": "0.4.0", "name": "first", "type": "bridge"}, f)
    with open(os.path.join(d, "00-ignored.txt"), "w") as f:
        f.write("not a config")
    net = load_conflist(d)
    assert net.name == "first" and [p["type"] for p in net.plugins] == ["bridge"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"cniVersion": "1.0.0", "name": "x", "plugins": []}', "non-empty list"),
        (
            '{"cniVersion": "1.0.0", "name": "Bad Name!", "plugins": [{"type": "bridge"}]}',
            "network name",
        ),
        ('{"cniVersion": "1.0.0", "name": "x", "plugins": [{"bridge": "cni0"}]}', "no 'type'"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path: str, content: str, message: str) -> None:
    p = os.path.join(str(tmp_path), "10-x.conflist")
    with open(p, "w") as f:
        f.write(content)
    with pytest.raises(CNIError, match=message) as ei:
        load_conflist(str(tmp_path))
    assert "10-x.conflist" in str(ei.value)


def test_empty_dir_and_bad_ids(tmp_path: str) -> None:
    with pytest.raises(CNIError, match="no network config"):
        load_conflist(str(tmp_path))
    with pytest.raises(CNIError, match="container ID"):
        RuntimeConf(container_id="bad/id", netns="/x").validate()
    with pytest.raises(CNIError, match="interface name"):
        RuntimeConf(container_id="abc", netns="/x", ifname="much-too-long-ifname").validate()


async def test_missing_plugin_binary(env: Env) -> None:
    with pytest.raises(CNIError, match="failed to find plugin"):
        env.client.find_plugin("definitely-missing")
    v = await env.client.version("bridge")
    assert "1.0.0" in v["supportedVersions"]


async def test_cache_interoperates_with_libcni(env: Env) -> None:
    """What corral ADDs, libcni (containerd's client library) CHECKs and DELs, and back."""
    from tests.cni_helpers import build_libcni_client  # the Go libcni test client

    client = build_libcni_client()
    write_conf(env, "10-ref.conflist", ref_conflist("refnet", "10.244.11.0/24", env.data_dir))
    net = load_conflist(env.conf_dir)
    cache = os.path.join(env.tmp, "cache")

    def libcni(cmd: str, cid: str, pod: str) -> None:
        argv = [client, cmd, env.conf_dir, "refnet", cid, netns.path(pod), "eth0", cache]
        r = netns.run(env.node, argv, check=False, env=dict(os.environ, CNI_PATH=REF_BIN))
        assert r.returncode == 0, r.stdout + r.stderr

    pod = env.pod_ns()
    cid = secrets.token_hex(32)
    ip = result_ips(await env.client.add(net, rt_for(pod, cid)))[0]
    libcni("check", cid, pod)
    libcni("del", cid, pod)
    assert not os.path.exists(os.path.join(env.data_dir, "refnet", ip))
    assert env.client.cache.entries() == []

    pod2 = env.pod_ns()
    cid2 = secrets.token_hex(32)
    libcni("add", cid2, pod2)
    entry = env.client.cache.get("refnet", cid2, "eth0")
    assert entry is not None and entry.result is not None
    await env.client.check(net, rt_for(pod2, cid2))
    ip2 = result_ips(entry.result)[0]
    assert await env.client.gc(keep=set()) == [cid2]
    assert not os.path.exists(os.path.join(env.data_dir, "refnet", ip2))
