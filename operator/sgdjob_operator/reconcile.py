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
from sgdjob.policy import (
    Create,
    Decision,
    Delete,
    Fail,
    Recreate,
    Succeed,
    cleanup_targets,
    decide,
    replica_name,
)
from sgdjob_operator import manifests as mf
from sgdjob_operator.kube import Credentials, KubeClient, KubeError
from sgdjob_operator.metrics import OperatorMetrics
from sgdjob_operator.observe import (
    final_message,
    format_time,
    is_ready,
    observe_pods,
    owned_by,
    parse_time,
)
from sgdjob_operator.status import (
    CoordinatorReport,
    blocked_status,
    failed_status,
    load_status,
    next_status,
    status_body,
    unblocked_status,
    with_final,
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
    # Given: log in with exactly these (tests, benchmarks). None: in-cluster, else kubeconfig.
    credentials: Credentials | None = None
    # Backoff after a refused action: resync_seconds x 2^(n-1), at most this.
    max_backoff_seconds: float = 60.0
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)

    def url_for(self, ref: mf.JobRef, spec: SGDJobSpec) -> str:
        if self.coordinator_url is not None:
            return self.coordinator_url(ref, spec)
        return mf.coordinator_url(ref, spec, self.pod_settings.cluster_domain)


@dataclass
class JobRuntime:
    """In-memory state of one job (one uid) in this process: rebuilt from the cluster on
    restart, dropped when the job's daemon ends."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    spec: SGDJobSpec | None = None
    status: SGDJobStatus | None = None
    report: CoordinatorReport | None = None
    base_ready: bool = False
    failures: int = 0  # consecutive passes with a refused action (backoff)
    shown: str = ""  # the Blocked message last posted as an Event (post each new one once)


@dataclass(frozen=True)
class Pass:
    """What one reconcile pass tells the daemon loop."""

    finished: bool = False
    in_flight: bool = False
    retry_after: float | None = None  # set after a refused action: back off this long


class Blocked(Exception):
    """A child's name is held by an object this job does not own (e.g. a deleted job's
    ConfigMap the garbage collector has not removed yet): wait, never adopt it."""


@dataclass
class OperatorState:
    config: OperatorConfig
    # By job uid: a job deleted and created again under its name is another job, another run.
    jobs: dict[str, JobRuntime] = field(default_factory=dict)
    # (namespace, name) -> the uid of the job that has that name now; pod events wake it.
    names: dict[tuple[str, str], str] = field(default_factory=dict)
    client: KubeClient | None = None
    http: aiohttp.ClientSession | None = None

    def runtime(self, ref: mf.JobRef) -> JobRuntime:
        self.names[(ref.namespace, ref.name)] = ref.uid
        return self.jobs.setdefault(ref.uid, JobRuntime())

    def by_name(self, namespace: str, name: str) -> JobRuntime | None:
        uid = self.names.get((namespace, name))
        return self.jobs.get(uid) if uid is not None else None

    def forget(self, ref: mf.JobRef) -> None:
        """Drop a job's state when its daemon ends, however it ends."""
        self.jobs.pop(ref.uid, None)
        if self.names.get((ref.namespace, ref.name)) == ref.uid:
            del self.names[(ref.namespace, ref.name)]
        self.config.metrics.forget(ref.uid)

    def kube(self) -> KubeClient:
        if self.client is None:
            metrics = self.config.metrics

            def count() -> None:
                metrics.api_requests += 1

            self.client = KubeClient(self.config.credentials, on_request=count)
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


async def create_owned(
    client: KubeClient, ref: mf.JobRef, plural: str, body: Mapping[str, Any]
) -> bool:
    """Create a child; True if made now, False if this job already owns one of that name.

    Raises :class:`Blocked` when the name is held by an object of another owner (a deleted
    job's leftover the garbage collector has not removed yet, or a stranger's): it is never
    adopted.
    """
    if await client.create(ref.namespace, plural, body):
        return True
    name = str((body.get("metadata") or {}).get("name"))
    existing = await client.get(ref.namespace, plural, name)
    if existing is None:
        raise Blocked(f"{plural}/{name} was being deleted; creating it again on the next pass")
    if owned_by(existing, ref):
        return False
    owners = [
        f"{o.get('kind')}/{o.get('name')} (uid {o.get('uid')})"
        for o in (existing.get("metadata") or {}).get("ownerReferences") or []
    ]
    held = "owned by " + ", ".join(owners) if owners else "not owned by this job"
    raise Blocked(f"{plural}/{name} already exists, {held}; waiting for it to be removed")


