"""The Kopf handlers: how Kopf drives the operator (the I/O itself is in ``reconcile``).

``build_registry(config)`` registers, on a fresh ``kopf.OperatorRegistry``:

- a login handler: the same credentials the operator's own client uses
  (``kube.api_configuration``), read again each time Kopf logs in (after a 401), so a
  rotated token is picked up by both;
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
from sgdjob_operator.kube import api_configuration, bearer_token
from sgdjob_operator.reconcile import (
    TERMINAL,
    OperatorConfig,
    OperatorState,
    Pass,
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
    def login(**_: Any) -> kopf.ConnectionInfo:
        cfg = api_configuration(config.credentials)
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            token=bearer_token(cfg),
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
        )

    @kopf.index(
        "", "v1", "pods", id=POD_INDEX, labels={mf.LABEL_JOB: kopf.PRESENT}, registry=registry
    )
    def sgdjob_pods(
        namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
    ) -> dict[tuple[str, str], dict[str, Any]]:
        namespace = namespace or ""
        job = labels[mf.LABEL_JOB]
        runtime = state.by_name(namespace, job)
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
        runtime = state.runtime(ref)
        index = kwargs[POD_INDEX]
        errors = 0
        try:
            while not stopped:
                runtime.wake.clear()
                started = time.perf_counter()
                error = False
                result = Pass()
                try:
                    pods = list(index.get((namespace, name), []))
                    result = await reconcile_once(state, ref, body, pods, runtime)
                    errors = 0
                except Exception as err:
                    error = True
                    errors += 1
                    logger.exception(f"reconcile failed: {err}")
                finally:
                    config.metrics.observe_reconcile(time.perf_counter() - started, error=error)
                if result.finished:
                    await wait_ttl(state, ref, runtime)
                    return
                if result.retry_after is not None:
                    # Backing off after a refusal: a pod event must not cut the wait short.
                    await asyncio.sleep(result.retry_after)
                    continue
                if error:  # a bug or an outage, not a refusal: back off as well
                    delay = config.resync_seconds * 2 ** min(errors - 1, 5)
                    await asyncio.sleep(min(delay, config.max_backoff_seconds))
                    continue
                timeout = config.resync_seconds / 4 if result.in_flight else config.resync_seconds
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(runtime.wake.wait(), timeout=timeout)
        finally:
            # However the daemon ends (stopped, finished, deleted job), its state goes: a job
            # created again under this name has another uid and starts from nothing.
            state.forget(ref)

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
        runtime = state.jobs.get(uid)
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
