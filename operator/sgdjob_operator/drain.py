"""Draining before uninstall: `sgdjob operator --drain`, the chart's pre-delete hook.

Kopf keeps the finalizer ``sgdjob.dev/operator`` on every SGDJob it supervises, so a job can
only go while an operator runs. ``helm uninstall`` deletes the operator; jobs left behind
would then wait for a finalizer nobody removes. The chart's pre-delete hook runs this before
Helm deletes anything: it deletes every SGDJob in the watched namespaces (all when none are
given), waits for the still-running operator to let them go (its daemons stop, it removes the
finalizer, the garbage collector takes the pods), and after ``timeout`` seconds removes the
finalizer itself from those still there, since no operator will.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from kubernetes import client as k8s

from sgdjob.api.types import API_GROUP, API_VERSION_NAME, PLURAL
from sgdjob_operator.kube import Credentials, KubeClient, api_configuration

FINALIZER = "sgdjob.dev/operator"

log = logging.getLogger("sgdjob_operator.drain")


def _all_jobs(creds: Credentials | None) -> list[dict[str, Any]]:
    api = k8s.ApiClient(api_configuration(creds))
    try:
        doc: Any = k8s.CustomObjectsApi(api).list_cluster_custom_object(
            API_GROUP, API_VERSION_NAME, PLURAL
        )
    finally:
        api.close()
    return list(doc.get("items") or [])


async def _jobs(
    client: KubeClient, creds: Credentials | None, namespaces: Sequence[str]
) -> list[dict[str, Any]]:
    if not namespaces:
        return await asyncio.to_thread(_all_jobs, creds)
    out: list[dict[str, Any]] = []
    for ns in namespaces:
        out += await client.list(ns, PLURAL)
    return out


async def drain(
    *,
    namespaces: Sequence[str],
    timeout: float,
    credentials: Credentials | None = None,
    poll: float = 1.0,
) -> int:
    """Delete every SGDJob and wait until none is left; returns how many were deleted."""
    client = KubeClient(credentials)
    try:
        jobs = await _jobs(client, credentials, namespaces)
        for job in jobs:
            meta = job["metadata"]
            await client.delete(meta["namespace"], PLURAL, meta["name"])
            log.info("deleted SGDJob %s/%s", meta["namespace"], meta["name"])
        deadline = time.monotonic() + timeout
        while True:
            left = await _jobs(client, credentials, namespaces)
            if not left:
                return len(jobs)
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(poll)
        for job in left:
            meta = job["metadata"]
            kept = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
            log.warning(
                "SGDJob %s/%s still there after %.0fs (no operator?): removing %s",
                meta["namespace"], meta["name"], timeout, FINALIZER,
            )  # fmt: skip
            await client.patch(
                meta["namespace"], PLURAL, meta["name"],
                {"metadata": {"finalizers": kept or None}}, status=False,
            )  # fmt: skip
        return len(jobs)
    finally:
        await client.close()
