"""A client of a Kubernetes API server from a kubeconfig: what corral's CLI uses to reach
a cluster through its API (and what its components will use on any Kubernetes cluster).

`KubeConfig.load(path, context)` reads the kubeconfig as client-go does for what corral
needs: the context's cluster (`server`, `certificate-authority[-data]`,
`insecure-skip-tls-verify`) and user (`client-certificate[-data]`/`client-key[-data]`,
`token`/`tokenFile`). `KubeClient` makes requests with it (aiohttp); errors come back
as `APIStatusError` carrying the server's `metav1.Status` message.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml


class KubeConfigError(ValueError):
    """The kubeconfig cannot be used (the message names the file and what is wrong)."""


class APIStatusError(Exception):
    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


def default_path() -> str:
    """$KUBECONFIG's first file, else ~/.kube/config."""
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    return first or os.path.expanduser("~/.kube/config")


def _material(entry: dict[str, Any], key: str, base: str) -> bytes | None:
    """`<key>-data` (base64) or `<key>` (a file, relative to the kubeconfig's folder)."""
    data = entry.get(f"{key}-data")
    if data:
        return base64.b64decode(data)
    path = entry.get(key)
    if path:
        with open(path if os.path.isabs(path) else os.path.join(base, path), "rb") as f:
            return f.read()
    return None


@dataclass
class KubeConfig:
    server: str
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    insecure: bool = False

    @classmethod
    def load(cls, path: str, context: str | None = None) -> KubeConfig:
        try:
            with open(path) as f:
                doc = yaml.safe_load(f) or {}
        except OSError as e:
            raise KubeConfigError(f"kubeconfig {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise KubeConfigError(f"kubeconfig {path} is not YAML: {e}") from None
        name = context or doc.get("current-context")
        if not name:
            raise KubeConfigError(f"kubeconfig {path}: no current-context (give a context)")

        def pick(section: str, key: str) -> dict[str, Any]:
            for e in doc.get(section) or []:
                if isinstance(e, dict) and e.get("name") == key:
                    return dict(e.get(section[:-1]) or {})
            raise KubeConfigError(f"kubeconfig {path}: no {section[:-1]} {key!r}")

        ctx = pick("contexts", name)
        cluster = pick("clusters", ctx.get("cluster", ""))
        user = pick("users", ctx.get("user", "")) if ctx.get("user") else {}
        base = os.path.dirname(os.path.abspath(path))
        server = cluster.get("server")
        if not server:
            raise KubeConfigError(
                f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server"
            )
        token = user.get("token")
        if not token and user.get("tokenFile"):
            with open(user["tokenFile"]) as f:
                token = f.read().strip()
        try:
            return cls(
                server=server.rstrip("/"),
                ca=_material(cluster, "certificate-authority", base),
                cert=_material(user, "client-certificate", base),
                key=_material(user, "client-key", base),
                token=token,
                insecure=bool(cluster.get("insecure-skip-tls-verify")),
            )
        except OSError as e:
            raise KubeConfigError(f"kubeconfig {path}: {e.filename}: {e.strerror}") from None

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https://"):
            return False
        ctx = ssl.create_default_context(cadata=self.ca.decode() if self.ca else None)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert and self.key:
            # ssl loads a chain only from files: a private temporary folder for the moment
            with tempfile.TemporaryDirectory(prefix="corral-kubeclient-") as d:
                cert, key = os.path.join(d, "c"), os.path.join(d, "k")
                for p, data in ((cert, self.cert), (key, self.key)):
                    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                ctx.load_cert_chain(cert, key)
        return ctx


class KubeClient:
    """`async with KubeClient(config) as c:` requests to the API server."""

    def __init__(self, config: KubeConfig, user_agent: str = "corral") -> None:
        self.config = config
        headers = {"User-Agent": user_agent}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        self._headers = headers
        self._ssl = config.ssl_context()
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeClient:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.session = aiohttp.ClientSession(headers=self._headers, timeout=timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.session is not None:
            await self.session.close()

    def url(self, path: str) -> str:
        return self.config.server + path

    @staticmethod
    async def check(r: aiohttp.ClientResponse) -> None:
        if r.status < 400:
            return
        body = await r.read()
        message, reason = body.decode(errors="replace").strip(), ""
        try:
            st = json.loads(body)
            message, reason = st.get("message", message), st.get("reason", "")
        except ValueError:
            pass
        raise APIStatusError(r.status, message, reason)

    def get(self, path: str, **params: Any) -> Any:
        """An `async with` response of GET `path` (raises APIStatusError on >= 400)."""
        assert self.session is not None
        return self.session.get(self.url(path), params=params, ssl=self._ssl)

    async def websocket(
        self, path: str, params: list[tuple[str, str]], protocols: tuple[str, ...]
    ) -> aiohttp.ClientWebSocketResponse:
        assert self.session is not None
        try:
            return await self.session.ws_connect(
                self.url(path), params=params, protocols=protocols, ssl=self._ssl, max_msg_size=0
            )
        except aiohttp.WSServerHandshakeError as e:
            # the refusal's Status is in a body aiohttp drops: ask again without upgrading
            async with self.session.get(self.url(path), params=params, ssl=self._ssl) as r:
                await self.check(r)
            raise APIStatusError(e.status, e.message) from None
