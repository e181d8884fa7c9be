"""Choosing the proxy mode: the registry, --mode ebpf refusing clearly, --mode auto
falling back and saying why, and a mode registered from outside being selectable."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import pytest

from corral.proxy import ebpf
from corral.proxy import mode as modes
from corral.proxy.core import ServiceView
from corral.proxy.mode import ModeContext, SyncResult


def test_iptables_is_taken_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ebpf, "preflight", lambda: pytest.fail("iptables needs no BPF check"))
    cls, why = modes.resolve("iptables")
    assert (cls.name, why) == ("iptables", "asked for")


def test_ebpf_refused_naming_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    why = "no kernel headers at /lib/modules/x/build; run scripts/bootstrap.sh"
    monkeypatch.setattr(ebpf, "preflight", lambda: why)
    with pytest.raises(modes.ModeUnavailable, match="--mode ebpf cannot run here: no kernel"):
        modes.resolve("ebpf")
    monkeypatch.setattr(ebpf, "preflight", lambda: None)
    assert modes.resolve("ebpf")[0].name == "ebpf"


def test_auto_prefers_ebpf_and_falls_back_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    nft = modes.mode_class("nftables")
    monkeypatch.setattr(ebpf, "preflight", lambda: None)
    assert modes.resolve("auto")[0].name == "ebpf"
    monkeypatch.setattr(ebpf, "preflight", lambda: "no cgroup2 hierarchy at /sys/fs/cgroup/unified")
    monkeypatch.setattr(nft, "unavailable", classmethod(lambda c: None))
    cls, why = modes.resolve("auto")
    assert cls.name == "nftables" and "no cgroup2 hierarchy" in why
    monkeypatch.setattr(nft, "unavailable", classmethod(lambda c: "no libnftables bindings"))
    cls, why = modes.resolve("auto")
    assert cls.name == "iptables" and "the nftables mode cannot run here (no libnftables" in why


def test_nftables_probe_is_a_dry_run() -> None:
    """The real check on this machine: libnftables loads and the kernel takes the probe
    ruleset (dry run: nothing is committed, the host keeps no table)."""
    from corral.proxy.nftables import Nft, NftablesMode

    assert NftablesMode.unavailable() is None
    assert not Nft().has_table("corral-probe")


def test_unknown_mode_and_permission_hint() -> None:
    with pytest.raises(modes.ModeUnavailable, match="--mode 'ipvs': choose from iptables, ebpf"):
        modes.resolve("ipvs")
    hint = ebpf.explain(OSError(1, "cannot load proxy_sock.c: Operation not permitted"))
    assert "CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN" in hint


class NullMode:
    """A third mode, written and registered the way nftables will be."""

    name: ClassVar[str] = "null"
    privileges: ClassVar[str] = "proxy"
    auto_rank: ClassVar[int] = 99
    includes: ClassVar[tuple[str, ...]] = ()
    why: ClassVar[str | None] = None
    cleaned: ClassVar[list[str]] = []

    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx
        self.written: dict[str, ServiceView] = {}

    @classmethod
    def unavailable(cls) -> str | None:
        return cls.why

    @classmethod
    def for_node(cls, ctx: ModeContext) -> NullMode:
        return cls(ctx)

    @classmethod
    def cleanup_node(cls, node: str) -> list[str]:
        cls.cleaned.append(node)
        return [f"null state of {node}"]

    async def run(self, ask_full_sync: Callable[[], None]) -> None:
        return None

    def sync(
        self, full: bool, views: Mapping[str, ServiceView], changed: Iterable[str]
    ) -> SyncResult:
        self.written = dict(views)
        return SyncResult(full, len(views), 0, 0.0)

    def ready(self) -> bool:
        return True

    def wants_sync(self) -> bool:
        return False

    def canary_ok(self) -> bool:
        return True

    def forget_kernel(self) -> None:
        pass

    def close(self) -> None:
        pass

    def debug(self) -> dict[str, Any]:
        return {"null": True}


@pytest.fixture
def null_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[NullMode]]:
    # the other modes' own clean-ups must not touch this machine
    for name in ("iptables", "ebpf", "nftables"):
        monkeypatch.setattr(modes.mode_class(name), "cleanup_node", classmethod(lambda c, n: []))
    NullMode.why, NullMode.cleaned = None, []
    modes.register("null", NullMode)
    try:
        yield NullMode
    finally:
        modes.unregister("null")


def test_a_registered_mode_is_selectable(null_mode: type[NullMode]) -> None:
    assert "null" in modes.names() and modes.names()[-1] == "auto"
    cls, why = modes.resolve("null")
    assert cls is null_mode and why == "asked for"
    m = cls.for_node(ModeContext("node-1", "10.244.0.0/16"))
    assert isinstance(m, null_mode) and m.ctx.node == "node-1"
    # the highest-ranked mode that can run here wins under auto, and says so
    assert modes.resolve("auto") == (null_mode, "auto: the null mode can run here")
    null_mode.why = "no nf_tables here"
    with pytest.raises(modes.ModeUnavailable, match="--mode null cannot run here: no nf_tables"):
        modes.resolve("null")
    cls, why = modes.resolve("auto")
    assert cls is not null_mode and "the null mode cannot run here (no nf_tables here)" in why


def test_cleanup_and_switching_cover_every_registered_mode(null_mode: type[NullMode]) -> None:
    assert "null state of n1" in modes.cleanup_node("n1")
    # switching to iptables removes what the null mode left; running it removes nothing of it
    modes.remove_other_modes(modes.mode_class("iptables"), "n2")
    modes.remove_other_modes(null_mode, "n3")
    assert null_mode.cleaned == ["n1", "n2"]


def test_unknown_mode_is_refused_by_the_cli() -> None:
    from corral.cli.common import CLIError
    from corral.cli.main import build_parser

    with pytest.raises(CLIError, match=r"invalid choice: 'ipvs'.*'iptables', 'ebpf'"):
        build_parser().parse_args(["proxy", "--mode", "ipvs"])


def test_the_component_drives_a_mode_through_the_interface_only() -> None:
    """Sync, debug dump, readiness and the canary's repair, with a mode it has never heard of."""
    import asyncio

    from corral.api.informer import InformerFactory
    from corral.proxy.component import Proxy

    class Flushed(NullMode):
        forgot = 0
        canary = True

        def canary_ok(self) -> bool:
            return self.canary

        def forget_kernel(self) -> None:
            self.forgot += 1

    mode = Flushed(ModeContext("n1", "10.244.0.0/16"))
    proxy = Proxy(None, InformerFactory(None), "n1", mode=mode, node_setup=False)  # type: ignore[arg-type]

    async def until(cond: Callable[[], bool]) -> None:
        for _ in range(1000):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("never happened")

    async def go() -> None:
        assert not proxy.ready()
        proxy.canary_interval = 0.01
        tasks = [asyncio.create_task(proxy.runner.run()), asyncio.create_task(proxy._canary_loop())]
        try:
            await until(proxy.ready)
            assert proxy.last is not None and proxy.last.full and mode.forgot == 0
            dump = proxy.debug_state()
            assert dump["mode"] == "null" and dump["null"] is True
            # the canary fails: a repair, a full sync that first makes the mode forget
            mode.canary = False
            await until(lambda: mode.forgot > 0)
            assert proxy.runner.full_runs >= 2
        finally:
            for t in tasks:
                t.cancel()

    asyncio.run(go())
    proxy.tracker.remove()
