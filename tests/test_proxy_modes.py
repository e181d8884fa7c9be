"""Choosing the proxy mode: --mode ebpf refuses clearly, --mode auto falls back and says why."""

from __future__ import annotations

import pytest

from corral.proxy import daemon as proxyd
from corral.proxy import ebpf


def test_iptables_is_taken_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ebpf, "preflight", lambda: pytest.fail("iptables needs no BPF check"))
    assert proxyd.resolve_mode("iptables") == ("iptables", "asked for")


def test_ebpf_refused_naming_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    why = "no kernel headers at /lib/modules/x/build; run scripts/bootstrap.sh"
    monkeypatch.setattr(ebpf, "preflight", lambda: why)
    with pytest.raises(proxyd.ModeUnavailable, match="--mode ebpf cannot run here: no kernel"):
        proxyd.resolve_mode("ebpf")
    monkeypatch.setattr(ebpf, "preflight", lambda: None)
    assert proxyd.resolve_mode("ebpf") == ("ebpf", "asked for")


def test_auto_prefers_ebpf_and_falls_back_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ebpf, "preflight", lambda: None)
    assert proxyd.resolve_mode("auto")[0] == "ebpf"
    monkeypatch.setattr(ebpf, "preflight", lambda: "no cgroup2 hierarchy at /sys/fs/cgroup/unified")
    mode, why = proxyd.resolve_mode("auto")
    assert mode == "iptables" and "no cgroup2 hierarchy" in why


def test_unknown_mode_and_permission_hint() -> None:
    with pytest.raises(proxyd.ModeUnavailable, match="choose from iptables, ebpf, auto"):
        proxyd.resolve_mode("ipvs")
    hint = ebpf.explain(OSError(1, "cannot load proxy_sock.c: Operation not permitted"))
    assert "CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN" in hint
