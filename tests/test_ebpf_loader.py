"""corral.ebpf.loader on the real kernel: cgroup attach/detach, pinned maps, BCC maps as BpfMaps.

Everything happens in a cgroup2 directory made under /sys/fs/cgroup/unified for
this run (never the root) and, for traffic, in a network namespace made for it;
both go away in finalizers, as do the pins of the test node. Three compiles in
all: the module's shared load, one reload (a restarted daemon), and one
whose pinned map layout differs.
Tests run in file order on the shared load.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from corral.ebpf import loader
from corral.ebpf.pinned_map import (
    ARRAY,
    HASH,
    LPM_TRIE,
    PERCPU_ARRAY,
    LayoutMismatch,
    MapSpec,
    ip_key,
)
from corral.node import netns
from tests.answer_helpers import answering_netns
from tests.overlay_helpers import NEEDS_ROOT_AND_BCC

pytestmark = NEEDS_ROOT_AND_BCC

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpf", "cgroup_test.c")
PROGRAMS = {"corral_connect4": "connect4", "corral_sock": "sock_create"}
PROXY_HOOKS = {
    "corral_sendmsg4": "sendmsg4",
    "corral_recvmsg4": "recvmsg4",
    "corral_getpeer4": "getpeername4",
}
u32, u64 = ctypes.c_uint32, ctypes.c_uint64
PORTS = MapSpec("ports", HASH, u32, u32, 64)
ASKED, REDIRECTED = 8001, 8002  # listeners inside the test namespace answer with their port
RUN = uuid.uuid4().hex[:8]
NODE = f"test-{RUN}"


@pytest.fixture(scope="module")
def cgroup() -> Iterator[str]:
    path = os.path.join(loader.CGROUP2_ROOT, f"corral-test-{RUN}")
    os.mkdir(path)
    try:
        yield path
    finally:
        # the test's own cgroup: whatever is attached to it was attached by this file
        loader.detach_cgroup(path, everyone=True)
        os.rmdir(path)  # the children have exited: the cgroup is empty


@pytest.fixture(scope="module")
def loads() -> Iterator[list[loader.CgroupPrograms]]:
    """Every load of the test source, newest last; closed and unpinned at the end."""
    out = [loader.CgroupPrograms(SOURCE, PROGRAMS | PROXY_HOOKS, node=NODE)]
    try:
        yield out
    finally:
        for loaded in out:
            loaded.close()
        loader.remove_pins(NODE)


@pytest.fixture
def progs(loads: list[loader.CgroupPrograms]) -> loader.CgroupPrograms:
    return loads[-1]


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    """A namespace with lo up and two TCP listeners that answer with their own port."""
    with answering_netns(f"corral-test-bpf-{RUN}", (ASKED, REDIRECTED), backlog=16) as path:
        yield path


CLIENT = (
    f"import socket; s = socket.create_connection(('127.0.0.1', {ASKED}), timeout=5); "
    "print(s.recv(16).decode())"
)


def reached(ns: str, cgroup: str | None) -> int:
    """The port a client in `ns` reaches when it connects to ASKED, started inside `cgroup`."""

    def join() -> None:  # runs in the child before exec: what it execs is in the cgroup
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:  # type: ignore[arg-type]
            f.write(str(os.getpid()))

    out = subprocess.run(
        netns.command(ns, [sys.executable, "-c", CLIENT]),
        preexec_fn=join if cgroup else None,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(out.stdout.strip())


def ids(cgroup: str, everyone: bool = False) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in loader.cgroup_programs(cgroup, everyone=everyone):
        out.setdefault(p.name, []).append(p.id)
    return out


def test_root_cgroup_and_bad_names_refused(progs: loader.CgroupPrograms) -> None:
    before = loader.cgroup_programs(loader.CGROUP2_ROOT, everyone=True)
    with pytest.raises(loader.CgroupError, match="refusing to attach to the root cgroup2"):
        progs.attach(loader.CGROUP2_ROOT, "corral_connect4")
    with pytest.raises(loader.CgroupError, match="not a cgroup2 directory"):
        progs.attach("/tmp", "corral_connect4")
    assert loader.cgroup_programs(loader.CGROUP2_ROOT, everyone=True) == before
    with pytest.raises(ValueError, match="corral_"):
        loader.CgroupPrograms(SOURCE, {"other_connect4": "connect4"})  # refused before compiling
    with pytest.raises(ValueError, match="unknown hook"):
        loader.CgroupPrograms(SOURCE, {"corral_connect4": "connect44"})


def test_proxy_hooks_attach_list_and_detach(progs: loader.CgroupPrograms, cgroup: str) -> None:
    """sendmsg4, recvmsg4 and getpeername4: loaded with their attach types, on their hooks."""
    for name in PROXY_HOOKS:
        assert progs.attach(cgroup, name) == "attached"
    listed = {p.name: p.hook for p in loader.cgroup_programs(cgroup)}
    assert listed == PROXY_HOOKS
    gone = loader.detach_cgroup(cgroup, names=PROXY_HOOKS)
    assert sorted(p.name for p in gone) == sorted(PROXY_HOOKS)
    assert loader.cgroup_programs(cgroup, everyone=True) == []


def test_connect4_redirects_only_inside_the_cgroup(
    progs: loader.CgroupPrograms, cgroup: str, ns: str
) -> None:
    assert loader.pinned(NODE) == ["counts", "ports"]
    with progs.open_map(PORTS) as ports:
        assert ports.update_batch([(ASKED, REDIRECTED)]) == "batch"
    assert reached(ns, cgroup) == ASKED  # nothing attached yet
    assert progs.attach(cgroup, "corral_connect4") == "attached"
    assert progs.attach(cgroup, "corral_sock") == "attached"
    assert progs.attach(cgroup, "corral_connect4") == "unchanged"
    assert ids(cgroup) == {
        "corral_connect4": [progs.prog_id("corral_connect4")],
        "corral_sock": [progs.prog_id("corral_sock")],
    }
    assert {p.hook for p in loader.cgroup_programs(cgroup)} == {"connect4", "sock_create"}

    assert reached(ns, cgroup) == REDIRECTED
    assert reached(ns, None) == ASKED  # a process outside the cgroup is left alone
    counts = progs.map("counts")
    assert counts[counts.Key(0)].value == 1  # one connect rewritten
    assert counts[counts.Key(1)].value >= 1  # the client's socket seen at creation


def test_bcc_maps_through_the_typed_wrapper(progs: loader.CgroupPrograms) -> None:
    """A load's tables as BpfMaps: layout checked against the spec, batch calls on them."""
    with progs.open_map(MapSpec("bulk_hash", HASH, u32, u64, 65536)) as h:
        assert h.update_batch([(i, i * 10) for i in range(1000)], fallback=False) == "batch"
        assert len(h) == 1000 and h.get(999) == 9990
        assert progs.map("bulk_hash")[progs.map("bulk_hash").Key(999)].value == 9990  # BCC's
        assert h.delete_batch([*range(0, 1000, 2), 2000], fallback=False) == "batch"
        assert sorted(h) == list(range(1, 1000, 2))
    with progs.open_map(MapSpec("bulk_array", ARRAY, u32, u64, 65536)) as a:
        assert a.update_batch([(i, i + 1) for i in range(0, 5000, 5)], fallback=False) == "batch"
        assert a.get(4995) == 4996 and a.get(4996) == 0

    class Prefix(ctypes.Structure):
        _fields_ = [("len", u32), ("ip", u32)]

    with progs.open_map(MapSpec("bulk_lpm", LPM_TRIE, Prefix, u32, 64, 1)) as trie:
        assert trie.update_batch([((24, ip_key("10.96.7.0")), 7)]) == "batch"
        assert trie.get((32, ip_key("10.96.7.9"))) == 7
    with progs.open_map(MapSpec("bulk_percpu", PERCPU_ARRAY, u32, u64, 16)) as pc:
        assert pc.update_batch([(1, 3), (2, 3)]) == "loop"
        assert set(pc.get(2)) == {3}
    # a Python spec that drifted from the C source is refused, saying what differs
    with pytest.raises(LayoutMismatch, match=r"bulk_hash: value size 8, not 4"):
        progs.open_map(MapSpec("bulk_hash", HASH, u32, u32, 65536))


