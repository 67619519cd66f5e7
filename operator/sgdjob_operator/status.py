"""The SGDJob status, computed (pure): from the previous status, a policy decision, the ready
replicas and the coordinator's last report to the next :class:`SGDJobStatus`.

Also parses the coordinator's ``/status`` JSON (an untrusted document: every field is checked,
a malformed one is ignored rather than trusted) into progress numbers and per-worker step times.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sgdjob.api.supervision import SupervisionStatus
from sgdjob.api.types import Condition, SGDJobStatus
from sgdjob.policy import Decision, Fail, Progress, SetCondition, Succeed

ConditionType = Literal["Created", "Running", "Restarting", "Succeeded", "Failed", "Blocked"]


@dataclass(frozen=True)
class CoordinatorReport:
    """What shard 0's /status said, checked."""

    step: int
    total_steps: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    metric: str | None = None  # the task's held-out metric by name (accuracy, rmse, ...)
    metric_value: float | None = None
    samples_per_second: float | None = None
    finished: bool = False
    step_times: Mapping[int, float | None] = field(default_factory=dict)
    restored_from: int | None = None  # the checkpoint version shard 0 restarted from

    def progress(self) -> Progress:
        return Progress(step=self.step, step_times=self.step_times)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value >= 0 else None


def _name(value: Any) -> str | None:
    """A metric name as the coordinator sends it: a short identifier, else nothing."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.isidentifier():
        return value
    return None


def parse_coordinator(doc: Any) -> CoordinatorReport | None:
    """The coordinator's /status JSON, or None when it is not the documented shape."""
    if not isinstance(doc, Mapping):
        return None
    step = _int(doc.get("step"))
    if step is None:
        return None
    times: dict[int, float | None] = {}
    workers = doc.get("workers")
    if isinstance(workers, Mapping):
        for key, w in workers.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                continue
            if index < 0 or not isinstance(w, Mapping):
                continue
            t = _num(w.get("stepTime"))
            times[index] = t if t is not None and t >= 0 else None
    return CoordinatorReport(
        step=step,
        total_steps=_int(doc.get("totalSteps")),
        loss=_num(doc.get("loss")),
        accuracy=_num(doc.get("accuracy")),
        metric=_name(doc.get("metric")),
        metric_value=_num(doc.get("metricValue")),
        samples_per_second=_num(doc.get("samplesPerSecond")),
        finished=doc.get("finished") is True,
        step_times=times,
        restored_from=_int(doc.get("restoredFrom")),
    )


def set_condition(
    conditions: Sequence[Condition],
    *,
    type_: ConditionType,
    status: Literal["True", "False"],
    reason: str,
    message: str,
    now: str,
) -> list[Condition]:
    """Conditions with one set; lastTransitionTime changes only when its status does."""
    out: list[Condition] = []
    found = False
    for c in conditions:
        if c.type != type_:
            out.append(c)
            continue
        found = True
        when = c.last_transition_time if c.status == status else now
        out.append(
            Condition(
                type=type_, status=status, reason=reason, message=message, last_transition_time=when
            )
        )
    if not found:
        out.append(
            Condition(
                type=type_, status=status, reason=reason, message=message, last_transition_time=now
            )
        )
    return out


def _counter_fields(counters: SupervisionStatus) -> dict[str, Any]:
    per = {name: r.restarts for name, r in sorted(counters.replicas.items()) if r.restarts}
    return {
        "supervision": counters,
        "replica_restarts": per,
        "restarts": sum(per.values()),
        "replaced_stragglers": sum(r.replacements for r in counters.replicas.values()),
    }


def with_final(report: CoordinatorReport | None, final: Any) -> CoordinatorReport | None:
    """The last poll of the coordinator, corrected by worker 0's final message (the same
    shape): the coordinator may exit between the last poll and the end of training. The loss
    stays the poll's (the mean over workers); the message's own (worker 0's last) fills in
    only when no poll saw one, as when a job ends before the first poll."""
    last = parse_coordinator(final)
    if last is None or not last.finished:
        return report
    if report is None:
        return last
    return replace(
        report,
        step=max(report.step, last.step),
        total_steps=report.total_steps if report.total_steps is not None else last.total_steps,
        loss=report.loss if report.loss is not None else last.loss,
        accuracy=last.accuracy,
        metric=last.metric or report.metric,
        metric_value=last.metric_value,
        finished=True,
    )


