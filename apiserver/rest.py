"""The verbs on the store, in wire form: what kube-apiserver's registry/rest and etcd3
storage do, for the kinds in the registry.

Objects travel as dicts (their JSON). A write is validated by the kind's model
(corral.api.objects), which also fills defaults, and stored with `Store.encode`, so
what the API writes is what corral's own CLI and daemons read. `resourceVersion` is
the etcd mod revision of the object's key; an update is a CAS on it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aetcd.utils
import yaml
from pydantic import ValidationError

from corral.api.finalizers import FOREGROUND, ORPHAN, POLICY_FINALIZERS, removable
from corral.api.namespaces import BUILTIN, new_namespace
from corral.api.objects import ManagedFieldsEntry, TypedObject, update_forbidden
from corral.api.patch import PatchError, json_patch, merge_patch, strategic_merge
from corral.api.store import (
    KV,
    AlreadyExists,
    ChangeEvent,
    Compacted,
    Conflict,
    Store,
    now_iso,
)
from corral.apiserver import errors, fieldvalidation, managedfields
from corral.apiserver.registry import BY_KIND, RESOURCES, Resource
from corral.apiserver.watchcache import CAPACITY, TooOld, WatchCache

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Match = Callable[[Obj], bool] | None
# etcd refuses requests over 1.5 MiB (--max-request-bytes); so does kube-apiserver.
MAX_OBJECT_BYTES = 3 * 512 * 1024

PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}


CREATED = "__created__"  # marks what an apply created (the server answers 201)


def _managed(obj: Obj) -> Any:
    return (obj.get("metadata") or {}).get("managedFields")


def _set_managed(obj: TypedObject, doc: Obj) -> None:
    """obj's managedFields from `doc`'s (what record_update computed)."""
    entries = _managed(doc) or []
    obj.metadata.managed_fields = [ManagedFieldsEntry.model_validate(e) for e in entries]


def wire(kv: KV | bytes, revision: int | None = None) -> Obj:
    """A stored value as the API returns it: its JSON with resourceVersion set."""
    value = kv.value if isinstance(kv, KV) else kv
    obj = json.loads(value)
    rev = kv.mod_revision if isinstance(kv, KV) else revision
    obj.setdefault("metadata", {})["resourceVersion"] = str(rev)
    return obj


def _continue_token(revision: int, start: str) -> str:
    raw = json.dumps({"v": 1, "rv": revision, "start": start}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_continue(token: str, prefix: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        d = json.loads(raw)
        rev, start = int(d["rv"]), str(d["start"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise errors.bad_request(
            "continue key is not valid: not a token this server made"
        ) from None
    if not start.startswith(prefix) or rev <= 0:
        raise errors.bad_request("continue key is not valid: it was made for another list")
    return rev, start


@dataclass
class ListResult:
    items: list[Obj]
    revision: int
    continue_token: str = ""
    remaining: int | None = None

    def meta(self) -> Obj:
        m: Obj = {"resourceVersion": str(self.revision)}
        if self.continue_token:
            m["continue"] = self.continue_token
        if self.remaining is not None:
            m["remainingItemCount"] = self.remaining
        return m


class WatchEvent(dict[str, Any]):
    """A watch event ({"type", "object"}). `line()` is its JSON line, made once per
    cache event and type however many watchers send it (`memo` is the cache event's)."""

    memo: dict[str, Any] | None = None

    def line(self) -> bytes:
        if self.memo is None:
            return json.dumps(self, separators=(",", ":")).encode() + b"\n"
        key = "line:" + self["type"]
        line = self.memo.get(key)
        if line is None:
            line = self.memo[key] = json.dumps(self, separators=(",", ":")).encode() + b"\n"
        return line


@dataclass
class WatchState:
    """What a watch has processed so far: a BOOKMARK may carry `revision`."""

    revision: int = 0
    events: int = 0


class Storage:
    """The verbs of every registered resource over one Store."""

    def __init__(self, store: Store, watch_cache_capacity: int = CAPACITY) -> None:
        self.store = store
        self.cache = WatchCache(store, watch_cache_capacity)

    async def start(self) -> None:
        """Start the watch cache of every kind (one etcd watch each)."""
        await self.cache.start(sorted({r.prefix() for r in RESOURCES}))

    async def stop(self) -> None:
        await self.cache.stop()

    # ------------------------------------------------------------ reading

    async def get(self, res: Resource, ns: str | None, name: str) -> Obj:
        kv = await self.store.get_raw(res.key(name, ns))
        if kv is None:
            raise errors.not_found(res.plural, res.group, name)
        return wire(kv)

    async def list(
        self,
        res: Resource,
        ns: str | None,
        match: Match = None,
        limit: int = 0,
        continue_token: str = "",
        revision: int = 0,
    ) -> ListResult:
        """One page (`limit` matching items, 0: all) at one etcd revision; the token
        resumes at the same revision (410 once it is compacted)."""
        prefix = res.prefix(ns)
        end = aetcd.utils.prefix_range_end(prefix.encode()).decode()
        start = prefix
        if continue_token:
            revision, start = _parse_continue(continue_token, prefix)
        items: list[Obj] = []
        batch = 0 if limit <= 0 else max(limit, 50)
        while True:
            try:
                kvs, rev, more = await self.store.range_raw(start, end, batch, revision)
            except Compacted:
                raise errors.expired(
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter."
                    if continue_token
                    else f"too old resource version: {revision}"
                ) from None
            revision = revision or rev
            for i, kv in enumerate(kvs):
                obj = wire(kv)
                if match is None or match(obj):
                    items.append(obj)
                if limit and len(items) == limit:
                    if i + 1 < len(kvs) or more:
                        return ListResult(items, revision, _continue_token(revision, kv.key + "\0"))
                    return ListResult(items, revision)
            if not more or not kvs:
                return ListResult(items, revision)
            start = kvs[-1].key + "\0"

    # ------------------------------------------------------------ validation

    def validate(self, res: Resource, doc: Obj, name: str = "") -> TypedObject:
        """The typed object; unknown fields as the request's `fieldValidation` says
        (apiserver/fieldvalidation.py), wrong values `422 Invalid` naming the field."""

        def invalid(e: ValidationError) -> None:
            raise errors.invalid(
                res.kind,
                res.group,
                name or (doc.get("metadata") or {}).get("name") or "",
                errors.causes_of(e),
            ) from None

        obj: TypedObject = fieldvalidation.validate(res.model, doc, invalid)
        return obj

    def check_body(self, res: Resource, doc: Any, ns: str | None, name: str | None) -> Obj:
        """The body's type, kind, apiVersion, namespace and name against the request's."""
        if not isinstance(doc, dict):
            raise errors.bad_request(
                f"the body must be a {res.kind} object, not {type(doc).__name__}"
            )
        kind = doc.get("kind") or res.kind
        api_version = doc.get("apiVersion") or res.group_version
        if kind != res.kind or api_version != res.group_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) and kind ({kind}) do not match "
                f"the expected {res.group_version} {res.kind}"
            )
        doc = dict(doc, kind=kind, apiVersion=api_version)
        md = doc.get("metadata")
        if md is None:
            md = {}
        if not isinstance(md, dict):
            raise errors.bad_request("metadata must be an object")
        md = dict(md)
        doc["metadata"] = md
        if res.namespaced:
            if md.get("namespace") and ns and md["namespace"] != ns:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            md["namespace"] = ns or md.get("namespace") or "default"
        elif md.get("namespace"):
            md.pop("namespace")
        if name is not None and md.get("name") and md["name"] != name:
            raise errors.bad_request(
                f"the name of the object ({md['name']}) does not match the name on the URL ({name})"
            )
        if name is not None:
            md["name"] = name
        return doc

    async def _check_namespace(self, res: Resource, ns: str | None) -> None:
        """NamespaceLifecycle: no new objects in a missing or terminating namespace."""
        if not res.namespaced or not ns:
            return
        kv = await self.store.get_raw(BY_KIND["Namespace"].key(ns, None))
        if kv is None:
            if ns in BUILTIN:
                with contextlib.suppress(AlreadyExists):
                    await self.store.create(new_namespace(ns))
                return
            raise errors.not_found("namespaces", "", ns)
        cur = json.loads(kv.value)
        if (cur.get("metadata") or {}).get("deletionTimestamp"):
            raise errors.APIError(
                403,
                "Forbidden",
                f'{res.plural} "{ns}" is forbidden: unable to create new content in namespace '
                f"{ns} because it is being terminated",
            )

    # ------------------------------------------------------------ writing

    async def create(
        self, res: Resource, ns: str | None, body: Any, *, dry_run: bool = False
    ) -> Obj:
        doc = self.check_body(res, body, ns, None)
        md = doc["metadata"]
        if md.get("resourceVersion"):
            raise errors.bad_request("resourceVersion should not be set on objects to be created")
        if not md.get("name") and not md.get("generateName"):
            raise errors.invalid(
                res.kind, res.group, "", [("metadata.name", "name or generateName is required")]
            )
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "generation"):
            md.pop(k, None)
        track = not md.get("managedFields")  # given ones are kept, as kube-apiserver does
        obj = self.validate(res, doc)  # drops unknown fields from doc as fieldValidation says
        if track:
            who = fieldvalidation.manager()
            _set_managed(obj, managedfields.record_update(None, doc, who, res))
        await self._check_namespace(res, obj.namespace)
        key = self.store.prepare_create(obj)
        value = self.store.encode(obj)
        self._check_size(value)
        if dry_run:
            if await self.store.get_raw(key) is not None:
                raise errors.already_exists(res.plural, res.group, obj.name)
            return _unwritten(value)
        try:
            rev = await self.store.create_raw(key, value)
        except AlreadyExists:
            raise errors.already_exists(res.plural, res.group, obj.name) from None
        return wire(value, rev)

    @staticmethod
    def _check_size(value: bytes) -> None:
        if len(value) > MAX_OBJECT_BYTES:
            raise errors.too_large(MAX_OBJECT_BYTES)

    async def update(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        body: Any,
        subresource: str = "",
        *,
        dry_run: bool = False,
    ) -> Obj:
        """PUT: replace the object (its status kept), or only its status (`status`)."""
        doc = self.check_body(res, body, ns, name)
        precondition = doc["metadata"].get("resourceVersion") or None
        return await self._write(
            res, ns, name, lambda _cur: doc, precondition, subresource, dry_run=dry_run
        )

    async def patch(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        content_type: str,
        body: bytes,
        subresource: str = "",
        *,
        dry_run: bool = False,
        force: bool = False,
    ) -> Obj:
        if PATCH_TYPES.get(content_type) == "apply":
            return await self._apply(res, ns, name, body, subresource, dry_run, force)
        patch, apply = self._patcher(res, content_type, body)

        def change(cur: Obj) -> Obj:
            return self.check_body(res, apply(cur), ns, name)

        precondition = None
        if isinstance(patch, dict):
            precondition = ((patch.get("metadata") or {}) or {}).get("resourceVersion")
        return await self._write(res, ns, name, change, precondition, subresource, dry_run=dry_run)

    def _patcher(
        self, res: Resource, content_type: str, body: bytes
    ) -> tuple[Any, Callable[[Obj], Obj]]:
        """The decoded patch and a function applying it to an object (a dict)."""
        kind = PATCH_TYPES.get(content_type)
        if kind is None:
            raise errors.unsupported_media_type(content_type)
        try:
            patch = json.loads(body)
        except ValueError as e:
            raise errors.bad_request(f"the patch is not valid JSON: {e}") from None

        def apply(cur: Obj) -> Obj:
            try:
                if kind == "json":
                    out = json_patch(cur, patch)
                elif kind == "merge":
                    if not isinstance(patch, dict):
                        raise PatchError("a merge patch is a JSON object")
                    out = merge_patch(cur, patch)
                else:
                    if not isinstance(patch, dict):
                        raise PatchError("a strategic merge patch is a JSON object")
                    out = strategic_merge(cur, patch, res.model)
            except PatchError as e:
                raise errors.APIError(422, "Invalid", str(e)) from None
            if not isinstance(out, dict):
                raise errors.bad_request("the patch does not leave an object")
            return out

        return patch, apply

    async def _apply(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        body: bytes,
        subresource: str,
        dry_run: bool,
        force: bool,
    ) -> Obj:
        """Server-side apply (apiserver/managedfields.py): create, or merge with
        ownership and conflicts. The answer of a create carries CREATED (popped by the
        server, which then answers 201)."""
        if subresource:
            raise errors.method_not_allowed(f"server-side apply to {res.plural}/{subresource}")
        scope = fieldvalidation.SCOPE.get(None)
        if scope is None or not scope.explicit_manager:
            raise errors.invalid(
                "PatchOptions",
                "meta.k8s.io",
                "",
                [("fieldManager", "Required value: is required for apply patch")],
            )
        try:
            applied = yaml.safe_load(body)
        except yaml.YAMLError as e:
            raise errors.bad_request(f"the applied configuration is not valid YAML: {e}") from None
        applied = self.check_body(res, applied, ns, name)
        manager = fieldvalidation.manager()

        def change(cur: Obj | None) -> Obj:
            out = managedfields.apply(
                cur, applied, manager, force, res.model, res.group_version, res.plural, name
            )
            return self.check_body(res, out, ns, name)

        if await self.store.get_raw(res.key(name, ns)) is None:
            doc = change(None)
            doc["metadata"].pop("resourceVersion", None)
            try:
                created = await self.create(res, ns, doc, dry_run=dry_run)
            except errors.APIError as e:
                if e.reason != "AlreadyExists":
                    raise
            else:
                return {**created, CREATED: True}
        return await self._write(
            res, ns, name, change, None, subresource, dry_run=dry_run, track=False
        )

    async def _write(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        change: Callable[[Obj], Obj],
        precondition: str | None,
        subresource: str,
        *,
        dry_run: bool = False,
        track: bool = True,
    ) -> Obj:
        """Read, change, validate, CAS; retried when nobody asked for a precondition.
        `track`: record the change in managedFields as an Update (unless the request
        sets managedFields itself).
        A dry run stops before the CAS and answers what would have been written."""
        key = res.key(name, ns)
        for _ in range(20):
            kv = await self.store.get_raw(key)
            if kv is None:
                raise errors.not_found(res.plural, res.group, name)
            if precondition is not None and precondition != str(kv.mod_revision):
                raise errors.conflict(res.plural, res.group, name)
            cur = wire(kv)
            new = change(copy.deepcopy(cur))
            new = self._carry(res, cur, new, subresource)
            obj = self.validate(res, new, name)  # unknown fields dropped from new first
            if track and _managed(new) in (None, [], _managed(cur)):
                who = fieldvalidation.manager()
                tracked = managedfields.record_update(cur, new, who, res, subresource)
                _set_managed(obj, tracked)
            old_obj = res.model.model_validate_json(kv.value)
            refused = update_forbidden(old_obj, obj)
            if refused:
                raise errors.invalid(res.kind, res.group, name, refused)
            if getattr(old_obj, "spec", None) != getattr(obj, "spec", None):
                obj.metadata.generation = (old_obj.metadata.generation or 1) + 1
            value = self.store.encode(obj)
            if value == kv.value:
                return cur  # nothing changed: no write, the same resourceVersion
            if removable(new) and not dry_run:  # the last finalizer went: so does it
                try:
                    await self.store.delete_raw(key, kv.mod_revision)
                except Conflict:
                    continue
                return wire(value, kv.mod_revision)
            self._check_size(value)
            if dry_run:
                return wire(value, kv.mod_revision)
            try:
                rev = await self.store.cas_raw(key, value, kv.mod_revision)
            except Conflict:
                if precondition is not None:
                    raise errors.conflict(res.plural, res.group, name) from None
                await asyncio.sleep(0.005)
                continue
            return wire(value, rev)
        raise errors.conflict(res.plural, res.group, name)

    @staticmethod
    def _carry(res: Resource, cur: Obj, new: Obj, subresource: str) -> Obj:
        """What a write may not change: identity always; status through the main
        resource, everything but status through `status`."""
        if subresource == "status":
            out = copy.deepcopy(cur)
            if "status" in new:
                out["status"] = new["status"]
            else:
                out.pop("status", None)
            new = out
        elif "status" in res.subresources:
            if "status" in cur:
                new["status"] = cur["status"]
            else:
                new.pop("status", None)
        md, old = new.setdefault("metadata", {}), cur.get("metadata") or {}
        for k in (
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if k in old:
                md[k] = old[k]
            else:
                md.pop(k, None)
        md.pop("resourceVersion", None)
        return new

    # ------------------------------------------------------------ scale

    @staticmethod
    def to_scale(res: Resource, obj: Obj) -> Obj:
        """An object's autoscaling/v1 Scale (what `kubectl scale` reads and patches)."""
        md = obj["metadata"]
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        sel = spec.get("selector") or {}
        if res.kind == "Deployment":
            sel = selector_string(sel)
        else:
            sel = ",".join(f"{k}={v}" for k, v in sorted(sel.items()))
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: md[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in md
            },
            "spec": {"replicas": spec.get("replicas", 1)},
            "status": {"replicas": status.get("replicas", 0), "selector": sel},
        }

    async def get_scale(self, res: Resource, ns: str | None, name: str) -> Obj:
        return self.to_scale(res, await self.get(res, ns, name))

    def _replicas(self, res: Resource, name: str, scale: Any) -> int:
        if not isinstance(scale, dict) or scale.get("kind", "Scale") != "Scale":
            raise errors.bad_request("the body of a scale request is an autoscaling/v1 Scale")
        n = (scale.get("spec") or {}).get("replicas", 0)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise errors.invalid(
                "Scale",
                "autoscaling",
                name,
                [
                    (
                        "spec.replicas",
                        f"Invalid value: {json.dumps(n)}: must be greater than or equal to 0",
                    )
                ],
            )
        return n

    async def _write_scale(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        replicas_of: Callable[[Obj], int],
        precondition: str | None,
        dry_run: bool,
    ) -> Obj:
        def change(cur: Obj) -> Obj:
            cur.setdefault("spec", {})["replicas"] = replicas_of(cur)
            return cur

        obj = await self._write(res, ns, name, change, precondition, "", dry_run=dry_run)
        return self.to_scale(res, obj)

    async def update_scale(
        self, res: Resource, ns: str | None, name: str, body: Any, *, dry_run: bool = False
    ) -> Obj:
        n = self._replicas(res, name, body)
        pre = ((body.get("metadata") or {}) or {}).get("resourceVersion") or None
        return await self._write_scale(res, ns, name, lambda _cur: n, pre, dry_run)

    async def patch_scale(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        content_type: str,
        body: bytes,
        *,
        dry_run: bool = False,
    ) -> Obj:
        if PATCH_TYPES.get(content_type) == "apply":
            raise errors.unsupported_media_type(f"{content_type} on the scale subresource")
        patch, apply = self._patcher(res, content_type, body)

        def replicas(cur: Obj) -> int:
            return self._replicas(res, name, apply(self.to_scale(res, cur)))

        pre = None
        if isinstance(patch, dict):
            pre = ((patch.get("metadata") or {}) or {}).get("resourceVersion")
        return await self._write_scale(res, ns, name, replicas, pre, dry_run)

    # ------------------------------------------------------------ deleting

    async def delete(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        options: Obj,
        *,
        dry_run: bool = False,
    ) -> Obj:
        """DELETE: the object's last state. An object with finalizers is marked
        (deletionTimestamp) and stays until they are removed; `propagationPolicy`
        Orphan/Foreground add the garbage collector's. A pod on a node is marked (its
        node stops it within the grace period, then removes it), a namespace turns
        Terminating (the namespace controller empties it). Dependents (ownerReferences)
        go in the background: the garbage collector's work."""
        key = res.key(name, ns)
        pre = options.get("preconditions") or {}
        grace = options.get("gracePeriodSeconds")
        for _ in range(20):
            kv = await self.store.get_raw(key)
            if kv is None:
                raise errors.not_found(res.plural, res.group, name)
            if pre.get("resourceVersion") and pre["resourceVersion"] != str(kv.mod_revision):
                raise errors.conflict(res.plural, res.group, name)
            cur = wire(kv)
            md = cur["metadata"]
            if pre.get("uid") and pre["uid"] != md.get("uid"):
                raise errors.conflict(res.plural, res.group, name)
            if dry_run:
                if res.kind == "Namespace" and name in BUILTIN:
                    raise errors.APIError(
                        403,
                        "Forbidden",
                        f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                    )
                return cur
            if res.kind == "Namespace":
                if name in BUILTIN:
                    raise errors.APIError(
                        403,
                        "Forbidden",
                        f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                    )
                if md.get("deletionTimestamp"):
                    return cur
                return await self._mark(res, kv, cur, {"status": {"phase": "Terminating"}})
            policy = options.get("propagationPolicy")
            if policy is None and options.get("orphanDependents") is True:
                policy = "Orphan"  # the older spelling
            if policy not in (None, "Orphan", "Foreground", "Background"):
                raise errors.bad_request(
                    f"propagationPolicy {policy!r}: use Orphan, Foreground or Background"
                )
            finalizers = list(md.get("finalizers") or [])
            wanted = POLICY_FINALIZERS.get(policy or "")
            if wanted and wanted not in finalizers:
                finalizers = [f for f in finalizers if f not in (ORPHAN, FOREGROUND)]
                finalizers.append(wanted)
            if finalizers:  # the object stays until its finalizers are done
                if md.get("deletionTimestamp") and finalizers == md.get("finalizers"):
                    return cur
                more: Obj = {"metadata": {"finalizers": finalizers}}
                if not md.get("deletionTimestamp"):
                    more["metadata"]["deletionGracePeriodSeconds"] = self._grace(res, cur, grace)
                return await self._mark(res, kv, cur, more)
            graceful = res.kind == "Pod" and (cur.get("spec") or {}).get("nodeName")
            if graceful and grace != 0:
                if md.get("deletionTimestamp"):
                    return cur
                secs = (
                    grace
                    if grace is not None
                    else cur["spec"].get("terminationGracePeriodSeconds", 30)
                )
                return await self._mark(
                    res, kv, cur, {"metadata": {"deletionGracePeriodSeconds": secs}}
                )
            try:
                await self.store.delete_raw(key, kv.mod_revision)
            except Conflict:
                continue
            return cur  # dependents: the garbage collector's (control/garbagecollector.py)
        raise errors.conflict(res.plural, res.group, name)

    @staticmethod
    def _grace(res: Resource, cur: Obj, grace: Any) -> int:
        """The grace period of a deletion the finalizers hold up: a pod on a node still
        gets its own; anything else none."""
        if res.kind == "Pod" and (cur.get("spec") or {}).get("nodeName"):
            return int(
                grace if grace is not None else cur["spec"].get("terminationGracePeriodSeconds", 30)
            )
        return 0

    async def _mark(self, res: Resource, kv: KV, cur: Obj, more: Obj) -> Obj:
        new = merge_patch(copy.deepcopy(cur), more)
        new["metadata"]["deletionTimestamp"] = now_iso()
        new["metadata"].pop("resourceVersion", None)
        obj = self.validate(res, new)
        value = self.store.encode(obj)
        try:
            rev = await self.store.cas_raw(kv.key, value, kv.mod_revision)
        except Conflict:
            raise errors.conflict(res.plural, res.group, obj.name) from None
        return wire(value, rev)

    # ------------------------------------------------------------ watching

    async def watch(
        self,
        res: Resource,
        ns: str | None,
        resource_version: str | None,
        match: Match,
        state: WatchState,
    ) -> AsyncIterator[Obj]:
        """Watch events as dicts ({"type", "object"}), from the kind's watch cache.
        Without a resourceVersion (or "0"), ADDED for every current object first. An
        object that starts matching the selectors comes as ADDED, one that stops as
        DELETED (its last matching state), a deletion as DELETED with the last state.
        A resourceVersion older than the cache's ring or compacted in etcd ends the
        watch with an ERROR event carrying a 410 Expired Status."""
        cache = self.cache.kind(res.prefix())
        await cache.started.wait()
        prefix = res.prefix(ns)
        sub = None
        try:
            if not resource_version or resource_version == "0":
                # Subscribed before the list: every event after its revision is kept.
                sub, backlog = cache.subscribe(cache.oldest)
                listed = await self.list(res, ns, match)
                state.revision = listed.revision
                for obj in listed.items:
                    yield {"type": "ADDED", "object": obj}
            else:
                try:
                    state.revision = int(resource_version)
                except ValueError:
                    raise errors.bad_request(
                        f"resourceVersion {resource_version!r} is not valid: use one a list "
                        "or watch returned"
                    ) from None
                await self._check_compacted(prefix, state.revision, cache.revision)
                sub, backlog = cache.subscribe(state.revision)
            start = state.revision
            for ev in backlog:
                out = self._cached_event(ev, prefix, start, match, state)
                if out is not None:
                    yield out
            while True:
                item = await sub.queue.get()
                if isinstance(item, BaseException):
                    raise item
                out = self._cached_event(item, prefix, start, match, state)
                if out is not None:
                    yield out
        except (TooOld, Compacted) as e:
            why = (
                f"too old resource version: {e.revision} ({e.compacted})"
                if isinstance(e, Compacted)
                else str(e)
            )
            yield {"type": "ERROR", "object": errors.expired(why).status()}
        finally:
            if sub is not None:
                cache.unsubscribe(sub)

    async def _check_compacted(self, prefix: str, revision: int, seen: int) -> None:
        """Compacted if etcd no longer has `revision` (one small read, no watch)."""
        if 0 < revision <= seen:
            end = aetcd.utils.prefix_range_end(prefix.encode()).decode()
            try:
                await self.store.range_raw(prefix, end, 1, revision)
            except Compacted as e:
                raise Compacted(revision, e.compacted) from None

    def _cached_event(
        self, ev: ChangeEvent, prefix: str, start: int, match: Match, state: WatchState
    ) -> Obj | None:
        if ev.revision <= start:
            return None
        state.revision = ev.revision
        if not ev.key.startswith(prefix):
            return None
        memo: dict[str, Any] = ev.__dict__.setdefault("_apiserver_memo", {})
        if "new" not in memo:  # decoded once for every watcher of this event
            memo["new"] = wire(ev.value, ev.revision) if ev.value is not None else None
            memo["old"] = wire(ev.prev_value, ev.revision) if ev.prev_value is not None else None
        out = self._event(memo["new"], memo["old"], match)
        if out is not None:
            out.memo = memo
            state.events += 1
        return out

    @staticmethod
    def _event(new: Obj | None, old: Obj | None, match: Match) -> WatchEvent | None:
        """The event a watcher with `match` sees (objects shared: never changed after)."""
        new_ok = new is not None and (match is None or match(new))
        old_ok = old is not None and (match is None or match(old))
        if new_ok:
            return WatchEvent(type="MODIFIED" if old_ok else "ADDED", object=new)
        if old_ok:
            return WatchEvent(type="DELETED", object=old)
        return None


def _unwritten(value: bytes) -> Obj:
    """A dry run's answer to a create: the object, with no resourceVersion yet."""
    obj = json.loads(value)
    obj.get("metadata", {}).pop("resourceVersion", None)
    return obj


def selector_string(sel: Obj) -> str:
    """A LabelSelector in its string form (`a=b,c in (d,e)`), as Scale.status shows it."""
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op, key, vals = e.get("operator"), e.get("key"), ",".join(e.get("values") or [])
        parts.append(
            {"In": f"{key} in ({vals})", "NotIn": f"{key} notin ({vals})", "Exists": key}.get(
                op, f"!{key}"
            )
        )
    return ",".join(parts)


def bookmark(res: Resource, revision: int) -> Obj:
    return {
        "type": "BOOKMARK",
        "object": {
            "kind": res.kind,
            "apiVersion": res.group_version,
            "metadata": {"resourceVersion": str(revision)},
        },
    }
