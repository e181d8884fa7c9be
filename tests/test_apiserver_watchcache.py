"""The API server's watch cache (apiserver/watchcache.py): one etcd watch per kind
fanned out to every client watch, a ring of recent events to resume from, 410 Expired
for a resourceVersion older than the ring. Real etcd; the API server in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from corral.api.store import Store
from corral.cluster.etcd import LocalEtcd
from tests.apiserver_helpers import Served, served

BASE = "/api/v1/namespaces/default/pods"


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "9"]}]},
    }


async def etcd_watchers(etcd: LocalEtcd) -> int:
    """etcd's own count of the watchers open on it (its /metrics)."""
    async with aiohttp.ClientSession() as s, s.get(etcd.url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(("etcd_debugging_mvcc_watcher_total ", "etcd_mvcc_watcher_total ")):
            return int(float(line.split()[1]))
    raise AssertionError("etcd's /metrics has no watcher count")


@pytest.fixture
async def api(store: Store, tmp_path: Any) -> AsyncIterator[Served]:
    async with served(store, str(tmp_path), watch_cache_capacity=8) as s:
        yield s


async def _settled(etcd: LocalEtcd) -> int:
    """etcd's watcher count once two reads in a row agree (watches register
    asynchronously)."""
    last = await etcd_watchers(etcd)
    while True:
        await asyncio.sleep(0.2)
        now = await etcd_watchers(etcd)
        if now == last:
            return now
        last = now


async def test_fifty_watches_are_one_etcd_watch(
    api: Served, store: Store, etcd: LocalEtcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    changes = store.changes

    def counted(prefix: str, start: int) -> Any:
        calls.append(prefix)
        return changes(prefix, start)

    monkeypatch.setattr(store, "changes", counted)
    _, made = await api.request("POST", BASE, pod("first"))
    rv = made["metadata"]["resourceVersion"]
    pods = api.api.storage.cache.kinds["/corral/v1/pods/"]
    while pods.revision < int(rv):  # the kind's one etcd watch is live
        await asyncio.sleep(0.05)
    before = await _settled(etcd)

    n = 50
    ssl = api.client_ssl()
    async with aiohttp.ClientSession() as s:
        streams = [
            await s.get(f"{api.url}{BASE}?watch=1&resourceVersion={rv}", ssl=ssl) for _ in range(n)
        ]
        try:
            assert api.api.watches == n
            code, _ = await api.request("POST", BASE, pod("second"))
            assert code == 201
            for r in streams:  # every one gets the event ...
                ev = json.loads(await asyncio.wait_for(r.content.readline(), 30))
                assert (ev["type"], ev["object"]["metadata"]["name"]) == ("ADDED", "second")
            # ... while etcd holds no watch more than before they were opened
            assert await _settled(etcd) == before
        finally:
            for r in streams:
                r.close()
    assert calls == []  # no client watch opened an etcd watch of its own
    assert pods.etcd_watches == 1


async def test_resume_from_the_ring_and_410_when_older(api: Served) -> None:
    _, made = await api.request("POST", BASE, pod("a"))
    first = made["metadata"]["resourceVersion"]
    merge = {"Content-Type": "application/merge-patch+json"}
    for i in range(3):
        code, _ = await api.request(
            "PATCH", f"{BASE}/a", {"metadata": {"labels": {"n": str(i)}}}, headers=merge
        )
        assert code == 200
    # every event after `first` is in the ring: replayed in order
    events = await api.watch_lines(f"{BASE}?watch=1&resourceVersion={first}", 3)
    assert [e["object"]["metadata"]["labels"].get("n") for e in events] == ["0", "1", "2"]
    assert {e["type"] for e in events} == {"MODIFIED"}
    # the ring holds 8 events: after 10 more, `first` is too old
    rvs = []
    for i in range(10):
        _, doc = await api.request(
            "PATCH", f"{BASE}/a", {"metadata": {"labels": {"m": str(i)}}}, headers=merge
        )
        rvs.append(doc["metadata"]["resourceVersion"])
    events = await api.watch_lines(f"{BASE}?watch=1&resourceVersion={first}", 1)
    assert events[0]["type"] == "ERROR"
    st = events[0]["object"]
    assert (st["code"], st["reason"]) == (410, "Expired")
    assert "too old resource version" in st["message"]
    # a recent one still works
    events = await api.watch_lines(f"{BASE}?watch=1&resourceVersion={rvs[-3]}", 1)
    assert events[0]["type"] == "MODIFIED" and events[0]["object"]["metadata"]["labels"]["m"] == "8"
