"""The native UDP hot path (fastpath.c), compiled on first use like the runtime's shim.

Built once per source version and interpreter into the user's cache dir and
loaded as the extension module `_corral_dnsfast`; without a C compiler or
Python's headers (or with CORRAL_DNS_FASTPATH=python) the server uses the same
fast path written in Python, which answers byte for byte the same.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import sysconfig
from types import ModuleType

from corral.common.native import build_cached

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
    include = sysconfig.get_paths()["include"]
    tag = f"{sys.version}|{sysconfig.get_config_var('EXT_SUFFIX')}".encode()
    try:
        return build_cached(
            SRC, "dnsfast", ["-shared", "-fPIC", f"-I{include}"], tag=tag, suffix=".so"
        )
    except RuntimeError:
        if not os.path.exists(os.path.join(include, "Python.h")):
            raise RuntimeError(f"no Python.h in {include} (install python3-dev)") from None
        raise


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_corral_dnsfast", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
