"""One reconcile pass of one SGDJob and the I/O it needs (API client, Events, status).

``reconcile_once`` validates the spec (an invalid one fails the job, naming the field, and
creates nothing), makes sure the ConfigMap, Secret and Service exist, observes the job's pods,
asks ``sgdjob.policy.decide``, persists the status (counters first, so a crash between
persisting and acting repeats an action instead of losing a count) and then acts: creates,
recreates (with node anti-affinity for stragglers) and deletes pods, posts an Event for every
action, and cleans up a finished job per ``cleanPodPolicy``. ``wait_ttl`` deletes a finished
job after ``ttlSecondsAfterFinished``. The Kopf wiring lives in ``handlers``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sgdjob.api.types import API_VERSION, KIND, PLURAL, SGDJobSpec, SGDJobStatus
from sgdjob.api.validation import SpecError, parse_job
from sgdjob.curvekeys import JobKeys
from sgdjob.policy import Create, Decision, Delete, Fail, Recreate, Succeed, cleanup_targets, decide
from sgdjob_operator import manifests as mf
from sgdjob_operator.kube import Connection, KubeClient
from sgdjob_operator.metrics import OperatorMetrics
from sgdjob_operator.observe import format_time, is_ready, observe_pods, parse_time
from sgdjob_operator.status import (
    CoordinatorReport,
    failed_status,
    load_status,
    next_status,
    status_body,
)

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
        # Made once per job (a later pass gets 409 and keeps the first keys).
        (
            "secrets",
            mf.secret(
                ref, secrets.token_hex(32), JobKeys.generate() if spec.security.curve else None
            ),
        ),
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
        # A restarted shard pod finds its checkpoints only on a volume that outlives pods.
        shards_recoverable=spec.checkpoint.every is not None
        and spec.kubernetes.output_claim_name is not None,
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
