"""The operator's own API-server I/O, over the official ``kubernetes`` client.

Kopf watches and patches SGDJobs itself; everything else the operator does (create, get,
list, merge-patch and delete of its children, Events, the status subresource) goes through
:class:`KubeClient`. The ``kubernetes`` client is synchronous, so each call runs on a small
thread pool of its own; answers are read as plain JSON dicts (``_preload_content=False``), the
shape Kopf and the manifests use.

Credentials are read again whenever they may have changed: a token file is re-read when its
modification time moves, in-cluster service-account tokens are refreshed by the client's own
loader, and a request answered 401 re-reads the credentials and is tried once more, so a
rotated token never breaks a write.

Errors: 404 on get/delete and 409 on create are answers, not errors (the reconciler decides
what they mean); anything else raises :class:`KubeError` with the server's status, reason and
message, which the reconciler shows in the job's status and an Event.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from sgdjob.api.types import API_GROUP, API_VERSION_NAME, PLURAL

# The typed API method suffix of each core collection the operator touches.
CORE_KINDS = {
    "pods": "pod",
    "services": "service",
    "configmaps": "config_map",
    "secrets": "secret",
    "events": "event",
}


class KubeError(RuntimeError):
    """An API server refusal: status code, machine reason and the server's own message."""

    def __init__(self, status: int, reason: str, message: str, *, action: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.action = action
        super().__init__(f"{action}: {status} {reason}: {message}" if action else message)


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to log in.

    ``kubeconfig``: a kubeconfig file (client certificates, tokens or token files in it).
    ``server`` + ``token_file`` (+ ``ca_path``): a bearer token read from a file at each use,
    e.g. a TokenRequest token that is rotated while the operator runs.
    Neither: in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``.
    """

    kubeconfig: str | None = None
    server: str | None = None
    token_file: str | None = None
    ca_path: str | None = None


class _TokenFile:
    """A refresh hook that re-reads a token file when its modification time changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None

    def __call__(self, cfg: k8s.Configuration) -> None:
        st = os.stat(self.path)
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            with open(self.path, encoding="utf-8") as f:
                cfg.api_key = {"BearerToken": "Bearer " + f.read().strip()}
            self._stamp = stamp


def api_configuration(creds: Credentials | None) -> k8s.Configuration:
    """A client configuration for these credentials (see :class:`Credentials`)."""
    cfg = k8s.Configuration()
    if creds is not None and creds.token_file is not None:
        if not creds.server:
            raise ValueError("a token file needs the server it is for")
        cfg.host = creds.server
        cfg.ssl_ca_cert = creds.ca_path
        cfg.verify_ssl = creds.ca_path is not None
        hook = _TokenFile(creds.token_file)
        hook(cfg)
        cfg.refresh_api_key_hook = hook  # type: ignore[assignment]
    elif creds is not None and creds.kubeconfig is not None:
        k8s_config.load_kube_config(config_file=creds.kubeconfig, client_configuration=cfg)
    else:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=cfg)
    return cfg


def bearer_token(cfg: k8s.Configuration) -> str | None:
    """The bearer token a configuration sends now (after its refresh hook), if any."""
    # The client's loaders keep it under "BearerToken" (older releases: "authorization").
    value = cfg.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
    return value.split(" ", 1)[1] if value.lower().startswith("bearer ") else None


def _error(err: ApiException, action: str) -> KubeError:
    reason, message = str(err.reason or ""), str(err.body or err.reason or "")
    try:
        doc = json.loads(err.body) if err.body else {}
        if isinstance(doc, dict):
            reason = str(doc.get("reason") or reason)
            message = str(doc.get("message") or message)
    except ValueError:
        pass
    return KubeError(int(err.status or 0), reason, message, action=action)


