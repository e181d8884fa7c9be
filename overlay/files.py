"""The files the overlay keeps: its own state, and what it tells CNI and whoever debugs.

- `<state dir>/overlay.json`: the subnet and VTEP MAC, so a restart gets both back.
- `<run dir>/subnet.json`: the contract with the CNI plugin (see docs/overlay.md).
- `<run dir>/datapath.json`: which datapath carries pod traffic, and its counters.

Each is written so readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from corral.api.objects import NetworkSpec
from corral.common.files import write_json_atomic

STATE_FILE = "overlay.json"
DATAPATH_FILE = "datapath.json"


def load_state(state_dir: str) -> dict[str, Any]:
    """What the last run saved ({} if nothing readable)."""
    try:
        with open(os.path.join(state_dir, STATE_FILE)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(state_dir: str, subnet: str | None, vtep_mac: str) -> None:
    write_json_atomic(os.path.join(state_dir, STATE_FILE), {"subnet": subnet, "vtepMAC": vtep_mac})


def write_subnet_file(path: str, spec: NetworkSpec, subnet: str, mtu: int, node: str) -> None:
    write_json_atomic(
        path,
        {
            "network": spec.network,
            "subnet": subnet,
            "mtu": mtu,
            "ipMasq": spec.ip_masq,
            "node": node,
        },
    )


def write_datapath_file(run_dir: str, doc: dict[str, Any]) -> None:
    write_json_atomic(os.path.join(run_dir, DATAPATH_FILE), doc)
