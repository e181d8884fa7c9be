"""One typed wrapper for every BPF map corral reads or writes from Python.

A `MapSpec` says what a map is: kernel type, key and value ctypes types
(c_uint32, a Structure mirroring the C struct), max entries, flags. A
`BpfMap` is an fd on such a map whose kernel layout was checked against the
spec when it was opened, so a Python struct that drifted from the C one, or
a pin left by an older corral, is refused with what differs instead of being
read and written at the wrong size.

Ways in:
- `BpfMap.pinned(path, spec)`: open the pin at `path`, or create the map and
  pin it there (racing creators: the loser opens the winner's pin);
  `recreate=True` replaces a pin of another layout (only where the caller
  can lose its entries), otherwise `LayoutMismatch` says what differs.
- `BpfMap.open(path, spec)`: the pin, or None when nothing is pinned there.
- `BpfMap.of_fd(fd, spec)`: a map somebody else holds (a BCC table's fd); dup'd.

Keys and values go in as instances of the spec's types or what those take
(ints for scalars, tuples for Structures) and come out as ints (scalar types)
or Structure instances; per-CPU maps read as one value per possible CPU.
`update_batch` and `delete_batch` are one BPF_MAP_*_BATCH syscall where the
kernel has it for the map type, one call per entry otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from corral.ebpf import libbpf

# map types from uapi/linux/bpf.h
HASH, ARRAY, PERCPU_HASH, PERCPU_ARRAY, LRU_HASH, LRU_PERCPU_HASH, LPM_TRIE = 1, 2, 5, 6, 9, 10, 11
TYPE_NAMES = {
    HASH: "hash",
    ARRAY: "array",
    PERCPU_HASH: "percpu_hash",
    PERCPU_ARRAY: "percpu_array",
    LRU_HASH: "lru_hash",
    LRU_PERCPU_HASH: "lru_percpu_hash",
    LPM_TRIE: "lpm_trie",
}
_PER_CPU = {PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH}
_ARRAYS = {ARRAY, PERCPU_ARRAY}
BPF_F_NO_PREALLOC = 1
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
ENOTSUPP = 524  # the kernel's own "not supported" (no batch ops for this map type)


T = TypeVar("T")


class LayoutMismatch(OSError):
    """A map (pinned, or handed over by fd) is not laid out as the spec says."""

    def __init__(self, where: str, differences: list[str]) -> None:
        self.where, self.differences = where, differences
        super().__init__(errno.EINVAL, f"{where}: {'; '.join(differences)}")


@dataclass(frozen=True)
class Layout:
    """What the kernel checks a key and value against: (type, key, value, max entries)."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int | None = None  # None: not compared (libbcc does not say a table's flags)

    @classmethod
    def of_fd(cls, fd: int) -> Layout:
        i = info(fd)
        return cls(i.type, i.key_size, i.value_size, i.max_entries, i.map_flags)

    def differences(self, have: Layout) -> list[str]:
        """What `have` (the kernel's) does differently from this one, e.g. "key size 8, not 12"."""
        out = []
        if have.type != self.type:
            t = TYPE_NAMES.get
            out.append(f"type {t(have.type, have.type)}, not {t(self.type, self.type)}")
        for what, a, b in (
            ("key size", have.key_size, self.key_size),
            ("value size", have.value_size, self.value_size),
            ("max entries", have.max_entries, self.max_entries),
        ):
            if a != b:
                out.append(f"{what} {a}, not {b}")
        if None not in (self.flags, have.flags) and have.flags != self.flags:
            out.append(f"flags {have.flags:#x}, not {self.flags:#x}")
        return out


@dataclass(frozen=True)
class MapSpec:
    """A map's name, kernel type, key and value types, size and creation flags."""

    name: str
    type: int
    key: Any  # a ctypes type
    value: Any
    max_entries: int
    flags: int = 0

    @property
    def layout(self) -> Layout:
        size = ctypes.sizeof
        return Layout(self.type, size(self.key), size(self.value), self.max_entries, self.flags)

    @property
    def per_cpu(self) -> bool:
        return self.type in _PER_CPU


def info(fd: int) -> libbpf.MapInfo:
    """The kernel's view of a map: `.id`, `.type`, `.key_size`, `.value_size`, `.max_entries`."""
    return libbpf.obj_info(fd, libbpf.MapInfo())