class KubeClient:
    """Namespaced create/get/list/patch/delete for the operator's children and its jobs."""

    def __init__(
        self,
        creds: Credentials | None,
        *,
        timeout: float = 15.0,
        threads: int = 8,
        on_request: Callable[[], None] | None = None,
    ):
        self._creds = creds
        self._on_request = on_request
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")
        self._threads = threads
        self._api = self._connect()

    def _connect(self) -> k8s.ApiClient:
        cfg = api_configuration(self._creds)
        cfg.connection_pool_maxsize = self._threads
        return k8s.ApiClient(cfg)

    async def close(self) -> None:
        await asyncio.to_thread(self._api.close)
        self._pool.shutdown(wait=False)

    def _method(self, plural: str, verb: str) -> Callable[..., Any]:
        if plural == PLURAL:
            api = k8s.CustomObjectsApi(self._api)
            names = {
                "list": "list_namespaced_custom_object",
                "get": "get_namespaced_custom_object",
                "create": "create_namespaced_custom_object",
                "patch": "patch_namespaced_custom_object",
                "patch_status": "patch_namespaced_custom_object_status",
                "delete": "delete_namespaced_custom_object",
            }
            return getattr(api, names[verb])
        kind = CORE_KINDS[plural]
        core = k8s.CoreV1Api(self._api)
        if verb == "patch_status":
            return getattr(core, f"patch_namespaced_{kind}_status")
        verb = "read" if verb == "get" else verb  # the typed core API reads, not gets
        return getattr(core, f"{verb}_namespaced_{kind}")

    def _args(self, plural: str, namespace: str, name: str | None, payload: Any) -> tuple[Any, ...]:
        """Positional arguments in the order the typed methods take them."""
        if plural == PLURAL:
            head: tuple[Any, ...] = (API_GROUP, API_VERSION_NAME, namespace, PLURAL)
            return head + tuple(x for x in (name, payload) if x is not None)
        if name is None:
            return (namespace,) if payload is None else (namespace, payload)
        return (name, namespace) if payload is None else (name, namespace, payload)

    async def _call(
        self,
        action: str,
        plural: str,
        verb: str,
        *,
        namespace: str,
        name: str | None = None,
        payload: Any = None,
        **kw: Any,
    ) -> Any:
        """Run one call on the pool; a 401 re-reads the credentials and tries once more."""
        loop = asyncio.get_running_loop()
        args = self._args(plural, namespace, name, payload)
        for attempt in (0, 1):
            fn = self._method(plural, verb)

            def run(fn: Callable[..., Any] = fn) -> Any:
                resp = fn(*args, _preload_content=False, _request_timeout=self._timeout, **kw)
                data = resp.data
                return json.loads(data) if data else None

            if self._on_request is not None:
                self._on_request()
            try:
                return await loop.run_in_executor(self._pool, run)
            except ApiException as err:
                if err.status == 401 and attempt == 0:
                    self._api = await asyncio.to_thread(self._connect)
                    continue
                raise _error(err, action) from None
        raise AssertionError("unreachable")

    async def list(
        self, namespace: str, plural: str, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        kw = {"label_selector": label_selector} if label_selector else {}
        doc = await self._call(f"list {plural}", plural, "list", namespace=namespace, **kw)
        items = (doc or {}).get("items") or []
        return [i for i in items if isinstance(i, dict)]

    async def get(self, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
        try:
            doc = await self._call(
                f"get {plural}/{name}", plural, "get", namespace=namespace, name=name
            )
        except KubeError as err:
            if err.status == 404:
                return None
            raise
        return doc if isinstance(doc, dict) else None

    async def create(self, namespace: str, plural: str, body: Mapping[str, Any]) -> bool:
        """Create; False when an object of that name already exists (409)."""
        name = (body.get("metadata") or {}).get("name")
        try:
            await self._call(
                f"create {plural}/{name}", plural, "create", namespace=namespace, payload=dict(body)
            )
        except KubeError as err:
            if err.status == 409:
                return False
            raise
        return True

    async def patch(
        self, namespace: str, plural: str, name: str, body: Mapping[str, Any], *, status: bool
    ) -> None:
        """Merge-patch an object, or its status subresource."""
        verb = "patch_status" if status else "patch"
        what = f"patch {plural}/{name}" + ("/status" if status else "")
        await self._call(
            what,
            plural,
            verb,
            namespace=namespace,
            name=name,
            payload=dict(body),
            _content_type="application/merge-patch+json",
        )

    async def delete(
        self,
        namespace: str,
        plural: str,
        name: str,
        *,
        grace_seconds: int | None = None,
        uid: str | None = None,
    ) -> bool:
        """Delete; False if it was already gone (404). ``uid`` deletes only that incarnation."""
        opts: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            opts["gracePeriodSeconds"] = grace_seconds
        if uid is not None:
            opts["preconditions"] = {"uid": uid}
        try:
            await self._call(
                f"delete {plural}/{name}",
                plural,
                "delete",
                namespace=namespace,
                name=name,
                body=opts,
            )
        except KubeError as err:
            if err.status == 404 or (err.status == 409 and uid is not None):
                return False  # gone, or already replaced by another incarnation
            raise
        return True
