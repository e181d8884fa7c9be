"""/openapi/v2: a schema-less Swagger document, so kubectl's client-side validation
has a document to read (without one, `kubectl create`/`apply` refuse: "failed to
download openapi"). With no definitions kubectl skips its own checks, and the
server's models (which forbid unknown fields) validate instead.

kubectl asks for gnostic's protobuf (`openapi.v2.Document`); the two fields served
(swagger = 1, info = 2 with title = 1 and version = 2) are encoded by hand, so no
generated protobuf module is needed. OpenAPI v3 (`kubectl explain`, server-side
field validation) comes later.
"""

from __future__ import annotations

from typing import Any

# What kubectl asks for, and what kube-openapi answers with (Go's mime parser refuses
# the '@' of the asked-for name in a Content-Type).
PROTOBUF = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
PROTOBUF_SERVED = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings and messages)."""
    out = bytearray([(number << 3) | 2])
    n = len(payload)
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + payload


def document(version: str) -> dict[str, Any]:
    return {"swagger": "2.0", "info": {"title": "corral", "version": version}, "paths": {}}


def document_protobuf(version: str) -> bytes:
    info = _field(1, b"corral") + _field(2, version.encode())
    return _field(1, b"2.0") + _field(2, info)
