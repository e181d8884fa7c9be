"""One log format for every daemon: time, level, daemon and node, logger, message."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s {daemon}[{node}] %(name)s: %(message)s"


def setup(daemon: str, node: str, level: int | None = None) -> None:
    """Give the root logger's handlers the daemon format (adding one if there is none)."""
    fmt = logging.Formatter(FORMAT.format(daemon=daemon, node=node))
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for h in root.handlers:
        h.setFormatter(fmt)
    if level is not None:
        root.setLevel(level)
    elif root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
