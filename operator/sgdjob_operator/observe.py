"""Turning the pods the API server lists into the policy's observed replicas (pure).

A pod becomes an :class:`sgdjob.policy.ObservedReplica` with its role, index and attempt from
its labels, its phase (``Terminating`` once it has a deletionTimestamp), the trainer
container's exit code, the most telling reason (OOMKilled, Evicted, ImagePullBackOff,
Unschedulable, ...), its node, when it was created (the start of Pending) and when its
container terminated.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from typing import Any

from sgdjob.policy import ObservedReplica, Phase, Role
from sgdjob_operator.manifests import (
    CONTAINER,
    LABEL_ATTEMPT,
    LABEL_INDEX,
    LABEL_ROLE,
    JobRef,
    owned_by,
)

_PHASES: dict[str, Phase] = {
    "Pending": "Pending",
    "Running": "Running",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
    # The kubelet lost contact with the pod: treat as failed, the policy retries it.
    "Unknown": "Failed",
}


def parse_time(value: str | None) -> float | None:
    """RFC 3339 (as the API server writes it) to seconds since the epoch."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def format_time(seconds: float) -> str:
    """Seconds since the epoch to RFC 3339 UTC with a Z, as Kubernetes writes times."""
    dt = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _container_status(status: Mapping[str, Any]) -> Mapping[str, Any]:
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            return dict(cs)
    return {}


def _exit_and_reason(status: Mapping[str, Any]) -> tuple[int | None, str]:
    cs = _container_status(status)
    state = cs.get("state") or {}
    terminated = state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
    if terminated:
        code = terminated.get("exitCode")
        return (int(code) if code is not None else None), str(terminated.get("reason") or "")
    waiting = state.get("waiting") or {}
    if waiting.get("reason"):
        return None, str(waiting["reason"])
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return None, str(cond.get("reason") or "Unschedulable")
    # Pod-level reasons: Evicted, Preempted, NodeLost, Shutdown.
    return None, str(status.get("reason") or "")


def final_message(pod: Mapping[str, Any] | None) -> Any:
    """The JSON a succeeded trainer container left as its termination message, or None."""
    if not pod:
        return None
    cs = _container_status(pod.get("status") or {})
    terminated = (cs.get("state") or {}).get("terminated") or {}
    message = terminated.get("message")
    if terminated.get("exitCode") != 0 or not isinstance(message, str) or not message:
        return None
    try:
        return json.loads(message)
    except ValueError:
        return None  # not ours (or cut short): status keeps the last poll


def observe_pod(pod: Mapping[str, Any]) -> ObservedReplica | None:
    """One pod as the policy sees it; None if its labels do not name a replica."""
    meta = pod.get("metadata") or {}
    lab = meta.get("labels") or {}
    role = lab.get(LABEL_ROLE)
    if role not in ("ps", "worker"):
        return None
    try:
        index = int(lab.get(LABEL_INDEX, ""))
        attempt = int(lab.get(LABEL_ATTEMPT, "0"))
    except ValueError:
        return None
    status = pod.get("status") or {}
    phase: Phase = _PHASES.get(str(status.get("phase") or "Pending"), "Pending")
    if meta.get("deletionTimestamp"):
        phase = "Terminating"
    exit_code, reason = _exit_and_reason(status)
    typed_role: Role = "ps" if role == "ps" else "worker"
    return ObservedReplica(
        role=typed_role,
        index=index,
        phase=phase,
        attempt=attempt,
        exit_code=exit_code,
        reason=reason,
        node=(pod.get("spec") or {}).get("nodeName") or None,
        pending_since=parse_time(meta.get("creationTimestamp")),
        finished_at=_finished_at(status) if phase in ("Succeeded", "Failed") else None,
    )


def _finished_at(status: Mapping[str, Any]) -> float | None:
    """When the trainer container terminated (``state.terminated.finishedAt``), if it did."""
    terminated = (_container_status(status).get("state") or {}).get("terminated") or {}
    return parse_time(terminated.get("finishedAt"))


def is_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    conds = status.get("conditions") or []
    ready = [c for c in conds if c.get("type") == "Ready"]
    # No Ready condition reported (a minimal API server): Running counts as ready.
    return not ready or ready[0].get("status") == "True"


def observe_pods(
    pods: Iterable[Mapping[str, Any]], ref: JobRef
) -> tuple[list[ObservedReplica], dict[str, Mapping[str, Any]]]:
    """This job's replicas (owner and labels checked here) and their pods by replica name."""
    replicas: list[ObservedReplica] = []
    by_name: dict[str, Mapping[str, Any]] = {}
    for pod in pods:
        if not owned_by(pod, ref):
            continue
        rep = observe_pod(pod)
        if rep is None:
            continue
        replicas.append(rep)
        by_name[rep.name] = pod
    return replicas, by_name
