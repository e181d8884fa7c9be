"""The etcd guard (runtime/etcdguard.py) in a network namespace of the test's own."""

from __future__ import annotations

import os
import subprocess

import pytest

from corral.node import netns
from corral.runtime import etcdguard

CIDR = "10.244.0.0/16"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture
def ns(scratch_ns: str) -> str:
    return scratch_ns


def saved(ns: str) -> list[str]:
    out = subprocess.run(
        netns.command(ns, ["iptables", "-S"]), capture_output=True, text=True, check=True
    ).stdout
    return [ln for ln in out.splitlines() if "ETCD" in ln]


def test_targets_skip_loopback_and_resolve_names() -> None:
    got = etcdguard.etcd_targets([("10.1.0.254", 2379), ("127.0.0.1", 2379), ("localhost", 1)])
    assert got == [("10.1.0.254", 2379)]


@needs_root
def test_only_credentialed_pods_pass_and_a_second_sync_changes_nothing(ns: str) -> None:
    targets = [("10.1.0.254", 2379), ("10.1.0.253", 2379)]
    assert etcdguard.sync(ns, CIDR, targets, ["10.244.1.5"])
    assert not etcdguard.sync(ns, CIDR, targets, ["10.244.1.5"])  # as iptables spells it
    rules = saved(ns)
    assert sum("-j CORRAL-ETCD-PODS" in r for r in rules) == 2  # FORWARD and INPUT
    for ip, _ in targets:
        dst = f"-d {ip}/32 -p tcp -m tcp --dport 2379"
        assert f"-A CORRAL-ETCD-PODS -s 10.244.1.5/32 {dst} -j RETURN" in rules
        assert f"-A CORRAL-ETCD-PODS {dst} -j REJECT --reject-with tcp-reset" in rules
    # The pod goes, another comes: only the new one passes.
    assert etcdguard.sync(ns, CIDR, targets, ["10.244.2.7"])
    rules = saved(ns)
    assert not any("10.244.1.5" in r for r in rules) and any("10.244.2.7" in r for r in rules)
    # A flushed chain is repaired.
    subprocess.run(netns.command(ns, ["iptables", "-F", "CORRAL-ETCD-PODS"]), check=True)
    assert etcdguard.sync(ns, CIDR, targets, ["10.244.2.7"])
