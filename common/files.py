"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any


def write_atomic(
    path: str, data: bytes | str, mode: int = 0o644, *, make_dirs: bool = False, fsync: bool = False
) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    The temporary file is created 0600 and set to `mode` before the rename, so a
    key is never readable by others, not even for a moment. `fsync` makes the data
    durable before the rename (state a restarted process must find).
    """
    d = os.path.dirname(path) or "."
    if make_dirs:
        os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)  # one write
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, data: dict[str, Any], mode: int = 0o644) -> None:
    """`data` as sorted JSON with a final newline, atomically (creating the directory)."""
    write_atomic(path, json.dumps(data, sort_keys=True) + "\n", mode, make_dirs=True)