def _progress_fields(report: CoordinatorReport | None) -> dict[str, Any]:
    if report is None:
        return {}
    return {
        "step": report.step,
        "total_steps": report.total_steps,
        "loss": report.loss,
        "accuracy": report.accuracy,
        "metric": report.metric,
        "metric_value": report.metric_value,
        "samples_per_second": report.samples_per_second,
        **({"restored_version": report.restored_from} if report.restored_from is not None else {}),
    }


def next_status(
    *,
    previous: SGDJobStatus,
    decision: Decision,
    ready_shards: int,
    ready_workers: int,
    report: CoordinatorReport | None,
    now: str,
    generation: int | None = None,
) -> SGDJobStatus:
    """The status after one reconcile pass."""
    conditions = list(previous.conditions)
    for a in decision.actions:
        if isinstance(a, SetCondition):
            conditions = set_condition(
                conditions,
                type_=a.type,
                status=a.status,
                reason=a.reason,
                message=a.message,
                now=now,
            )
    restarting_now = any(
        isinstance(a, SetCondition) and a.type == "Restarting" for a in decision.actions
    )
    was_restarting = any(c.type == "Restarting" and c.status == "True" for c in conditions)
    if was_restarting and not restarting_now:
        conditions = set_condition(
            conditions, type_="Restarting", status="False", reason="Recovered", message="", now=now
        )
    update: dict[str, Any] = {
        "phase": decision.phase,
        "message": decision.message,
        "ready_shards": ready_shards,
        "ready_workers": ready_workers,
        "start_time": previous.start_time or now,
        "observed_generation": generation,
        **_counter_fields(decision.counters),
        **_progress_fields(report),
    }
    for a in decision.actions:
        if isinstance(a, (Succeed, Fail)):
            kind: ConditionType = "Succeeded" if isinstance(a, Succeed) else "Failed"
            conditions = set_condition(
                conditions, type_=kind, status="True", reason=a.reason, message=a.message, now=now
            )
            conditions = set_condition(
                conditions, type_="Running", status="False", reason=a.reason, message="", now=now
            )
            update["completion_time"] = now
    update["conditions"] = conditions
    return previous.model_copy(update=update)


def failed_status(
    previous: SGDJobStatus, *, reason: str, message: str, now: str, generation: int | None = None
) -> SGDJobStatus:
    """A job that fails before anything was created (e.g. an invalid spec)."""
    conditions = set_condition(
        previous.conditions, type_="Failed", status="True", reason=reason, message=message, now=now
    )
    return previous.model_copy(
        update={
            "phase": "Failed",
            "message": message,
            "conditions": conditions,
            "completion_time": now,
            "observed_generation": generation,
        }
    )


def blocked_status(previous: SGDJobStatus, *, reason: str, message: str, now: str) -> SGDJobStatus:
    """An action the API server refused, or a name held by another object: shown, not fatal.

    The phase stays; the ``Blocked`` condition and ``message`` carry the server's words until
    a pass goes through (:func:`unblocked_status`).
    """
    conditions = set_condition(
        previous.conditions, type_="Blocked", status="True", reason=reason, message=message, now=now
    )
    return previous.model_copy(update={"message": message, "conditions": conditions})


def unblocked_status(previous: SGDJobStatus, *, now: str) -> SGDJobStatus:
    """Clear a ``Blocked`` condition after a pass whose every action went through."""
    if not any(c.type == "Blocked" and c.status == "True" for c in previous.conditions):
        return previous
    conditions = set_condition(
        previous.conditions,
        type_="Blocked",
        status="False",
        reason="Unblocked",
        message="",
        now=now,
    )
    return previous.model_copy(update={"conditions": conditions})


def status_body(status: SGDJobStatus) -> dict[str, Any]:
    """The JSON to merge-patch into `status` (camelCase; explicit nulls clear old values)."""
    return status.model_dump(mode="json", by_alias=True)


def load_status(raw: Mapping[str, Any] | None) -> SGDJobStatus:
    """The persisted status; a field someone else garbled resets that status, not the operator."""
    if not raw:
        return SGDJobStatus()
    known = {k: v for k, v in raw.items() if k in _ALIASES}
    try:
        return SGDJobStatus.model_validate(known)
    except ValueError:
        return SGDJobStatus()


_ALIASES = {f.alias or name for name, f in SGDJobStatus.model_fields.items()}
