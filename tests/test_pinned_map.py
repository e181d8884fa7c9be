"""corral.ebpf.pinned_map against the real kernel: pins, layout checks, typed and batch calls.

No BCC: maps are made with libbpf in a bpffs folder of this run
(/sys/fs/bpf/corral-test-<random>), removed with its pins in a finalizer.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from collections.abc import Iterator

import pytest

from corral.ebpf import loader
from corral.ebpf.pinned_map import (
    ARRAY,
    BPF_F_NO_PREALLOC,
    BPF_NOEXIST,
    HASH,
    LPM_TRIE,
    PERCPU_ARRAY,
    BpfMap,
    LayoutMismatch,
    MapSpec,
    ip_key,
    possible_cpus,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpffs and BPF maps")


class Ep(ctypes.Structure):
    _fields_ = [
        ("ip", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class Prefix(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("ip", ctypes.c_uint32)]


EPS = MapSpec("t_eps", HASH, Ep, ctypes.c_uint64, 65536, BPF_F_NO_PREALLOC)


@pytest.fixture(scope="module")
def pins() -> Iterator[str]:
    loader.ensure_bpffs()
    d = os.path.join(loader.BPFFS, f"corral-test-{uuid.uuid4().hex[:8]}")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)  # bpffs: unlinking drops the pins


def test_create_pin_reopen_and_typed_entries(pins: str) -> None:
    path = os.path.join(pins, "eps")
    assert BpfMap.open(path, EPS) is None
    with pytest.raises(FileNotFoundError, match="no map pinned"):
        BpfMap.pinned(path, EPS, create=False)
    with BpfMap.pinned(path, EPS) as m:
        first = m.id
        m.put(Ep(ip_key("10.96.0.1"), 80, 6), 7)
        m.put((ip_key("10.96.0.2"), 53, 17), 9)  # a tuple stands for the Structure
        with pytest.raises(FileExistsError):
            m.put((ip_key("10.96.0.2"), 53, 17), 1, flags=BPF_NOEXIST)
    with BpfMap.pinned(path, EPS) as again:  # opened, not created anew
        assert again.id == first
        assert again.get((ip_key("10.96.0.1"), 80, 6)) == 7
        assert again.get((ip_key("10.96.0.9"), 80, 6)) is None
        assert sorted((k.port, v) for k, v in again.items()) == [(53, 9), (80, 7)]
        assert again.delete((ip_key("10.96.0.1"), 80, 6))
        assert not again.delete((ip_key("10.96.0.1"), 80, 6))
        assert len(again) == 1


def test_layout_mismatch_refused_with_what_differs(pins: str) -> None:
    path = os.path.join(pins, "changed")
    with BpfMap.pinned(path, EPS) as m:
        m.put((1, 2, 3), 4)
    grown = MapSpec("t_eps", HASH, Prefix, ctypes.c_uint32, 1024, BPF_F_NO_PREALLOC)
    with pytest.raises(LayoutMismatch) as e:
        BpfMap.pinned(path, grown)
    msg = str(e.value)
    assert path in msg
    assert "value size 8, not 4" in msg and "max entries 65536, not 1024" in msg
    assert "key size" not in msg  # both 8 bytes: only what differs is named
    with pytest.raises(LayoutMismatch, match="type hash, not array"):
        BpfMap.open(path, MapSpec("t", ARRAY, ctypes.c_uint32, ctypes.c_uint64, 65536, 1))
    with BpfMap.open(path, EPS) as kept:  # type: ignore[union-attr]
        assert kept.get((1, 2, 3)) == 4  # refusing touched nothing
    # where the caller may lose the entries: a fresh map of the new layout
    with BpfMap.pinned(path, grown, recreate=True) as fresh:
        assert len(fresh) == 0 and fresh.spec == grown


def test_batch_put_iterate_delete_ten_thousand(pins: str) -> None:
    n = 10_000
    with BpfMap.pinned(os.path.join(pins, "bulk"), EPS) as m:
        items = [((i, i & 0xFFFF, 6), i * 3) for i in range(n)]
        assert m.update_batch(items, fallback=False) == "batch"
        got = m.items()
        assert len(got) == n
        assert {k.ip: v for k, v in got} == {i: i * 3 for i in range(n)}
        assert len(list(m.keys())) == n
        # deleting keys that are not there skips them, the others go
        doomed = [(i, i & 0xFFFF, 6) for i in range(0, n, 2)] + [(n + 5, 0, 6)]
        assert m.delete_batch(doomed, fallback=False) == "batch"
        assert sorted(k.ip for k in m) == list(range(1, n, 2))
        assert m.clear() == n // 2 and len(m) == 0


def test_arrays_tries_and_per_cpu(pins: str) -> None:
    arr = MapSpec("t_arr", ARRAY, ctypes.c_uint32, ctypes.c_uint64, 5000)
    with BpfMap.pinned(os.path.join(pins, "arr"), arr) as a:
        assert a.update_batch([(i, i + 1) for i in range(0, 5000, 5)], fallback=False) == "batch"
        assert a.get(4995) == 4996 and a.get(4996) == 0
        assert a.delete_batch([0, 5], fallback=False) == "batch"  # arrays: zeroed
        assert [a.get(i) for i in (0, 5, 10)] == [0, 0, 11]
        with pytest.raises(OSError):
            a.update_batch([(70000, 1)], fallback=False)  # past the array's end

    trie = MapSpec("t_lpm", LPM_TRIE, Prefix, ctypes.c_uint32, 64, BPF_F_NO_PREALLOC)
    with BpfMap.pinned(os.path.join(pins, "lpm"), trie) as t:
        nets = [((24, ip_key(f"10.96.{i}.0")), i) for i in range(10)]
        t.update_batch(nets)
        assert t.get((32, ip_key("10.96.7.9"))) == 7  # longest prefix match
        t.delete_batch([k for k, _ in nets[:5]])
        assert len(t) == 5

    pc = MapSpec("t_pc", PERCPU_ARRAY, ctypes.c_uint32, ctypes.c_uint32, 4)
    with BpfMap.pinned(os.path.join(pins, "percpu"), pc) as p:
        cpus = possible_cpus()
        p.put(1, 3)  # the same value on every CPU
        assert p.get(1) == [3] * cpus  # one value per CPU (4-byte values, 8-byte slots)
        p.put(2, list(range(cpus)))
        assert sum(p.get(2)) == sum(range(cpus))
        with pytest.raises(OSError):
            p.update_batch([(1, 5)], fallback=False)
        assert p.update_batch([(1, 5), (3, 6)]) == "loop"
        assert p.get(3) == [6] * cpus and dict(p.items())[1] == [5] * cpus