@functools.cache
def possible_cpus() -> int:
    return libbpf.check(libbpf.bpf().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def ip_key(ip: str) -> int:
    """An IPv4 address as the u32 whose memory holds it in network byte order."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def ip_of(v: int) -> str:
    """The inverse of ip_key."""
    return socket.inet_ntoa(v.to_bytes(4, "little"))


def set_mac(field: Any, mac: str) -> None:
    """Fill a `u8[6]` Structure field from "aa:bb:..."."""
    for i, b in enumerate(bytes.fromhex(mac.replace(":", ""))):
        field[i] = b


def _as(cls: Any, v: Any) -> Any:
    if isinstance(v, cls):
        return v
    return cls(*v) if isinstance(v, tuple) else cls(v)


def _out(obj: Any) -> Any:
    # arrays of scalars index to Python ints already
    return obj.value if isinstance(obj, ctypes._SimpleCData) else obj


def _array(cls: Any, values: Sequence[Any]) -> Any:
    """A ctypes array of `cls` from instances or plain values.

    Plain values go straight into the array: making a ctypes object per
    entry first costs more than the syscall itself.
    """
    try:
        return (cls * len(values))(*values)
    except TypeError:
        return (cls * len(values))(*(_as(cls, v) for v in values))


def _unsupported(err: int, done: int) -> bool:
    # ENOTSUPP: no batch op for this map type; EINVAL before anything: an old kernel
    return err in (ENOTSUPP, errno.EOPNOTSUPP) or (err == errno.EINVAL and done == 0)


class BpfMap:
    """An open map of a known spec; closes its fd on close() or at the end of a with."""

    def __init__(self, fd: int, spec: MapSpec, where: str) -> None:
        """Take over `fd` (closed here when the layout is refused)."""
        self.fd, self.spec, self.where = fd, spec, where
        try:
            i = info(fd)
            have = Layout(i.type, i.key_size, i.value_size, i.max_entries, i.map_flags)
            diff = spec.layout.differences(have)
            if diff:
                raise LayoutMismatch(where, diff)
        except OSError:
            os.close(fd)
            self.fd = -1
            raise
        self.id = int(i.id)
        self._vsize = ctypes.sizeof(spec.value)
        if spec.per_cpu:  # the kernel reads and writes one 8-byte-aligned slot per CPU
            self._vsize = (self._vsize + 7) // 8 * 8

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str, spec: MapSpec) -> BpfMap | None:
        """The map pinned at `path`, or None when nothing is pinned there."""
        fd = libbpf.bpf().bpf_obj_get(path.encode())
        if fd == -errno.ENOENT:
            return None
        libbpf.check(fd, f"bpf_obj_get {path}")
        return cls(fd, spec, path)

    @classmethod
    def pinned(
        cls, path: str, spec: MapSpec, create: bool = True, recreate: bool = False
    ) -> BpfMap:
        """The map pinned at `path`, created and pinned there when missing (and `create`).

        A pin of another layout raises LayoutMismatch, or with `recreate` is
        replaced by a fresh, empty map (its entries are lost; users holding
        the old one keep it until they reopen the pin).
        """
        lib = libbpf.bpf()
        for _ in range(3):
            try:
                m = cls.open(path, spec)
            except LayoutMismatch:
                if not recreate:
                    raise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                m = None
            if m is not None:
                return m
            if not create:
                raise FileNotFoundError(errno.ENOENT, f"no map pinned at {path}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = create_map(spec)
            rc = lib.bpf_obj_pin(fd, path.encode())
            if rc == 0:
                return cls(fd, spec, path)
            os.close(fd)
            if -rc != errno.EEXIST:  # EEXIST: somebody pinned one first; open theirs
                libbpf.check(rc, f"pin {path}")
        raise OSError(errno.EAGAIN, f"{path}: pinned and unpinned under us")

    @classmethod
    def of_fd(cls, fd: int, spec: MapSpec, where: str | None = None) -> BpfMap:
        """A map another handle holds (a BCC table's `map_fd`); this one has its own fd."""
        return cls(os.dup(fd), spec, where or spec.name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BpfMap({self.where}, id {self.id})"

    # ------------------------------------------------------------ one entry

    def _key(self, k: Any) -> Any:
        return _as(self.spec.key, k)

    def _value_buf(self) -> Any:
        n = possible_cpus() if self.spec.per_cpu else 1
        return ctypes.create_string_buffer(self._vsize * n)

    def _decode_value(self, buf: Any, at: int = 0) -> Any:
        t = self.spec.value
        if not self.spec.per_cpu:
            return _out(t.from_buffer_copy(buf, at))
        n = possible_cpus()
        return [_out(t.from_buffer_copy(buf, at + i * self._vsize)) for i in range(n)]

    def _encode_value(self, v: Any) -> Any:
        """A buffer the kernel reads a value from (per-CPU: `v` on every CPU, or a list)."""
        t = self.spec.value
        if not self.spec.per_cpu:
            return _as(t, v)
        n = possible_cpus()
        vals = v if isinstance(v, list) else [v] * n
        if len(vals) != n:
            raise ValueError(f"{self.where}: {len(vals)} per-CPU values for {n} CPUs")
        buf = ctypes.create_string_buffer(self._vsize * n)
        for i, x in enumerate(vals):
            one = _as(t, x)
            ctypes.memmove(ctypes.byref(buf, i * self._vsize), ctypes.byref(one), ctypes.sizeof(t))
        return buf

    def get(self, key: Any, default: Any = None) -> Any:
        k, buf = self._key(key), self._value_buf()
        rc = libbpf.bpf().bpf_map_lookup_elem(self.fd, ctypes.byref(k), buf)
        if rc == -errno.ENOENT:
            return default
        libbpf.check(rc, f"{self.where}: lookup")
        return self._decode_value(buf)

    def put(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        k, v = self._key(key), self._encode_value(value)
        rc = libbpf.bpf().bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(v), flags)
        libbpf.check(rc, f"{self.where}: update")

    def delete(self, key: Any) -> bool:
        """Remove one entry; False when it was not there (arrays: zeroed, always True)."""
        if self.spec.type in _ARRAYS:
            self.put(key, self.spec.value())
            return True
        rc = libbpf.bpf().bpf_map_delete_elem(self.fd, ctypes.byref(self._key(key)))
        if rc == -errno.ENOENT:
            return False
        libbpf.check(rc, f"{self.where}: delete")
        return True

    # ------------------------------------------------------------ many entries

    def keys(self) -> Iterator[Any]:
        """Every key, by BPF_MAP_GET_NEXT_KEY."""
        lib, t = libbpf.bpf(), self.spec.key
        cur: Any = None
        while True:
            nxt = t()
            rc = lib.bpf_map_get_next_key(
                self.fd, None if cur is None else ctypes.byref(cur), ctypes.byref(nxt)
            )
            if rc == -errno.ENOENT:
                return
            libbpf.check(rc, f"{self.where}: get next key")
            yield _out(nxt)
            cur = nxt

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def items(self) -> list[tuple[Any, Any]]:
        """Every (key, value): BPF_MAP_LOOKUP_BATCH where there is one, else key by key."""
        if not self.spec.per_cpu:
            got = self._lookup_batch()
            if got is not None:
                return got
        out = []
        for k in self.keys():
            v = self.get(k)
            if v is not None:  # deleted since
                out.append((k, v))
        return out

    def _lookup_batch(self, chunk: int = 4096) -> list[tuple[Any, Any]] | None:
        lib, kt = libbpf.bpf(), self.spec.key
        out: list[tuple[Any, Any]] = []
        token = ctypes.create_string_buffer(max(ctypes.sizeof(kt), 8))
        start: Any = None
        while True:
            keys = (kt * chunk)()
            vals = ctypes.create_string_buffer(self._vsize * chunk)
            cnt = ctypes.c_uint32(chunk)
            rc = lib.bpf_map_lookup_batch(
                self.fd, start, token, keys, vals, ctypes.byref(cnt), None
            )  # fmt: skip
            if rc < 0 and -rc == errno.ENOSPC and cnt.value == 0:
                chunk *= 4  # one hash bucket holds more than the chunk
                continue
            if rc < 0 and -rc != errno.ENOENT:
                if _unsupported(-rc, len(out) + cnt.value):
                    return None
                libbpf.check(rc, f"{self.where}: BPF_MAP_LOOKUP_BATCH")
            for i in range(cnt.value):
                out.append((_out(keys[i]), self._decode_value(vals, i * self._vsize)))
            if rc < 0:  # ENOENT: that was the last of them
                return out
            start = ctypes.byref(token)

    def update_batch(self, items: Iterable[tuple[Any, Any]], fallback: bool = True) -> str:
        """Write many (key, value) pairs in one BPF_MAP_UPDATE_BATCH; "batch" or "loop".

        Per-CPU maps, and map types or kernels without the batch syscall, get
        one update per entry, unless `fallback` is False (then OSError).
        """
        pairs = list(items)
        if not pairs:
            return "batch"
        if not self.spec.per_cpu:
            keys = _array(self.spec.key, [k for k, _ in pairs])
            values = _array(self.spec.value, [v for _, v in pairs])
            cnt = ctypes.c_uint32(len(pairs))
            rc = libbpf.bpf().bpf_map_update_batch(self.fd, keys, values, ctypes.byref(cnt), None)
            if rc == 0:
                return "batch"
            if not (fallback and _unsupported(-rc, cnt.value)):
                raise OSError(
                    -rc,
                    f"{self.where}: BPF_MAP_UPDATE_BATCH ({cnt.value}/{len(pairs)} done): "
                    f"{os.strerror(-rc)}",
                )
        elif not fallback:
            raise OSError(ENOTSUPP, f"{self.where}: corral does not batch per-CPU values")
        for k, v in pairs:
            self.put(k, v)
        return "loop"

    def delete_batch(self, keys: Iterable[Any], fallback: bool = True) -> str:
        """Delete many keys in one BPF_MAP_DELETE_BATCH; keys not there are skipped.

        Array entries cannot be deleted: they are zeroed, one batch update.
        """
        ks = list(keys)
        if self.spec.type in _ARRAYS:
            zero = self.spec.value()
            return self.update_batch([(k, zero) for k in ks], fallback)
        if not ks:
            return "batch"
        arr, ksize, at = _array(self.spec.key, ks), ctypes.sizeof(self.spec.key), 0
        lib = libbpf.bpf()
        while at < len(ks):
            cnt = ctypes.c_uint32(len(ks) - at)
            rc = lib.bpf_map_delete_batch(
                self.fd, ctypes.byref(arr, at * ksize), ctypes.byref(cnt), None
            )
            if rc == 0:
                return "batch"
            if -rc == errno.ENOENT:  # ks[at + done] is not there: skip it, go on
                at += cnt.value + 1
                continue
            if not (fallback and _unsupported(-rc, cnt.value)):
                libbpf.check(rc, f"{self.where}: BPF_MAP_DELETE_BATCH")
            for k in ks[at:]:
                self.delete(k)
            return "loop"
        return "batch"

    def clear(self) -> int:
        """Remove every entry (arrays: zero them); how many there were."""
        ks = list(self.keys())
        self.delete_batch(ks)
        return len(ks)

    def memlock(self) -> int:
        """Kernel memory the map holds (bytes, its fd's `memlock`)."""
        with open(f"/proc/self/fdinfo/{self.fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
        return 0


def create_map(spec: MapSpec) -> int:
    """A new, unpinned map of `spec`; its fd."""
    opts = libbpf.MapCreateOpts(sz=ctypes.sizeof(libbpf.MapCreateOpts), map_flags=spec.flags)
    lay = spec.layout
    fd = libbpf.bpf().bpf_map_create(
        spec.type, spec.name[:15].encode(), lay.key_size, lay.value_size, lay.max_entries,
        ctypes.byref(opts),
    )  # fmt: skip
    return libbpf.check(fd, f"create map {spec.name}")


def unpin(path: str) -> bool:
    """Remove the pin at `path` (the map lives on while anyone holds it); False: none."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


class PinnedSet(Generic[T]):
    """A pinned hash map used as a set of keys (value u8 1), opened by another process
    than the one that pinned it: `encode`/`decode` turn a Python value into the map's
    key and back. `sync(want)` makes it hold exactly `want`."""

    def __init__(self, m: BpfMap, encode: Callable[[T], Any], decode: Callable[[Any], T]) -> None:
        self.map, self.path, self.id = m, m.where, m.id
        self._encode, self._decode = encode, decode

    def entries(self) -> set[T]:
        return {self._decode(k) for k in self.map}

    def update(self, add: Iterable[T], remove: Iterable[T]) -> None:
        self.map.update_batch([(self._encode(v), 1) for v in add])
        self.map.delete_batch([self._encode(v) for v in remove])

    def sync(self, want: set[T]) -> tuple[int, int]:
        """Make the map hold exactly `want`; (added, removed)."""
        have = self.entries()
        add, remove = want - have, have - want
        self.update(add, remove)
        return len(add), len(remove)

    def close(self) -> None:
        self.map.close()
