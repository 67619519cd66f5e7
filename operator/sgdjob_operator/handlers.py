"""The Kopf handlers: how Kopf drives the operator (the I/O itself is in ``reconcile``).

``build_registry(config)`` registers, on a fresh ``kopf.OperatorRegistry``:

- a login handler (the given connection in tests, else service account or kubeconfig);
- ``sgdjob_pods``, a Kopf index of this operator's pods by (namespace, job), fed by Kopf's pod
  watch: reconciling reads it instead of listing pods, so 500 jobs cost no O(jobs x pods)
  list calls. A pod event also wakes its job's reconcile loop;
- one daemon per SGDJob: the job's single writer. It loops over ``reconcile.reconcile_once``
  (validate, observe, decide, persist, act, post Events) and sleeps until a pod event, a
  coordinator report or the resync interval. A daemon is restarted by Kopf for
  every existing job when the operator restarts (the resume path): all it needs is in the
  job's status and the pods themselves;
- a timer per SGDJob polling shard 0's ``/status`` (aiohttp, short timeout) for step, loss,
  accuracy and per-worker step times, which feed the straggler rule.

A finished job's daemon cleans pods up per ``cleanPodPolicy``, deletes the job after
``ttlSecondsAfterFinished`` and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from sgdjob.api.types import API_GROUP, API_VERSION_NAME, PLURAL
from sgdjob_operator import manifests as mf
from sgdjob_operator.kube import connection_from_kopf
from sgdjob_operator.reconcile import (
    TERMINAL,
    OperatorConfig,
    OperatorState,
    reconcile_once,
    wait_ttl,
)
from sgdjob_operator.status import parse_coordinator

__all__ = ["FINALIZER", "POD_INDEX", "OperatorConfig", "OperatorState", "build_registry"]

FINALIZER = "sgdjob.dev/operator"
POD_INDEX = "sgdjob_pods"


def build_registry(config: OperatorConfig) -> tuple[kopf.OperatorRegistry, OperatorState]:
    """A registry with every handler, bound to one configuration and one state."""
    registry = kopf.OperatorRegistry()
    state = OperatorState(config=config)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # We post our own Events with unique names; Kopf's per-handler events are noise.
        settings.posting.enabled = False
        settings.persistence.finalizer = FINALIZER
        state.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.coordinator_timeout)
        )

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        await state.close()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info: kopf.ConnectionInfo | None
        if config.connection is not None:
            c = config.connection
            info = kopf.ConnectionInfo(server=c.server, token=c.token, insecure=c.insecure)
        else:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is not None:
            state.connection = connection_from_kopf(info)
        return info

    @kopf.index(
        "", "v1", "pods", id=POD_INDEX, labels={mf.LABEL_JOB: kopf.PRESENT}, registry=registry
    )
    def sgdjob_pods(
        namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
    ) -> dict[tuple[str, str], dict[str, Any]]:
        namespace = namespace or ""
        job = labels[mf.LABEL_JOB]
        runtime = state.jobs.get((namespace, job))
        if runtime is not None:
            runtime.wake.set()  # a pod changed: reconcile now, not at the next resync
        node = (body.get("spec") or {}).get("nodeName")
        return {
            (namespace, job): {
                "metadata": dict(body.metadata),
                "spec": {"nodeName": node} if node else {},
                "status": dict(body.get("status") or {}),
            }
        }

    @kopf.daemon(
        API_GROUP,
        API_VERSION_NAME,
        PLURAL,
        id="supervise",
        cancellation_timeout=2.0,
        registry=registry,
    )
    async def supervise(
        name: str,
        namespace: str | None,
        uid: str,
        body: kopf.Body,
        stopped: Any,
        logger: Any,
        **kwargs: Any,
    ) -> None:
        if namespace is None:
            return  # SGDJobs are namespaced; a cluster-scoped body is not ours
        ref = mf.JobRef(name=name, namespace=namespace, uid=uid)
        runtime = state.runtime(namespace, name)
        index = kwargs[POD_INDEX]
        try:
            while not stopped:
                runtime.wake.clear()
                started = time.perf_counter()
                error = False
                finished, in_flight = False, False
                try:
                    pods = list(index.get((namespace, name), []))
                    finished, in_flight = await reconcile_once(state, ref, body, pods, runtime)
                except Exception as err:
                    error = True
                    logger.exception(f"reconcile failed: {err}")
                finally:
                    config.metrics.observe_reconcile(time.perf_counter() - started, error=error)
                if finished:
                    await wait_ttl(state, ref, runtime)
                    return
                timeout = config.resync_seconds / 4 if in_flight or error else config.resync_seconds
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(runtime.wake.wait(), timeout=timeout)
        finally:
            if stopped:
                state.jobs.pop((namespace, name), None)
                config.metrics.forget(namespace, name)

    @kopf.timer(
        API_GROUP,
        API_VERSION_NAME,
        PLURAL,
        id="poll-coordinator",
        interval=config.poll_seconds,
        registry=registry,
    )
    async def poll_coordinator(
        name: str, namespace: str | None, uid: str, logger: Any, **kwargs: Any
    ) -> None:
        if namespace is None:
            return
        runtime = state.jobs.get((namespace, name))
        if runtime is None or runtime.spec is None or state.http is None:
            return
        if runtime.status is not None and runtime.status.phase in TERMINAL:
            return
        ps0 = [
            p
            for p in kwargs[POD_INDEX].get((namespace, name), [])
            if p["metadata"].get("name") == mf.pod_name(name, "ps", 0)
        ]
        if not ps0 or (ps0[0].get("status") or {}).get("phase") != "Running":
            return  # nothing to ask yet; avoids timeouts against pods that do not exist
        url = config.url_for(mf.JobRef(name=name, namespace=namespace, uid=uid), runtime.spec)
        try:
            async with state.http.get(url) as resp:
                doc = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
            logger.debug(f"coordinator {url} unreachable: {err}")
            return
        report = parse_coordinator(doc)
        if report is not None:
            runtime.report = report
            runtime.wake.set()

    return registry, state
