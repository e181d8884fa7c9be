"""CNI error codes (spec 1.1.0 section "Error") and the error the plugins raise."""

from __future__ import annotations

import json

# Well-known codes from the spec.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
# corral's own (the spec leaves 100+ to plugins).
INTERFACE_EXISTS = 100
IP_UNAVAILABLE = 101
RANGE_EXHAUSTED = 102
CHECK_FAILED = 103
INTERNAL = 999


class CNIError(Exception):
    """An error a plugin reports as the spec's JSON error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str = "1.0.0") -> dict[str, object]:
        d: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            d["details"] = self.details
        return d

    def to_json(self, cni_version: str = "1.0.0") -> str:
        return json.dumps(self.to_dict(cni_version))

    def __repr__(self) -> str:
        return f"CNIError({self.code}, {self.msg!r}, {self.details!r})"
