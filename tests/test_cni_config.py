"""Pure logic of the CNI plugins: request validation, ranges, result shapes."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.cni.config import make_range, parse_cni_args, parse_ipam, parse_request
from corral.cni.errors import CNIError
from corral.cni.install import conflist, shim_script, shim_source
from corral.cni.ipam import IPAM
from corral.cni.verbs import convert_result

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc",
    "CNI_IFNAME": "eth0",
    "CNI_NETNS": "/proc/self/ns/net",
    "CNI_PATH": "/opt/cni/bin",
}
CONF = {"cniVersion": "1.0.0", "name": "n", "type": "corral-cni"}


def test_valid_request_parses() -> None:
    req = parse_request(
        "corral-cni", ENV | {"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=p"}, json.dumps(CONF)
    )
    assert (req.command, req.container_id, req.ifname) == ("ADD", "abc", "eth0")
    assert req.cni_args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "p"}


@pytest.mark.parametrize(
    ("env", "stdin", "code"),
    [
        ({}, "[1, 2]", 6),
        ({"CNI_IFNAME": "a:b"}, None, 4),
        ({"CNI_IFNAME": "a b"}, None, 4),
        ({"CNI_CONTAINERID": "-starts-with-dash"}, None, 4),
        ({"CNI_COMMAND": "CHECK"}, json.dumps(CONF | {"cniVersion": "0.3.0"}), 1),
        ({}, json.dumps(CONF | {"type": "corral-ipam"}), 7),
    ],
)
def test_bad_requests(env: dict[str, str], stdin: str | None, code: int) -> None:
    with pytest.raises(CNIError) as e:
        parse_request("corral-cni", ENV | env, stdin if stdin is not None else json.dumps(CONF))
    assert e.value.code == code
    assert e.value.msg


def test_version_needs_no_environment() -> None:
    req = parse_request("corral-ipam", {"CNI_COMMAND": "VERSION"}, "")
    assert req.command == "VERSION" and req.cni_version == "0.3.0"


def test_ranges_skip_reserved_addresses() -> None:
    r = make_range({"subnet": "10.1.2.0/30"}, "r")
    assert [str(ip) for _, _, ip in IPAM._candidates([r], 0)] == ["10.1.2.2"]
    r = make_range({"subnet": "10.1.2.0/24", "rangeStart": "10.1.2.250"}, "r")
    assert [str(ip) for _, _, ip in IPAM._candidates([r], 2)] == [
        "10.1.2.252",
        "10.1.2.253",
        "10.1.2.254",
        "10.1.2.250",
        "10.1.2.251",
    ]
    with pytest.raises(CNIError) as e:
        make_range({"subnet": "10.1.2.0/24", "gateway": "10.9.9.9"}, "r")
    assert e.value.code == 7 and "outside" in e.value.msg


def test_requested_ips_from_all_three_places() -> None:
    conf = {"args": {"cni": {"ips": ["10.0.0.5"]}}, "runtimeConfig": {"ips": ["10.0.0.6/24"]}}
    ipc = parse_ipam(conf, parse_cni_args("IP=10.0.0.4"))
    assert ipc.requested == [ipaddress.IPv4Address(f"10.0.0.{i}") for i in (4, 5, 6)]


def test_result_shape_per_version() -> None:
    res = {"ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 2}]}
    assert convert_result(res, "0.4.0")["ips"][0]["version"] == "4"
    assert "version" not in convert_result(res, "1.0.0")["ips"][0]
    assert convert_result(res, "1.1.0")["cniVersion"] == "1.1.0"


def test_conflist_follows_the_overlay() -> None:
    c = conflist({"subnet": "10.244.3.0/24", "mtu": 1400, "ipMasq": True})
    assert c["cniVersion"] == "1.0.0" and c["name"] == "corral"
    main = c["plugins"][0]
    assert main["mtu"] == 1400 and main["ipMasq"] is False
    assert conflist({"subnet": "10.244.3.0/24", "ipMasq": False})["plugins"][0]["ipMasq"]


def test_shim_is_stdlib_only() -> None:
    script = shim_script("/run/x.sock")
    assert 'SOCKET = "/run/x.sock"' in script
    imports = [line for line in script.splitlines() if line.startswith(("import ", "from "))]
    assert [line.split()[1] for line in imports] == ["_socket", "posix", "sys"]
    src = shim_source("/run/x.sock", "/usr/bin/python3")
    assert src.startswith("#!/usr/bin/python3 -IS\n")
    imports = [
        line.strip() for line in src.splitlines() if line.strip().startswith(("import ", "from "))
    ]
    assert imports == ["import sys", "import marshal"]


@pytest.mark.parametrize("tag", ["same", "other"])
def test_shim_runs_precompiled_or_from_source(tmp_path: Path, tag: str) -> None:
    """The installed shim answers alike whether its interpreter takes the compiled
    code or (another bytecode version) compiles the source it carries."""
    src = shim_source(str(tmp_path / "absent.sock"), os.path.realpath(sys.executable))
    if tag == "other":
        src = src.replace(f"== {sys.implementation.cache_tag!r}", "== 'no-such-tag'", 1)
    exe = tmp_path / "corral-cni"
    exe.write_text(src)
    exe.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION"}
    r = subprocess.run(
        [str(exe)],
        input='{"cniVersion": "0.4.0"}',
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cniVersion"] == "0.4.0"
    env["CNI_COMMAND"] = "ADD"
    r = subprocess.run(
        [str(exe)], input="{}", capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert r.returncode == 1 and json.loads(r.stdout)["code"] == 11, r.stdout