async def ensure_base(
    client: KubeClient, ref: mf.JobRef, spec: SGDJobSpec, metrics: OperatorMetrics
) -> None:
    """ConfigMap, token Secret and Service, each owned by this job (uid checked)."""
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
        created = await create_owned(client, ref, plural, body)
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
                # A straggler still runs: it gets its grace period, and its replacement is
                # created only once the old pod is gone (a pod name is unique, so until then
                # the create below answers 409 and this pass is retried): never two copies of
                # one worker. A failed replica has exited already; nothing to wait for.
                grace = None if a.straggler else 0
                await client.delete(ref.namespace, "pods", name, grace_seconds=grace)
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
            if await create_owned(client, ref, "pods", body):
                created.append(name)
                metrics.children_created += 1
            else:
                pending = True  # our older attempt is still terminating; try again next pass
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
) -> Pass:
    """One pass: validate, make the base children, observe, decide, persist, act.

    An action the API server refuses (403, 422, a quota, ...) or a child name held by another
    owner does not end the job: the server's message goes into ``status.message``, a
    ``Blocked`` condition and one Event, and the pass is retried with exponential backoff.
    """
    client = state.kube()
    previous = runtime.status or load_status(body.get("status"))
    runtime.status = previous
    try:
        result = await _reconcile(state, ref, body, pods, runtime, previous)
    except (KubeError, Blocked) as err:
        await _show_blocked(client, ref, runtime, err)
        runtime.failures += 1
        delay = state.config.resync_seconds * 2 ** (runtime.failures - 1)
        return Pass(retry_after=min(delay, state.config.max_backoff_seconds))
    runtime.failures = 0
    runtime.shown = ""
    return result


async def _show_blocked(
    client: KubeClient, ref: mf.JobRef, runtime: JobRuntime, err: Exception
) -> None:
    if isinstance(err, KubeError):
        reason = "Forbidden" if err.status == 403 else "APIError"
        message = f"the API server refused to {err.action}: {err.status} {err.message}"
    else:
        reason, message = "WaitingForName", str(err)
    log.warning("%s/%s: %s", ref.namespace, ref.name, message)
    assert runtime.status is not None
    status = blocked_status(runtime.status, reason=reason, message=message, now=format_time(_now()))
    try:
        await write_status(client, ref, runtime, status)
    except KubeError as status_err:  # e.g. no right to write status either: the Event says it
        log.warning("%s/%s: could not write status: %s", ref.namespace, ref.name, status_err)
    if message != runtime.shown:
        await post_event(client, ref, warning=True, reason=reason, message=message)
        runtime.shown = message


async def _reconcile(
    state: OperatorState,
    ref: mf.JobRef,
    body: Mapping[str, Any],
    pods: list[Mapping[str, Any]],
    runtime: JobRuntime,
    previous: SGDJobStatus,
) -> Pass:
    client = state.kube()
    metrics = state.config.metrics
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
            metrics.set_phase(ref.uid, "Failed")
            return Pass(finished=True)
    spec = runtime.spec
    if previous.phase in TERMINAL:
        # Resumed after finishing (e.g. the operator restarted mid clean-up): clean up again,
        # idempotently; the caller then honours the TTL.
        metrics.set_phase(ref.uid, previous.phase)
        await clean_up(client, ref, spec, pods)
        return Pass(finished=True)
    if not runtime.base_ready:
        await ensure_base(client, ref, spec, metrics)
        runtime.base_ready = True
    replicas, by_name = observe_pods(pods, ref)
    report = with_final(runtime.report, final_message(by_name.get(replica_name("worker", 0))))
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
    metrics.set_phase(ref.uid, status.phase)
    if status.phase in TERMINAL:
        await finish(client, ref, spec, decision, pods)
        return Pass(finished=True)
    in_flight = await execute(client, state, ref, spec, decision)
    # Every action went through: a Blocked condition from an earlier pass is over.
    await write_status(client, ref, runtime, unblocked_status(status, now=format_time(now)))
    return Pass(in_flight=in_flight)


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