def test_reload_reuses_pinned_maps_and_replaces_in_place(
    loads: list[loader.CgroupPrograms], cgroup: str, ns: str
) -> None:
    """A restarted daemon: fresh load, same maps with their entries, programs swapped."""
    first = loads[-1]
    old_map, old_prog = first.map_id("ports"), first.prog_id("corral_connect4")
    first.close()  # the first daemon goes away; its programs stay attached
    assert reached(ns, cgroup) == REDIRECTED  # rewrites 2 so far

    loads.append(loader.CgroupPrograms(SOURCE, PROGRAMS, node=NODE))
    again = loads[-1]
    assert again.map_id("ports") == old_map
    ports, counts = again.map("ports"), again.map("counts")
    assert ports[ports.Key(ASKED)].value == REDIRECTED
    assert counts[counts.Key(0)].value == 2  # counters kept too
    assert again.prog_id("corral_connect4") != old_prog

    assert again.attach(cgroup, "corral_connect4") == "replaced"
    assert again.attach(cgroup, "corral_sock") == "replaced"
    assert ids(cgroup) == {
        "corral_connect4": [again.prog_id("corral_connect4")],
        "corral_sock": [again.prog_id("corral_sock")],
    }
    assert reached(ns, cgroup) == REDIRECTED
    assert counts[counts.Key(0)].value == 3  # the new program, the same map


