"""The cached `cc` build of corral's C helpers (container shim, CNI forwarder, DNS fast path).

Each build lands once in the user's cache dir under a name keyed by the source,
the compiler flags and a caller's tag (e.g. the interpreter version), so every
process after the first finds it ready; concurrent builders each compile to a
temporary file and rename it into place, ending with the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence


def cache_dir() -> str:
    return os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "corral"
    )


def build_cached(
    src: str, name: str, flags: Sequence[str] = (), *, tag: bytes = b"", suffix: str = ""
) -> str:
    """The path of `src` compiled with `cc -O2 -Wall FLAGS`, building it if needed.

    Raises RuntimeError naming the source when there is no compiler or it fails.
    """
    with open(src, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(source + "\0".join(flags).encode() + tag).hexdigest()[:16]
    cache = cache_dir()
    out = os.path.join(cache, f"{name}-{digest}{suffix}")
    if os.access(out, os.X_OK):
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    label = os.path.join(os.path.basename(os.path.dirname(src)), os.path.basename(src))
    if cc is None:
        raise RuntimeError(f"no C compiler (cc/gcc) to build {label}")
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{name}-", suffix=suffix)
    os.close(fd)
    try:
        r = subprocess.run(
            [cc, "-O2", "-Wall", *flags, "-o", tmp, src],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"building {label} failed: {r.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out
