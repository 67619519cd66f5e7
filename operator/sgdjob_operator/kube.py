"""A small asyncio Kubernetes REST client (aiohttp): the operator's only API-server I/O
besides Kopf's own watching and patching.

It talks to the same server with the same credentials Kopf logged in with (a
``kopf.ConnectionInfo``), so one login covers both. It knows only the calls the operator makes:
list, create, merge-patch and delete of namespaced objects. Conflicts on create (409) and
absence on delete (404) are reported, not raised, because the reconciler treats both as
"already as desired".
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

CORE = "/api/v1"
JOBS = "/apis/sgdjob.dev/v1alpha1"


class KubeError(RuntimeError):
    """An unexpected answer from the API server; the message has the status and the body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate (a subset of kopf.ConnectionInfo)."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    certificate_path: str | None = None
    private_key_path: str | None = None
    certificate_data: bytes | None = None
    private_key_data: bytes | None = None


def connection_from_kopf(info: Any) -> Connection:
    """Take what this client understands from a kopf.ConnectionInfo."""
    return Connection(
        server=str(info.server).rstrip("/"),
        token=info.token,
        ca_path=info.ca_path,
        ca_data=info.ca_data,
        insecure=bool(info.insecure),
        certificate_path=info.certificate_path,
        private_key_path=info.private_key_path,
        certificate_data=info.certificate_data,
        private_key_data=info.private_key_data,
    )


def _data_file(data: bytes, suffix: str) -> str:
    """ssl loads client certificates only from files: put embedded kubeconfig data in one."""
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(data)
    os.chmod(f.name, 0o600)
    return f.name


def _ssl_context(conn: Connection) -> ssl.SSLContext | bool:
    if not conn.server.startswith("https"):
        return False
    if conn.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        cadata = conn.ca_data.decode() if conn.ca_data else None
        ctx = ssl.create_default_context(cafile=conn.ca_path, cadata=cadata)
    cert = conn.certificate_path
    key = conn.private_key_path
    if cert is None and conn.certificate_data:
        cert = _data_file(conn.certificate_data, ".crt")
    if key is None and conn.private_key_data:
        key = _data_file(conn.private_key_data, ".key")
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def collection_path(namespace: str, plural: str) -> str:
    """The URL path of a namespaced collection: pods, services, configmaps, secrets, events."""
    base = JOBS if plural == "sgdjobs" else CORE
    return f"{base}/namespaces/{namespace}/{plural}"


class KubeClient:
    """List, create, patch and delete namespaced objects; one aiohttp session."""

    def __init__(self, conn: Connection, *, timeout: float = 10.0) -> None:
        self._conn = conn
        headers = {"Accept": "application/json"}
        if conn.token:
            headers["Authorization"] = f"Bearer {conn.token}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(ssl=_ssl_context(conn), limit=64),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        url = self._conn.server + path
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._session.request(
            method, url, json=body, params=params, headers=headers
        ) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = None
            return resp.status, data

    async def list(
        self, namespace: str, plural: str, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Objects of a collection. The selector is a hint only: callers filter again."""
        params = {"labelSelector": label_selector} if label_selector else None
        status, data = await self._call("GET", collection_path(namespace, plural), params=params)
        if status == 404:
            return []
        if status != 200 or not isinstance(data, Mapping):
            raise KubeError(status, f"list {plural}: {data}")
        items = data.get("items") or []
        return [i for i in items if isinstance(i, dict)]

    async def get(self, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
        status, data = await self._call("GET", f"{collection_path(namespace, plural)}/{name}")
        if status == 404:
            return None
        if status != 200 or not isinstance(data, dict):
            raise KubeError(status, f"get {plural}/{name}: {data}")
        return data

    async def create(self, namespace: str, plural: str, body: Mapping[str, Any]) -> bool:
        """Create; False if it already exists (409), which callers treat as done."""
        status, data = await self._call("POST", collection_path(namespace, plural), body=body)
        if status == 409:
            return False
        if status not in (200, 201, 202):
            name = (body.get("metadata") or {}).get("name")
            raise KubeError(status, f"create {plural}/{name}: {data}")
        return True

    async def patch(
        self, namespace: str, plural: str, name: str, body: Mapping[str, Any], *, status: bool
    ) -> None:
        """Merge-patch an object, or its status subresource."""
        path = f"{collection_path(namespace, plural)}/{name}" + ("/status" if status else "")
        code, data = await self._call(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )
        if code not in (200, 201):
            raise KubeError(code, f"patch {plural}/{name}: {data}")

    async def delete(
        self, namespace: str, plural: str, name: str, *, grace_seconds: int | None = None
    ) -> bool:
        """Delete; False if it was already gone (404)."""
        body = None
        if grace_seconds is not None:
            body = {
                "kind": "DeleteOptions",
                "apiVersion": "v1",
                "gracePeriodSeconds": grace_seconds,
            }
        path = f"{collection_path(namespace, plural)}/{name}"
        status, data = await self._call("DELETE", path, body=body)
        if status == 404:
            return False
        if status not in (200, 202):
            raise KubeError(status, f"delete {plural}/{name}: {data}")
        return True
