"""The HTTPS front: routing, authentication, content negotiation, watch streams.

`APIServer` is a daemon component (start/run/stop/ready). Clients authenticate with a
certificate the client CA signed (CN = user, O = groups, as kube-apiserver's x509
authenticator); anonymous requests get 401 except for the health and version paths.
Every authenticated user may do everything (no RBAC yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web

from corral.api.namespaces import ensure_builtin
from corral.api.store import StoreError, Unavailable
from corral.apiserver import (
    discovery,
    errors,
    fieldvalidation,
    openapi,
    openapi_v3,
    protobuf,
    registry,
    table,
)
from corral.apiserver.nodeproxy import NodeProxy
from corral.apiserver.registry import Resource
from corral.apiserver.rest import CREATED, Storage, WatchEvent, WatchState, bookmark
from corral.apiserver.selectors import matcher
from corral.common import tls

log = logging.getLogger(__name__)

PUBLIC = ("/healthz", "/readyz", "/livez", "/version")
MAX_BODY = 3 * 1024 * 1024  # kube-apiserver's request body limit
JSON = "application/json"
NODE_SUBRESOURCES = ("log", "exec")
WATCH_TIMEOUT = 1800.0  # --min-request-timeout's default


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...]


USER = web.RequestKey("user", User)


def tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The server side: client certificates optional, so anonymous requests reach the 401."""
    return tls.server_context(cert, key, client_ca)


def user_of(request: web.Request) -> User | None:
    who = tls.peer_identity(request.transport)
    if who is None:
        return None
    return User(who[0], (*who[1], "system:authenticated"))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def respond(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type=JSON)


def error_response(e: errors.APIError) -> web.Response:
    return respond(e.status(), e.code)


