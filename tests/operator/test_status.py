"""The coordinator's /status parsed defensively, and the next status computed."""

from __future__ import annotations

from typing import Any

import pytest

from sgdjob.api.supervision import ReplicaSupervision, SupervisionStatus
from sgdjob.api.types import Condition, SGDJobStatus
from sgdjob.policy import Decision, Fail, SetCondition, Succeed
from sgdjob_operator.status import (
    load_status,
    next_status,
    parse_coordinator,
    set_condition,
    status_body,
    with_final,
)

GOOD = {
    "step": 7,
    "totalSteps": 100,
    "loss": 0.25,
    "accuracy": None,
    "samplesPerSecond": 10.5,
    "finished": False,
    "workers": {"0": {"step": 7, "stepTime": 0.1, "loss": 0.2}, "1": {"stepTime": None}},
}


def test_the_documented_status_document_is_parsed() -> None:
    r = parse_coordinator(GOOD)
    assert r is not None
    assert (r.step, r.total_steps, r.loss, r.accuracy, r.samples_per_second) == (
        7,
        100,
        0.25,
        None,
        10.5,
    )
    assert r.step_times == {0: 0.1, 1: None}
    assert r.progress().step == 7


@pytest.mark.parametrize(
    "doc",
    [None, [], "x", {}, {"step": "7"}, {"step": -1}, {"step": True}],
)
def test_a_document_without_a_valid_step_is_ignored(doc: Any) -> None:
    assert parse_coordinator(doc) is None


def test_garbage_fields_are_dropped_not_trusted() -> None:
    doc = {
        "step": 3,
        "loss": float("nan"),
        "totalSteps": "many",
        "workers": {"x": {}, "-1": {"stepTime": 1}, "2": {"stepTime": -5}, "3": "no"},
    }
    r = parse_coordinator(doc)
    assert r is not None
    assert r.loss is None and r.total_steps is None
    assert r.step_times == {2: None}


def test_a_condition_keeps_its_transition_time_until_its_status_changes() -> None:
    c = set_condition([], type_="Running", status="True", reason="r", message="", now="t1")
    c = set_condition(c, type_="Running", status="True", reason="r2", message="", now="t2")
    assert c[0].last_transition_time == "t1" and c[0].reason == "r2"
    c = set_condition(c, type_="Running", status="False", reason="r3", message="", now="t3")
    assert c[0].last_transition_time == "t3"


def decision(*actions: Any, phase: Any = "Running") -> Decision:
    counters = SupervisionStatus(
        replicas={
            "worker-0": ReplicaSupervision(restarts=2, replacements=1),
            "worker-1": ReplicaSupervision(),
        }
    )
    return Decision(actions=actions, counters=counters, phase=phase, message="m")


def test_the_next_status_carries_counters_progress_and_start_time() -> None:
    prev = SGDJobStatus(start_time="t0")
    report = parse_coordinator(GOOD)
    st = next_status(
        previous=prev,
        decision=decision(SetCondition("Running", "True", "AllReplicasRunning")),
        ready_shards=1,
        ready_workers=2,
        report=report,
        now="t1",
    )
    assert st.restarts == 2 and st.replica_restarts == {"worker-0": 2}
    assert st.replaced_stragglers == 1
    assert st.step == 7 and st.loss == 0.25 and st.samples_per_second == 10.5
    assert st.start_time == "t0" and st.completion_time is None
    assert (st.ready_shards, st.ready_workers) == (1, 2)
    body = status_body(st)
    assert body["supervision"]["replicas"]["worker-0"]["restarts"] == 2
    assert load_status(body) == st


@pytest.mark.parametrize(
    ("action", "kind"), [(Succeed("S", "ok"), "Succeeded"), (Fail("F", "no"), "Failed")]
)
def test_a_finished_job_gets_a_completion_time_and_its_condition(action: Any, kind: str) -> None:
    prev = SGDJobStatus(
        start_time="t0",
        conditions=[Condition(type="Running", status="True", last_transition_time="t0")],
    )
    st = next_status(
        previous=prev,
        decision=decision(action, phase=kind),
        ready_shards=0,
        ready_workers=0,
        report=None,
        now="t9",
    )
    assert st.phase == kind and st.completion_time == "t9"
    types = {c.type: c.status for c in st.conditions}
    assert types == {"Running": "False", kind: "True"}


def test_restarting_goes_back_to_false_once_nothing_restarts() -> None:
    prev = SGDJobStatus(conditions=[Condition(type="Restarting", status="True")])
    st = next_status(
        previous=prev, decision=decision(), ready_shards=0, ready_workers=0, report=None, now="t"
    )
    assert st.conditions[0].status == "False"


def test_a_garbled_status_loads_as_a_fresh_one_and_foreign_keys_are_ignored() -> None:
    assert load_status({"phase": "Exploded"}) == SGDJobStatus()
    assert load_status({"kopf": {"progress": {}}, "step": 3}).step == 3


def test_the_final_message_corrects_a_last_poll_taken_before_the_end() -> None:
    polled = parse_coordinator({**GOOD, "step": 279, "totalSteps": 300})
    final = {
        "step": 300,
        "finished": True,
        "metric": "accuracy",
        "metricValue": 0.97,
        "accuracy": 0.97,
    }
    merged = with_final(polled, final)
    assert merged is not None and polled is not None
    assert (merged.step, merged.accuracy, merged.metric_value) == (300, 0.97, 0.97)
    assert merged.finished
    assert (merged.loss, merged.total_steps) == (polled.loss, 300)  # kept from the poll
    assert with_final(None, final) == parse_coordinator(final)


def test_a_job_that_ends_before_any_poll_shows_the_final_messages_loss() -> None:
    final = {
        "step": 300,
        "totalSteps": 300,
        "finished": True,
        "metric": "accuracy",
        "accuracy": 0.97,
        "loss": 0.05,
    }
    alone = with_final(None, final)
    assert alone is not None and (alone.loss, alone.accuracy, alone.total_steps) == (
        0.05,
        0.97,
        300,
    )
    polled_early = parse_coordinator({"step": 0})
    merged = with_final(polled_early, final)
    assert merged is not None and (merged.loss, merged.total_steps) == (0.05, 300)
    # A poll's own loss (the mean over workers) is kept.
    polled = parse_coordinator({**GOOD, "step": 279})
    merged = with_final(polled, final)
    assert merged is not None and polled is not None and merged.loss == polled.loss


@pytest.mark.parametrize("final", [None, {"step": 300}, {"finished": True}, "garbage"])
def test_anything_but_a_finished_report_leaves_the_last_poll_alone(final: Any) -> None:
    polled = parse_coordinator(GOOD)
    assert with_final(polled, final) is polled
