"""Pods to observed replicas: phases, exit codes, reasons, attempts, ownership."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sgdjob.tasks import Evaluation
from sgdjob.worker import final_message as worker_final_message
from sgdjob_operator.manifests import JobRef
from sgdjob_operator.observe import (
    final_message,
    format_time,
    observe_pod,
    observe_pods,
    parse_time,
)
from sgdjob_operator.status import parse_coordinator

REF = JobRef(name="j", namespace="ns", uid="u1")


def pod(status: dict[str, Any], **meta: Any) -> dict[str, Any]:
    labels = {
        "sgdjob.dev/job": "j",
        "sgdjob.dev/role": "worker",
        "sgdjob.dev/index": "3",
        "sgdjob.dev/attempt": "2",
    }
    return {
        "metadata": {
            "name": "j-worker-3",
            "namespace": "ns",
            "labels": labels,
            "ownerReferences": [{"kind": "SGDJob", "uid": "u1"}],
            "creationTimestamp": "2026-01-01T00:00:00Z",
            **meta,
        },
        "spec": {"nodeName": "n1"},
        "status": status,
    }


def trainer(state: dict[str, Any]) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "trainer", "state": state}]}


@pytest.mark.parametrize(
    ("status", "phase", "code", "reason"),
    [
        ({}, "Pending", None, ""),
        ({"phase": "Running"}, "Running", None, ""),
        (
            {
                "phase": "Failed",
                **trainer({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
            },
            "Failed",
            137,
            "OOMKilled",
        ),
        ({"phase": "Failed", "reason": "Evicted"}, "Failed", None, "Evicted"),
        ({"phase": "Unknown"}, "Failed", None, ""),
        (
            {"phase": "Pending", **trainer({"waiting": {"reason": "ImagePullBackOff"}})},
            "Pending",
            None,
            "ImagePullBackOff",
        ),
        (
            {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                ],
            },
            "Pending",
            None,
            "Unschedulable",
        ),
        ({"phase": "Succeeded", **trainer({"terminated": {"exitCode": 0}})}, "Succeeded", 0, ""),
    ],
)
def test_a_pod_becomes_an_observed_replica(
    status: dict[str, Any], phase: str, code: int | None, reason: str
) -> None:
    r = observe_pod(pod(status))
    assert r is not None
    assert (r.role, r.index, r.attempt, r.node) == ("worker", 3, 2, "n1")
    assert (r.phase, r.exit_code, r.reason) == (phase, code, reason)
    assert r.pending_since == parse_time("2026-01-01T00:00:00Z")


def test_a_terminated_trainer_says_when_it_finished_and_a_running_one_does_not() -> None:
    done = {"terminated": {"exitCode": 0, "finishedAt": "2026-01-01T00:05:00Z"}}
    r = observe_pod(pod({"phase": "Succeeded", **trainer(done)}))
    assert r is not None and r.finished_at == parse_time("2026-01-01T00:05:00Z")
    # A restarted container's old termination (lastState) is not this one's end.
    restarted = {"containerStatuses": [{"name": "trainer", "state": {"running": {}},
                                        "lastState": done}]}  # fmt: skip
    r = observe_pod(pod({"phase": "Running", **restarted}))
    assert r is not None and r.finished_at is None
    r = observe_pod(pod({"phase": "Failed", "reason": "Evicted"}))  # no container status
    assert r is not None and r.finished_at is None


def test_a_pod_being_deleted_is_terminating() -> None:
    r = observe_pod(pod({"phase": "Running"}, deletionTimestamp="2026-01-01T00:00:01Z"))
    assert r is not None and r.phase == "Terminating"


def test_pods_of_other_jobs_or_owners_are_ignored_even_if_the_server_returned_them() -> None:
    mine = pod({"phase": "Running"})
    other_owner = pod({}, ownerReferences=[{"kind": "SGDJob", "uid": "someone-else"}])
    other_job = pod({})
    other_job["metadata"]["labels"] = {**other_job["metadata"]["labels"], "sgdjob.dev/job": "k"}
    bad_index = pod({})
    bad_index["metadata"]["labels"] = {**bad_index["metadata"]["labels"], "sgdjob.dev/index": "x"}
    replicas, by_name = observe_pods([mine, other_owner, other_job, bad_index], REF)
    assert [r.name for r in replicas] == ["worker-3"] and list(by_name) == ["worker-3"]


def test_times_round_trip_in_kubernetes_format() -> None:
    assert format_time(parse_time("2026-03-04T05:06:07Z") or 0) == "2026-03-04T05:06:07Z"
    assert parse_time("garbage") is None and parse_time(None) is None


def terminated(code: int, message: str | None) -> dict[str, Any]:
    state: dict[str, Any] = {"exitCode": code}
    if message is not None:
        state["message"] = message
    return {"containerStatuses": [{"name": "trainer", "state": {"terminated": state}}]}


def test_worker_0s_termination_message_reads_back_as_a_finished_coordinator_report() -> None:
    ev = Evaluation(loss=0.125, metric=0.96875)
    text = worker_final_message(version=300, total_steps=300, metric="accuracy", ev=ev, loss=0.0625)
    doc = final_message(pod(terminated(0, text)))
    report = parse_coordinator(doc)
    assert report is not None and report.finished
    assert (report.step, report.accuracy, report.metric) == (300, 0.96875, "accuracy")
    # The training loss, not the held-out one: a job no poll saw still shows its loss.
    assert (report.loss, report.total_steps) == (0.0625, 300)


def test_a_non_finite_metric_becomes_null_so_the_message_stays_json() -> None:
    text = worker_final_message(
        version=3,
        total_steps=3,
        metric="rmse",
        ev=Evaluation(loss=float("nan"), metric=float("inf")),
        loss=float("nan"),
    )
    doc = json.loads(text)
    assert doc["metricValue"] is None and doc["loss"] is None and "NaN" not in text
    no_step = worker_final_message(
        version=0, total_steps=0, metric="rmse", ev=Evaluation(1.0, 1.0), loss=None
    )
    assert json.loads(no_step)["loss"] is None


@pytest.mark.parametrize(
    "status",
    [
        terminated(1, '{"step": 3, "finished": true}'),  # a failed container's word is not final
        terminated(0, None),
        terminated(0, "killed by the OOM killer, cut sho"),
        {"phase": "Running"},
    ],
)
def test_only_a_succeeded_containers_json_counts_as_its_final_message(status: Any) -> None:
    assert final_message(pod(status)) is None
