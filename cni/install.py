"""Installing the shims into a CNI bin dir and writing the node's conflist."""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from corral.common.files import write_atomic
from corral.common.native import build_cached

log = logging.getLogger(__name__)
SHIM_NAMES = ("corral-cni", "corral-ipam")
CONFLIST_NAME = "10-corral.conflist"
NETWORK_NAME = "corral"
# libcni 1.1 (containerd 1.6, CRI-O, podman 4) reads conflists up to 1.0.0.
CONFLIST_VERSION = "1.0.0"


def shim_script(socket_path: str) -> str:
    """cni/shim.py with the node's socket path filled in."""
    src = (Path(__file__).parent / "shim.py").read_text()
    marker = 'SOCKET = "/run/corral/cni.sock"'
    if marker not in src:  # pragma: no cover - guards edits of shim.py
        raise RuntimeError("shim.py lost its SOCKET line")
    return src.replace(marker, f"SOCKET = {json.dumps(socket_path)}", 1)


def shim_source(socket_path: str, python: str | None = None) -> str:
    """The shim, started by the system interpreter without site (-IS).

    It carries shim.py compiled (marshal): compiling its source at every start
    costs ~2 ms, a sixth of the interpreter's start. An interpreter of another
    bytecode version (cache_tag) compiles the source carried beside it instead.
    """
    py = python or os.path.realpath(sys.executable)
    src = shim_script(socket_path)
    code = marshal.dumps(compile(src, "corral-cni", "exec"))
    return (
        f"#!{py} -IS\n"
        "# corral CNI shim: cni/shim.py, precompiled by cni/install.py\n"
        "import sys\n"
        f"if sys.implementation.cache_tag == {sys.implementation.cache_tag!r}:\n"
        "    import marshal\n"
        f"    exec(marshal.loads({code!r}))\n"
        "else:\n"
        f"    exec(compile({src!r}, 'corral-cni', 'exec'))\n"
    )


def build_native_shim(socket_path: str, out_path: str) -> None:
    """Copy cni/shim.c (same wire format as shim.py), built with the socket path baked
    in (cached per path: `corral.common.native`), to `out_path`."""
    flags = [f"-DCORRAL_SOCKET={json.dumps(socket_path)}"]
    built = build_cached(str(Path(__file__).parent / "shim.c"), "cni-shim", flags)
    shutil.copyfile(built, out_path)


def install_shims(bin_dir: str, socket_path: str, native: bool = False) -> list[str]:
    """Write `corral-cni` and `corral-ipam` into bin_dir (atomically, 0755).

    The Python shim by default; with `native`, the C forwarder (falls back to the
    Python shim, with a warning, when it cannot be built).
    """
    if native:
        os.makedirs(bin_dir, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=bin_dir, prefix=".corral-shim-")
            os.close(fd)
            try:
                build_native_shim(socket_path, tmp)
                os.chmod(tmp, 0o755)
                out = []
                for name in SHIM_NAMES:
                    path = os.path.join(bin_dir, name)
                    link = f"{tmp}.{name}"
                    os.link(tmp, link)
                    os.replace(link, path)
                    out.append(path)
                return out
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log.warning("%s; installing the Python shim instead", e)
    src = shim_source(socket_path)
    out = []
    for name in SHIM_NAMES:
        path = os.path.join(bin_dir, name)
        try:
            if Path(path).read_text() == src:
                out.append(path)
                continue
        except (OSError, ValueError):  # absent, or the native shim
            pass
        write_atomic(path, src, 0o755, make_dirs=True)
        out.append(path)
    return out


def conflist(
    subnet: dict[str, Any], bin_dir: str | None = None, bridge: str = "cni0"
) -> dict[str, Any]:
    """The node's network list: corral-cni (+ portmap when installed), flannel-style.

    ipMasq is left to the overlay when subnet.json says it masquerades (`ipMasq`),
    as flannel's CNI plugin does with FLANNEL_IPMASQ.
    """
    main: dict[str, Any] = {
        "type": "corral-cni",
        "bridge": bridge,
        "isGateway": True,
        "hairpinMode": True,
        "ipMasq": not bool(subnet.get("ipMasq", True)),
        "ipam": {"type": "corral-ipam"},
    }
    if subnet.get("mtu"):
        main["mtu"] = int(subnet["mtu"])
    plugins = [main]
    if bin_dir and os.access(os.path.join(bin_dir, "portmap"), os.X_OK):
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": True})
    return {"cniVersion": CONFLIST_VERSION, "name": NETWORK_NAME, "plugins": plugins}


def write_conflist(conf_dir: str, subnet: dict[str, Any], bin_dir: str | None = None) -> str:
    path = os.path.join(conf_dir, CONFLIST_NAME)
    data = json.dumps(conflist(subnet, bin_dir), indent=2) + "\n"
    try:
        if Path(path).read_text() == data:
            return path
    except OSError:
        pass
    write_atomic(path, data, 0o644, make_dirs=True)
    return path
