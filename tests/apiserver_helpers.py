"""An in-process `corral apiserver` for tests: certificates from cluster/pki.py, the
server on a free loopback port over the `store` fixture's etcd, a kubeconfig and a
HOME of the test's own for kubectl, and an HTTPS client with the admin certificate."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from corral.api.store import Store
from corral.apiserver.serve import build
from corral.apiserver.server import APIServer
from corral.cluster import pki

KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.{}"


def kubectl_path(minor: int) -> str | None:
    path = KUBECTL.format(minor)
    return path if os.access(path, os.X_OK) else None


@dataclass
class Served:
    api: APIServer
    dir: str
    paths: pki.Paths

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api.port}"

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.dir, "kubeconfig")

    def client_ssl(self, cert: str | None = "admin") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.paths.ca)
        if cert:
            ctx.load_cert_chain(self.paths.cert(cert), self.paths.key(cert))
        return ctx

    async def warnings(self, method: str, path: str, body: Any = None) -> list[str]:
        """The `Warning` headers of a request that must succeed."""
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                method,
                self.url + path,
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
                ssl=self.client_ssl("admin"),
            ) as r,
        ):
            assert r.status < 300, await r.text()
            return r.headers.getall("Warning", [])

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        cert: str | None = "admin",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body or text)."""
        data = body if isinstance(body, bytes | str) or body is None else json.dumps(body)
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                method,
                self.url + path,
                data=data,
                headers={"Content-Type": "application/json", **(headers or {})},
                ssl=self.client_ssl(cert),
            ) as r,
        ):
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    async def watch_lines(
        self, path: str, count: int, timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """The first `count` events of a watch (fewer if the server ends it)."""
        out: list[dict[str, Any]] = []

        async def read() -> None:
            async with (
                aiohttp.ClientSession() as s,
                s.get(self.url + path, ssl=self.client_ssl()) as r,
            ):
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if line.strip():
                        out.append(json.loads(line))
                        if len(out) >= count:
                            return

        await asyncio.wait_for(read(), timeout)
        return out

    async def kubectl(
        self, minor: int, *args: str, stdin: str | None = None, check: bool = True
    ) -> tuple[int, str]:
        """kubectl 1.<minor> with this server's kubeconfig and its own HOME; (rc, output)."""
        exe = kubectl_path(minor)
        assert exe is not None
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.path.join(self.dir, f"home-{minor}"),
            "KUBECONFIG": self.kubeconfig,
        }
        p = await asyncio.create_subprocess_exec(
            exe,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        out, _ = await asyncio.wait_for(p.communicate(stdin.encode() if stdin else None), 60)
        text = out.decode()
        if check:
            assert p.returncode == 0, f"kubectl {' '.join(args)}: {text}"
        return p.returncode or 0, text


def write_kubeconfig(path: str, server: str, paths: pki.Paths, user: str = "admin") -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": paths.ca}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": paths.cert(user),
                    "client-key": paths.key(user),
                },
            }
        ],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
        "current-context": "test",
    }
    with open(path, "w") as f:
        json.dump(doc, f)


@asynccontextmanager
async def served(
    store: Store, dir: str, bookmark_interval: float = 60.0, watch_cache_capacity: int = 1024
) -> AsyncIterator[Served]:
    """The API server on 127.0.0.1:<free port> with certificates in `dir`/pki."""
    paths = pki.ensure(os.path.join(dir, "pki"), [])
    pki.issue_server(paths.dir, "apiserver", "kube-apiserver", ["127.0.0.1"], ("localhost",))
    pki.issue_client(paths.dir, "admin", "admin", ("system:masters",))
    api = build(
        store,
        bind_address="127.0.0.1",
        secure_port=0,
        tls_cert_file=paths.cert("apiserver"),
        tls_private_key_file=paths.key("apiserver"),
        client_ca_file=paths.ca,
        bookmark_interval=bookmark_interval,
        watch_cache_capacity=watch_cache_capacity,
    )
    await api.start()
    s = Served(api, dir, paths)
    write_kubeconfig(s.kubeconfig, s.url, paths)
    try:
        yield s
    finally:
        await asyncio.wait_for(api.stop(), 60)  # a hung stop fails here, not at the timeout
