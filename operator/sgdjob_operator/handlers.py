"""The Kopf handlers: the operator's I/O layer (with ``kube`` and the coordinator poll).

``build_registry(config)`` registers, on a fresh ``kopf.OperatorRegistry``:

- a login handler (the given connection in tests, else service account or kubeconfig);
- ``sgdjob_pods``, a Kopf index of this operator's pods by (namespace, job), fed by Kopf's pod
  watch: reconciling reads it instead of listing pods, so 500 jobs cost no O(jobs x pods)
  list calls. A pod event also wakes its job's reconcile loop;
- one daemon per SGDJob: the job's single writer. It validates the spec (an invalid one fails
  the job, naming the field, and creates nothing), then loops: observe pods, ask
  ``sgdjob.policy.decide``, persist the status (counters first, so a crash between persisting
  and acting repeats the action instead of losing a count), act, post Events, sleep until a
  pod event, a coordinator report or the resync interval. A daemon is restarted by Kopf for
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
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf

from sgdjob.api.types import (
    API_GROUP,
    API_VERSION,
    API_VERSION_NAME,
    KIND,
    PLURAL,
    SGDJobSpec,
    SGDJobStatus,
)
from sgdjob.api.validation import SpecError, parse_job
from sgdjob.policy import Create, Decision, Delete, Fail, Recreate, Succeed, cleanup_targets, decide
from sgdjob_operator import manifests as mf
from sgdjob_operator.kube import Connection, KubeClient, connection_from_kopf
from sgdjob_operator.metrics import OperatorMetrics
from sgdjob_operator.observe import format_time, is_ready, observe_pods, parse_time
from sgdjob_operator.status import (
    CoordinatorReport,
    failed_status,
    load_status,
    next_status,
    parse_coordinator,
    status_body,
)

FINALIZER = "sgdjob.dev/operator"
POD_INDEX = "sgdjob_pods"
TERMINAL = ("Succeeded", "Failed")

log = logging.getLogger("sgdjob_operator")

CoordinatorUrl = Callable[[mf.JobRef, SGDJobSpec], str]


@dataclass
class OperatorConfig:
    """Everything the handlers need that is not in a job."""

    pod_settings: mf.PodSettings
    # Maps a job to its coordinator /status URL; tests point it at a local server.
    coordinator_url: CoordinatorUrl | None = None
    resync_seconds: float = 2.0
    poll_seconds: float = 3.0
    coordinator_timeout: float = 2.0
    # Given: log in to exactly this server (tests, benchmarks). None: Kopf's usual sources.
    connection: Connection | None = None
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)

    def url_for(self, ref: mf.JobRef, spec: SGDJobSpec) -> str:
        if self.coordinator_url is not None:
            return self.coordinator_url(ref, spec)
        return mf.coordinator_url(ref, spec, self.pod_settings.cluster_domain)


@dataclass
class JobRuntime:
    """In-memory state of one job in this process: rebuilt from the cluster on restart."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    spec: SGDJobSpec | None = None
    status: SGDJobStatus | None = None
    report: CoordinatorReport | None = None
    base_ready: bool = False


@dataclass
class OperatorState:
    config: OperatorConfig
    jobs: dict[tuple[str, str], JobRuntime] = field(default_factory=dict)
    client: KubeClient | None = None
    connection: Connection | None = None
    http: aiohttp.ClientSession | None = None

    def runtime(self, namespace: str, name: str) -> JobRuntime:
        return self.jobs.setdefault((namespace, name), JobRuntime())

    def kube(self) -> KubeClient:
        if self.client is None:
            if self.connection is None:
                raise RuntimeError("the operator has not logged in yet")
            self.client = KubeClient(self.connection)
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.http is not None:
            await self.http.close()


def _now() -> float:
    return time.time()


