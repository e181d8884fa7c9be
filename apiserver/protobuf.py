"""Kubernetes' protobuf request bodies for the kinds kubectl's typed clients create
(`kubectl create configmap|secret|namespace` send them so), decoded to the JSON shape
the rest of the server handles. The envelope is `k8s\\0` + runtime.Unknown
(typeMeta=1, raw=2); the messages are k8s.io/api/core/v1/generated.proto's. Other
kinds are not decoded: the server answers 415 and the client may send JSON."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

MAGIC = b"k8s\x00"


class Unsupported(ValueError):
    """Not a body this module decodes (another kind, or not protobuf at all)."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise Unsupported("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varints and fixed, bytes for length-delimited."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
            yield num, v
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise Unsupported("truncated field")
            yield num, buf[i : i + n]
            i += n
        elif wire == 1:
            yield num, int.from_bytes(buf[i : i + 8], "little")
            i += 8
        elif wire == 5:
            yield num, int.from_bytes(buf[i : i + 4], "little")
            i += 4
        else:
            raise Unsupported(f"wire type {wire}")


def _s(v: int | bytes) -> str:
    assert isinstance(v, bytes)
    return v.decode()


def _entry(v: int | bytes, value: Callable[[bytes], Any]) -> tuple[str, Any]:
    assert isinstance(v, bytes)
    k, val = "", b""
    for n, x in fields(v):
        if n == 1:
            k = _s(x)
        elif n == 2:
            assert isinstance(x, bytes)
            val = x
    return k, value(val)


_META_STR = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}


def _meta(buf: bytes) -> dict[str, Any]:
    md: dict[str, Any] = {}
    for n, v in fields(buf):
        if n in _META_STR:
            if _s(v):  # Go writes every field, unset ones as ""
                md[_META_STR[n]] = _s(v)
        elif n == 11:
            k, val = _entry(v, bytes.decode)
            md.setdefault("labels", {})[k] = val
        elif n == 12:
            k, val = _entry(v, bytes.decode)
            md.setdefault("annotations", {})[k] = val
        elif n == 14:
            md.setdefault("finalizers", []).append(_s(v))
    return md


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _configmap(buf: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, v in fields(buf):
        if n == 1:
            assert isinstance(v, bytes)
            out["metadata"] = _meta(v)
        elif n == 2:
            k, val = _entry(v, bytes.decode)
            out.setdefault("data", {})[k] = val
        elif n == 3:
            k, val = _entry(v, _b64)
            out.setdefault("binaryData", {})[k] = val
        elif n == 4:
            out["immutable"] = bool(v)
    return out


def _secret(buf: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, v in fields(buf):
        if n == 1:
            assert isinstance(v, bytes)
            out["metadata"] = _meta(v)
        elif n == 2:
            k, val = _entry(v, _b64)
            out.setdefault("data", {})[k] = val
        elif n == 3 and _s(v):
            out["type"] = _s(v)
        elif n == 4:
            k, val = _entry(v, bytes.decode)
            out.setdefault("stringData", {})[k] = val
        elif n == 5:
            out["immutable"] = bool(v)
    return out


def _namespace(buf: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, v in fields(buf):
        if n == 1:
            assert isinstance(v, bytes)
            out["metadata"] = _meta(v)
        elif n == 2:
            assert isinstance(v, bytes)
            fin = [_s(x) for m, x in fields(v) if m == 1]
            out["spec"] = {"finalizers": fin} if fin else {}
    return out


DECODERS: dict[tuple[str, str], Callable[[bytes], dict[str, Any]]] = {
    ("v1", "ConfigMap"): _configmap,
    ("v1", "Secret"): _secret,
    ("v1", "Namespace"): _namespace,
}


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf request body as the JSON object it stands for; Unsupported otherwise."""
    if not body.startswith(MAGIC):
        raise Unsupported("no k8s protobuf envelope")
    try:
        api_version = kind = ""
        raw = b""
        for n, v in fields(body[len(MAGIC) :]):
            if n == 1:
                assert isinstance(v, bytes)
                tm = {m: _s(x) for m, x in fields(v)}
                api_version, kind = tm.get(1, ""), tm.get(2, "")
            elif n == 2:
                assert isinstance(v, bytes)
                raw = v
        dec = DECODERS.get((api_version, kind))
        if dec is None:
            raise Unsupported(f"{api_version} {kind} is not decoded from protobuf")
        return {"apiVersion": api_version, "kind": kind, **dec(raw)}
    except (AssertionError, UnicodeDecodeError) as e:
        raise Unsupported(f"malformed protobuf: {e}") from None
