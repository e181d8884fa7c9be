"""The native UDP hot path (fastpath.c), compiled on first use like the runtime's shim.

Built once per source version and interpreter into the user's cache dir and
loaded as the extension module `_corral_dnsfast`; without a C compiler or
Python's headers (or with CORRAL_DNS_FASTPATH=python) the server uses the same
fast path written in Python, which answers byte for byte the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from types import ModuleType

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastpath.c")
ENV = "CORRAL_DNS_FASTPATH"

log = logging.getLogger(__name__)
_loaded: list[ModuleType | None] = []  # memo


def load() -> ModuleType | None:
    """The compiled module, or None (then the Python fast path is used). Blocking."""
    if _loaded:
        return _loaded[0]
    mod = None
    if os.environ.get(ENV, "native") != "python":
        try:
            mod = _load(_build())
        except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
            log.warning("dns: using the Python fast path (slower): %s", e)
    _loaded.append(mod)
    return mod


def _build() -> str:
    with open(SRC, "rb") as f:
        src = f.read()
    tag = f"{sys.version}|{sysconfig.get_config_var('EXT_SUFFIX')}".encode()
    digest = hashlib.sha256(src + tag).hexdigest()[:16]
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "corral"
    )
    out = os.path.join(cache, f"dnsfast-{digest}.so")
    if os.path.exists(out):
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) to build clusterdns/fastpath.c")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        raise RuntimeError(f"no Python.h in {include} (install python3-dev)")
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".dnsfast-", suffix=".so")
    os.close(fd)
    try:
        r = subprocess.run(
            [cc, "-O2", "-Wall", "-shared", "-fPIC", f"-I{include}", "-o", tmp, SRC],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"building clusterdns/fastpath.c failed: {r.stderr.strip()}")
        os.replace(tmp, out)  # atomic: concurrent builders end with the same file
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_corral_dnsfast", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