async def post_event(
    client: KubeClient, ref: mf.JobRef, *, warning: bool, reason: str, message: str
) -> None:
    """An Event on the job; names are unique so no generateName support is needed."""
    body = mf.event(
        ref=ref,
        name=f"{ref.name}.{uuid.uuid4().hex[:16]}",
        type_="Warning" if warning else "Normal",
        reason=reason,
        message=message,
        timestamp=format_time(_now()),
    )
    try:
        await client.create(ref.namespace, "events", body)
    except Exception as err:  # an Event is best effort; never fail a reconcile over it
        log.warning("%s/%s: could not post event %s: %s", ref.namespace, ref.name, reason, err)


async def ensure_base(
    client: KubeClient, ref: mf.JobRef, spec: SGDJobSpec, metrics: OperatorMetrics
) -> None:
    """ConfigMap, token Secret and Service; 409 means a previous pass made them."""
    for plural, body in (
        ("configmaps", mf.config_map(ref, spec)),
        ("secrets", mf.secret(ref, secrets.token_hex(32))),
        ("services", mf.service(ref, spec)),
    ):
        # Await first: `x += await f()` reads x before awaiting and loses concurrent updates.
        created = await client.create(ref.namespace, plural, body)
        metrics.children_created += int(created)


async def execute(
    client: KubeClient,
    state: OperatorState,
    ref: mf.JobRef,
    spec: SGDJobSpec,
    decision: Decision,
) -> bool:
    """Carry out the pod actions; True when something is still in flight (resync soon)."""
    settings = state.config.pod_settings
    metrics = state.config.metrics
    created: list[str] = []
    pending = False
    for a in decision.actions:
        if isinstance(a, Delete):
            name = mf.pod_name(ref.name, a.role, a.index)
            if await client.delete(ref.namespace, "pods", name):
                text = f"deleted {name}: {a.reason}"
                await post_event(client, ref, warning=False, reason="DeletedLeftover", message=text)
            pending = True
        elif isinstance(a, (Create, Recreate)):
            name = mf.pod_name(ref.name, a.role, a.index)
            if isinstance(a, Recreate):
                await client.delete(ref.namespace, "pods", name, grace_seconds=0)
                if a.straggler:
                    metrics.replacements += 1
                    text = f"replaced {name} as attempt {a.attempt} avoiding {a.avoid_nodes}: "
                    await post_event(
                        client,
                        ref,
                        warning=True,
                        reason="ReplacedStraggler",
                        message=text + a.reason,
                    )
                else:
                    metrics.restarts += 1
                    text = f"restarting {name} as attempt {a.attempt}: {a.reason}"
                    await post_event(client, ref, warning=True, reason="Restarted", message=text)
            body = mf.pod(
                ref=ref,
                spec=spec,
                role=a.role,
                index=a.index,
                attempt=a.attempt,
                settings=settings,
                avoid_nodes=a.avoid_nodes,
            )
            if await client.create(ref.namespace, "pods", body):
                created.append(name)
                metrics.children_created += 1
            else:
                pending = True  # the old pod is still terminating; try again next pass
    if created:
        await post_event(
            client,
            ref,
            warning=False,
            reason="Created",
            message="created pods " + ", ".join(created),
        )
    return pending


async def finish(
    client: KubeClient,
    ref: mf.JobRef,
    spec: SGDJobSpec,
    decision: Decision,
    pods: list[Mapping[str, Any]],
) -> None:
    """Events and clean-up of a job that just succeeded or failed."""
    for a in decision.actions:
        if isinstance(a, (Succeed, Fail)):
            await post_event(
                client, ref, warning=isinstance(a, Fail), reason=a.reason, message=a.message
            )
    await clean_up(client, ref, spec, pods)


async def clean_up(
    client: KubeClient, ref: mf.JobRef, spec: SGDJobSpec, pods: list[Mapping[str, Any]]
) -> None:
    """Delete the pods ``cleanPodPolicy`` names; already gone is fine."""
    replicas, _ = observe_pods(pods, ref)
    for r in cleanup_targets(spec.supervision.clean_pod_policy, replicas):
        await client.delete(ref.namespace, "pods", mf.pod_name(ref.name, r.role, r.index))


async def write_status(
    client: KubeClient, ref: mf.JobRef, runtime: JobRuntime, status: SGDJobStatus
) -> None:
    if runtime.status is not None and status == runtime.status:
        return
    await client.patch(
        ref.namespace, PLURAL, ref.name, {"status": status_body(status)}, status=True
    )
    runtime.status = status