def test_detach_leaves_other_programs_and_restores(
    progs: loader.CgroupPrograms, cgroup: str, ns: str
) -> None:
    # somebody else's program on the same hook, attached the way anyone would
    from bcc import BPF, BPFAttachType

    connect4 = BPFAttachType.CGROUP_INET4_CONNECT
    fn = progs.bpf.load_func(b"other_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=connect4)
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        BPF.attach_func(fn, cg, connect4, flags=loader.BPF_F_ALLOW_MULTI)
    finally:
        os.close(cg)
    theirs = ids(cgroup, everyone=True)["other_connect4"]
    assert "other_connect4" not in ids(cgroup)  # not listed as corral's

    with pytest.raises(loader.CgroupError, match="not corral programs"):
        loader.detach_cgroup(cgroup, ids=theirs)
    assert reached(ns, cgroup) == REDIRECTED  # both connect4 programs run; ours still rewrites

    gone = loader.detach_cgroup(cgroup, names=["corral_connect4"])
    assert [p.name for p in gone] == ["corral_connect4"]
    assert not progs.detach(cgroup, "corral_connect4")  # nothing left to detach
    assert reached(ns, cgroup) == ASKED
    assert set(ids(cgroup)) == {"corral_sock"}

    (sock,) = loader.cgroup_programs(cgroup)
    assert [p.id for p in loader.detach_cgroup(cgroup, ids=[sock.id])] == [sock.id]
    assert ids(cgroup, everyone=True) == {"other_connect4": theirs}  # the cgroup fixture's
    assert loader.detach_cgroup(cgroup) == []


def test_pinned_map_of_another_layout_refused(loads: list[loader.CgroupPrograms]) -> None:
    """BCC would reuse it as is; the loader refuses and says what to do."""
    with pytest.raises(loader.PinLayoutError, match=r"/ports: max entries 64, not 128"):
        loader.CgroupPrograms(SOURCE, PROGRAMS, node=NODE, cflags=["-DPORTS_MAX=128"])
    ports = loads[-1].map("ports")
    assert ports[ports.Key(ASKED)].value == REDIRECTED  # untouched


def test_remove_pins_leaves_nothing(loads: list[loader.CgroupPrograms]) -> None:
    d = loader.pin_dir(NODE)
    assert os.path.isdir(d)
    assert loader.remove_pins(NODE) == ["counts", "ports"]
    assert not os.path.exists(d) and loader.pinned(NODE) == []
    assert loader.remove_pins(NODE) == []  # safe to repeat
    with pytest.raises(ValueError, match="pin directory"):
        loader.pin_dir("../etc")
