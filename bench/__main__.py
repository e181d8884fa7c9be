"""`python -m bench` (`make bench`): every benchmark in turn, each against its peer.

Each one prints its own figures and ratio; `python -m bench.<name> --help`
runs one with other settings. Needs root (namespaces, cgroups).
"""

from __future__ import annotations

import sys
import time

from bench import cni, control, dns, overlay, pod_startup, services

RUNS = [
    ("cni", cni.main, []),
    ("overlay", overlay.main, []),
    ("pod_startup", pod_startup.main, []),
    ("pod_startup --cluster", pod_startup.main, ["--cluster"]),
    ("control", control.main, []),
    ("services", services.main, []),
    ("dns", dns.main, []),
]


def main() -> int:
    failed = []
    for name, fn, argv in RUNS:
        print(f"=== bench.{name}", flush=True)
        t0 = time.monotonic()
        rc = fn(argv)
        print(f"=== bench.{name}: exit {rc} after {time.monotonic() - t0:.0f} s\n", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