async def reconcile_once(
    state: OperatorState,
    ref: mf.JobRef,
    body: Mapping[str, Any],
    pods: list[Mapping[str, Any]],
    runtime: JobRuntime,
) -> tuple[bool, bool]:
    """One pass. Returns (finished, in_flight)."""
    client = state.kube()
    metrics = state.config.metrics
    previous = runtime.status or load_status(body.get("status"))
    runtime.status = previous
    now = _now()
    if runtime.spec is None:
        try:
            runtime.spec = validate_job(ref.name, body.get("spec") or {})
        except SpecError as err:
            if previous.phase not in TERMINAL:
                message = f"invalid spec: {err}"
                status = failed_status(
                    previous, reason="InvalidSpec", message=message, now=format_time(now)
                )
                await write_status(client, ref, runtime, status)
                await post_event(client, ref, warning=True, reason="InvalidSpec", message=message)
            metrics.set_phase(ref.namespace, ref.name, "Failed")
            return True, False
    spec = runtime.spec
    if previous.phase in TERMINAL:
        # Resumed after finishing (e.g. the operator restarted mid clean-up): clean up again,
        # idempotently; the caller then honours the TTL.
        metrics.set_phase(ref.namespace, ref.name, previous.phase)
        await clean_up(client, ref, spec, pods)
        return True, False
    if not runtime.base_ready:
        await ensure_base(client, ref, spec, metrics)
        runtime.base_ready = True
    replicas, by_name = observe_pods(pods, ref)
    report = runtime.report
    decision = decide(
        spec=spec,
        replicas=replicas,
        counters=previous.supervision,
        progress=report.progress() if report is not None else None,
        now=now,
        start_time=parse_time(previous.start_time) or now,
    )
    current = {r.name for r in replicas if not _is_stale(r, decision)}
    ready = [by_name[n] for n in current if is_ready(by_name[n])]
    status = next_status(
        previous=previous,
        decision=decision,
        ready_shards=sum(1 for p in ready if _role(p) == "ps"),
        ready_workers=sum(1 for p in ready if _role(p) == "worker"),
        report=report,
        now=format_time(now),
        generation=(body.get("metadata") or {}).get("generation"),
    )
    # Persist the counters before acting: a crash in between repeats an action, never
    # forgets a restart it already made.
    await write_status(client, ref, runtime, status)
    metrics.set_phase(ref.namespace, ref.name, status.phase)
    if status.phase in TERMINAL:
        await finish(client, ref, spec, decision, pods)
        return True, False
    in_flight = await execute(client, state, ref, spec, decision)
    return False, in_flight


def validate_job(name: str, raw_spec: Mapping[str, Any]) -> SGDJobSpec:
    """The spec and the name (pod names must stay DNS labels); SpecError names the field."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": raw_spec,
    }
    return parse_job(doc).spec


def _role(pod: Mapping[str, Any]) -> str:
    return str(((pod.get("metadata") or {}).get("labels") or {}).get(mf.LABEL_ROLE, ""))


def _is_stale(r: Any, decision: Decision) -> bool:
    rs = decision.counters.replicas.get(r.name)
    return rs is not None and r.attempt < rs.attempt


async def wait_ttl(state: OperatorState, ref: mf.JobRef, runtime: JobRuntime) -> None:
    """Delete the finished job after ttlSecondsAfterFinished (children go by owner refs).

    The sleep is cancelled with the daemon (Kopf's recommended way to stop async daemons).
    """
    spec = runtime.spec
    status = runtime.status
    if spec is None or status is None:
        return
    ttl = spec.supervision.ttl_seconds_after_finished
    done = parse_time(status.completion_time)
    if ttl is None or done is None:
        return
    delay = done + ttl - _now()
    if delay > 0:
        await asyncio.sleep(delay)
    await state.kube().delete(ref.namespace, PLURAL, ref.name)
    await post_event(state.kube(), ref, warning=False, reason="Deleted", message="TTL expired")


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