def wants_table(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return any(
        "as=Table" in part and "g=meta.k8s.io" in part and "v=v1beta1" not in part
        for part in accept.split(",")
    )


@dataclass
class Target:
    """What a resource path names."""

    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str


def parse_path(path: str) -> Target | None:
    """`/api/v1/...` or `/apis/<g>/<v>/...` to the resource it names; None: not one."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    if not rest or len(rest) > 5:
        return None
    ns = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        sub = registry.lookup(group, version, rest[2])
        if sub is not None and sub.namespaced:
            ns, rest = rest[1], rest[2:]
    res = registry.lookup(group, version, rest[0])
    if res is None or len(rest) > 3:
        return None
    if ns is None and res.namespaced and len(rest) > 1:
        return None  # a namespaced object needs its namespace in the path
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else ""
    if sub and sub not in res.subresources:
        return None
    return Target(res, ns, name, sub)


def _int(request: web.Request, name: str, default: int = 0) -> int:
    raw = request.query.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise errors.bad_request(f"{name}={raw!r} is not a number") from None


def _dry_run(request: web.Request) -> bool:
    """`dryRun=All`: validate and answer as if written, write nothing."""
    values = request.query.getall("dryRun", [])
    for v in values:
        if v != "All":
            raise errors.bad_request(f'Invalid dryRun value: "{v}": supported values: "All"')
    return bool(values)


def _bool(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true")


class APIServer:
    """The Kubernetes API on `host:port` over `storage`."""

    def __init__(
        self,
        storage: Storage,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        bookmark_interval: float = 60.0,
        health: Callable[[], Any] | None = None,
        readiness: Callable[[], Any] | None = None,
        nodes: NodeProxy | None = None,
    ) -> None:
        self.storage = storage
        self.nodes = nodes  # pods' log and exec, on their nodes; None: not configured
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.bookmark_interval = bookmark_interval
        self.health, self.readiness = health, readiness
        self.requests = 0
        self.watches = 0
        self._runner: web.AppRunner | None = None
        self._started = False

    # ------------------------------------------------------------ component

    async def start(self) -> None:
        # kube-apiserver's system namespaces: default, kube-system, kube-public (+ corral's)
        await ensure_builtin(self.storage.store)
        await self.storage.start()  # the watch cache: one etcd watch per kind
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._started = True
        log.info("serving the Kubernetes API on https://%s:%d", self.host, self.port)

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.storage.stop()
        self._started = False

    def ready(self) -> bool:
        return self._started

    def debug_state(self) -> dict[str, Any]:
        return {
            "address": f"{self.host}:{self.port}",
            "requests": self.requests,
            "watches": self.watches,
            "watchCache": self.storage.cache.stats(),
        }

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------ plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        if (
            self.ssl_context is not None
            and request.path not in PUBLIC
            and not any(request.path.startswith(p + "/") for p in PUBLIC)
        ):
            user = user_of(request)
            if user is None:
                return error_response(errors.unauthorized())
            request[USER] = user
        try:
            scope = fieldvalidation.begin(
                request.query.get("fieldValidation"),
                request.query.get("fieldManager"),
                request.headers.get("User-Agent", ""),
            )
            response = await handler(request)
            if scope.warnings and not response.prepared:
                for value in fieldvalidation.header_values(scope):
                    response.headers.add("Warning", value)
            return response
        except errors.APIError as e:
            return error_response(e)
        except Unavailable as e:
            return error_response(errors.unavailable(f"etcd is unavailable: {e}"))
        except StoreError as e:
            log.exception("%s %s", request.method, request.path)
            return error_response(errors.APIError(500, "InternalError", str(e)))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if path in ("/healthz", "/readyz", "/livez") or path.startswith(
            ("/healthz/", "/readyz/", "/livez/")
        ):
            return self._health(request, path)
        if path == "/openapi/v2" and request.method == "GET":
            version = discovery.version()["gitVersion"]
            if openapi.PROTOBUF in request.headers.get("Accept", ""):
                body = openapi.document_protobuf(version)
                return web.Response(body=body, headers={"Content-Type": openapi.PROTOBUF_SERVED})
            return respond(openapi.document(version))
        if path.startswith("/openapi/v3") and request.method == "GET":
            return self._openapi_v3(path)
        target = parse_path(path)
        if target is None:
            if request.method != "GET":
                raise errors.not_found_path(path)
            return self._discovery(path)
        return await self._resource(request, target)

    def _openapi_v3(self, path: str) -> web.Response:
        if path == "/openapi/v3":
            return respond(openapi_v3.root())
        body = openapi_v3.document(path.removeprefix("/openapi/v3/"))
        if body is None:
            raise errors.not_found_path(path)
        return web.Response(body=body, content_type="application/json")

    def _health(self, request: web.Request, path: str) -> web.Response:
        fn = self.readiness if path.startswith("/readyz") else self.health
        if fn is None:
            return web.Response(text="ok")
        report = fn()
        text = report.text("verbose" in request.query, path.strip("/").split("/")[0])
        return web.Response(text=text, status=200 if report.ok else 500)

    def _discovery(self, path: str) -> web.Response:
        parts = [p for p in path.split("/") if p]
        doc: Any = None
        if path == "/version":
            doc = discovery.version()
        elif path == "/api":
            doc = discovery.api_versions(self.address)
        elif path == "/apis":
            doc = discovery.api_group_list()
        elif len(parts) == 2 and parts[0] == "api":
            doc = discovery.resource_list("", parts[1])
        elif len(parts) == 2 and parts[0] == "apis":
            doc = discovery.api_group(parts[1])
        elif len(parts) == 3 and parts[0] == "apis":
            doc = discovery.resource_list(parts[1], parts[2])
        if doc is None:
            raise errors.not_found_path(path)
        return respond(doc)

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        ctype = request.content_type
        if ctype == "application/vnd.kubernetes.protobuf":
            # kubectl's typed clients (create configmap/secret/namespace) send protobuf:
            # those kinds are decoded (apiserver/protobuf.py), others answered 415.
            with contextlib.suppress(protobuf.Unsupported):
                return protobuf.decode(raw)
            raise errors.APIError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f'include: application/json, application/yaml (not "{ctype}")',
            )
        try:
            if ctype in ("application/yaml", "application/x-yaml", "text/yaml"):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as e:
            raise errors.bad_request(f"the request body is not valid {ctype}: {e}") from None

    # ------------------------------------------------------------ resources

    async def _on_node(self, request: web.Request, t: Target) -> web.StreamResponse:
        """`log` and `exec` of a pod: relayed to its node's API."""
        assert t.namespace is not None and t.name is not None
        sub, m = t.subresource, request.method
        if (sub == "log" and m != "GET") or (sub == "exec" and m not in ("GET", "POST")):
            raise errors.method_not_allowed(f"{m} is not supported on pods/{sub}")
        if self.nodes is None:
            raise errors.APIError(
                503,
                "ServiceUnavailable",
                f"pods/{sub} needs --kubelet-client-certificate, --kubelet-client-key and "
                "--kubelet-certificate-authority",
            )
        if sub == "log":
            return await self.nodes.logs(request, t.namespace, t.name)
        return await self.nodes.exec(request, t.namespace, t.name)

    async def _resource(self, request: web.Request, t: Target) -> web.StreamResponse:
        res, m = t.resource, request.method
        dry = _dry_run(request)
        if t.subresource == "scale" and t.name is not None:
            return await self._scale(request, t, dry)
        if t.subresource in NODE_SUBRESOURCES and res.plural == "pods" and t.name is not None:
            return await self._on_node(request, t)
        if t.name is None:
            if m == "GET":
                if _bool(request, "watch"):
                    return await self._watch(request, t)
                return await self._list(request, t)
            if m == "POST":
                if res.namespaced and t.namespace is None:
                    raise errors.method_not_allowed(
                        f"{res.plural} are namespaced: POST to "
                        f"/{'apis/' + res.group if res.group else 'api'}/{res.version}"
                        f"/namespaces/<namespace>/{res.plural}"
                    )
                obj = await self.storage.create(
                    res, t.namespace, await self._body(request), dry_run=dry
                )
                return self._object(request, res, obj, 201)
            if m == "DELETE":
                return await self._delete_collection(request, t, dry)
            raise errors.method_not_allowed(f"{m} is not supported on a collection of {res.plural}")
        if m == "GET":
            obj = await self.storage.get(res, t.namespace, t.name)
            return self._object(request, res, obj)
        if m == "PUT":
            body = await self._body(request)
            obj = await self.storage.update(
                res, t.namespace, t.name, body, t.subresource, dry_run=dry
            )
            return self._object(request, res, obj)
        if m == "PATCH":
            raw = await request.read()
            obj = await self.storage.patch(
                res,
                t.namespace,
                t.name,
                request.content_type,
                raw,
                t.subresource,
                dry_run=dry,
                force=_bool(request, "force"),
            )
            if obj.pop(CREATED, False):
                return self._object(request, res, obj, 201)
            return self._object(request, res, obj)
        if m == "DELETE" and not t.subresource:
            body = await self._delete_options(request)
            obj = await self.storage.delete(res, t.namespace, t.name, body, dry_run=dry)
            return self._object(request, res, obj)
        raise errors.method_not_allowed(f"{m} is not supported here")

    async def _delete_options(self, request: web.Request) -> dict[str, Any]:
        """DeleteOptions from the body and the query (kubectl sends either)."""
        body = await self._body(request) or {}
        if not isinstance(body, dict):
            raise errors.bad_request("the body of a DELETE is a DeleteOptions object")
        if "gracePeriodSeconds" in request.query:
            body["gracePeriodSeconds"] = _int(request, "gracePeriodSeconds")
        if "propagationPolicy" in request.query:
            body["propagationPolicy"] = request.query["propagationPolicy"]
        if "orphanDependents" in request.query:
            body["orphanDependents"] = _bool(request, "orphanDependents")
        return body

    async def _delete_collection(self, request: web.Request, t: Target, dry: bool) -> web.Response:
        """deletecollection: every object the selectors match, each as its own delete;
        the answer lists their last states."""
        res = t.resource
        options = await self._delete_options(request)
        listed = await self.storage.list(res, t.namespace, self._matcher(request, res))
        items = []
        for obj in listed.items:
            md = obj["metadata"]
            with contextlib.suppress(errors.APIError):  # gone meanwhile, or held: next one
                items.append(
                    await self.storage.delete(
                        res, md.get("namespace"), md["name"], dict(options), dry_run=dry
                    )
                )
        meta = {"resourceVersion": str(listed.revision)}
        return respond(
            {
                "kind": res.list_kind,
                "apiVersion": res.group_version,
                "metadata": meta,
                "items": items,
            }
        )

    async def _scale(self, request: web.Request, t: Target, dry: bool) -> web.Response:
        """The `scale` subresource: an autoscaling/v1 Scale of the object's replicas."""
        res, m = t.resource, request.method
        assert t.name is not None
        if m == "GET":
            return respond(await self.storage.get_scale(res, t.namespace, t.name))
        if m == "PUT":
            body = await self._body(request)
            out = await self.storage.update_scale(res, t.namespace, t.name, body, dry_run=dry)
            return respond(out)
        if m == "PATCH":
            raw = await request.read()
            out = await self.storage.patch_scale(
                res, t.namespace, t.name, request.content_type, raw, dry_run=dry
            )
            return respond(out)
        raise errors.method_not_allowed(f"{m} is not supported on {res.plural}/scale")

    def _object(
        self, request: web.Request, res: Resource, obj: dict[str, Any], status: int = 200
    ) -> web.Response:
        if wants_table(request):
            meta = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
            return respond(table.table(res.kind, [obj], meta, self._include(request)), status)
        return respond(obj, status)

    @staticmethod
    def _include(request: web.Request) -> str:
        inc = request.query.get("includeObject", "Metadata")
        if inc not in ("Object", "Metadata", "None"):
            raise errors.bad_request(f"includeObject={inc!r}: use Object, Metadata or None")
        return inc

    def _matcher(self, request: web.Request, res: Resource) -> Any:
        return matcher(
            request.query.get("labelSelector"),
            request.query.get("fieldSelector"),
            res.field_labels,
            res.plural,
        )

    async def _list(self, request: web.Request, t: Target) -> web.Response:
        res = t.resource
        limit = _int(request, "limit")
        if limit < 0:
            raise errors.bad_request("limit must not be negative")
        revision = 0
        rv = request.query.get("resourceVersion", "")
        if rv not in ("", "0") and request.query.get("resourceVersionMatch") == "Exact":
            revision = _int(request, "resourceVersion")
        result = await self.storage.list(
            res,
            t.namespace,
            self._matcher(request, res),
            limit,
            request.query.get("continue", ""),
            revision,
        )
        if wants_table(request):
            return respond(
                table.table(res.kind, result.items, result.meta(), self._include(request))
            )
        items = []
        for obj in result.items:
            obj.pop("kind", None)
            obj.pop("apiVersion", None)
            items.append(obj)
        return respond(
            {
                "kind": res.list_kind,
                "apiVersion": res.group_version,
                "metadata": result.meta(),
                "items": items,
            }
        )

    async def _watch(self, request: web.Request, t: Target) -> web.StreamResponse:
        res = t.resource
        match = self._matcher(request, res)
        as_table = wants_table(request)
        include = self._include(request) if as_table else "Object"
        bookmarks = _bool(request, "allowWatchBookmarks")
        timeout = float(_int(request, "timeoutSeconds") or WATCH_TIMEOUT)
        state = WatchState()
        events = self.storage.watch(
            res, t.namespace, request.query.get("resourceVersion"), match, state
        )
        queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue(maxsize=1000)

        async def pump() -> None:
            try:
                async for ev in events:
                    await queue.put(ev)
                await queue.put(None)
            except BaseException as e:  # handed to the writer, which raises it
                await queue.put(e)

        # The first event (or error) before the headers: a bad resourceVersion is a 400.
        task = asyncio.create_task(pump())
        resp = web.StreamResponse(status=200, headers={"Content-Type": JSON})
        resp.enable_chunked_encoding()
        started = False
        deadline = time.monotonic() + timeout
        self.watches += 1
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(left, self.bookmark_interval) if bookmarks else left
                try:
                    item = await asyncio.wait_for(
                        queue.get(), timeout=0.05 if not started else wait
                    )
                except TimeoutError:
                    if not started:
                        await resp.prepare(request)
                        started = True
                        continue
                    if bookmarks and state.revision:
                        await resp.write(_dumps(bookmark(res, state.revision)) + b"\n")
                    continue
                if isinstance(item, errors.APIError) and not started:
                    return error_response(item)
                if isinstance(item, BaseException):
                    if isinstance(item, errors.APIError | StoreError):
                        log.info("watch on %s ended: %s", res.plural, item)
                        break
                    raise item
                if not started:
                    await resp.prepare(request)
                    started = True
                if item is None:
                    break
                if as_table and item["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    meta = {"resourceVersion": item["object"]["metadata"]["resourceVersion"]}
                    item = {
                        "type": item["type"],
                        "object": table.table(res.kind, [item["object"]], meta, include),
                    }
                if isinstance(item, WatchEvent):
                    await resp.write(item.line())  # encoded once for every watcher
                else:
                    await resp.write(_dumps(item) + b"\n")
        except ConnectionResetError:
            pass
        finally:
            self.watches -= 1
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
        if not started:
            await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp
