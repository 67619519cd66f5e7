"""The supervision policy as tables: (observed replicas, counters, progress) -> actions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgdjob.api.supervision import ReplicaSupervision, SupervisionStatus
from sgdjob.api.validation import validate_spec
from sgdjob.policy import (
    SHARDS_FINISHED_GRACE_S,
    Create,
    Decision,
    Delete,
    Fail,
    ObservedReplica,
    Progress,
    Recreate,
    SetCondition,
    Succeed,
    cleanup_targets,
    decide,
)

NOW = 1_000_000.0


def spec(workers: int = 2, shards: int = 1, **supervision: Any) -> Any:
    return validate_spec(
        {
            "model": {"builtin": "mlp"},
            "data": {"builtin": "digits"},
            "training": {"maxSteps": 100},
            "parameterServers": {"shards": shards},
            "workers": {"replicas": workers},
            "supervision": supervision,
        }
    )


def running(role: str, index: int, **kw: Any) -> ObservedReplica:
    return ObservedReplica(role=role, index=index, phase="Running", **kw)  # type: ignore[arg-type]


def all_running(workers: int = 2, shards: int = 1) -> list[ObservedReplica]:
    return [running("ps", k) for k in range(shards)] + [
        running("worker", i, node=f"node-{i}") for i in range(workers)
    ]


def seen(workers: int = 2, shards: int = 1, **worker_state: Any) -> SupervisionStatus:
    reps = {f"ps-{k}": ReplicaSupervision(seen=True) for k in range(shards)}
    for i in range(workers):
        reps[f"worker-{i}"] = ReplicaSupervision(seen=True, **worker_state)
    return SupervisionStatus(replicas=reps)


def run(
    observed: list[ObservedReplica],
    counters: SupervisionStatus | None = None,
    progress: Progress | None = None,
    **spec_kw: Any,
) -> Decision:
    return decide(
        spec=spec(**spec_kw),
        replicas=observed,
        counters=counters or SupervisionStatus(),
        progress=progress,
        now=NOW,
        start_time=NOW - 10,
    )


def kinds(d: Decision) -> list[str]:
    return [type(a).__name__ for a in d.actions if not isinstance(a, SetCondition)]


def test_a_new_job_creates_every_shard_and_worker_including_backup_workers() -> None:
    d = decide(
        spec=validate_spec(
            {
                "model": {"builtin": "mlp"},
                "data": {"builtin": "digits"},
                "training": {"maxSteps": 10, "backupWorkers": 1},
                "parameterServers": {"shards": 2},
                "workers": {"replicas": 3},
            }
        ),
        replicas=[],
        counters=SupervisionStatus(),
        progress=None,
        now=NOW,
        start_time=None,
    )
    creates = [(a.role, a.index, a.attempt) for a in d.actions if isinstance(a, Create)]
    assert creates == [("ps", 0, 0), ("ps", 1, 0)] + [("worker", i, 0) for i in range(4)]
    assert d.phase == "Pending"


def test_all_replicas_running_is_a_running_job_with_nothing_to_do() -> None:
    d = run(all_running(), seen())
    assert kinds(d) == []
    assert d.phase == "Running"
    assert SetCondition("Running", "True", "AllReplicasRunning") in d.actions


@pytest.mark.parametrize(
    ("exit_code", "reason", "restarts_so_far", "max_restarts", "expected"),
    [
        (137, "", 0, 3, "Recreate"),  # SIGKILL: retryable
        (143, "", 2, 3, "Recreate"),  # last restart within budget
        (137, "OOMKilled", 3, 3, "Fail"),  # budget exhausted exactly at the edge
        (None, "Evicted", 0, 3, "Recreate"),
        (137, "", 0, 0, "Fail"),  # no restarts allowed at all
        (1, "Error", 0, 3, "Fail"),  # permanent: fail at once, budget or not
        (2, "Error", 0, 3, "Fail"),
        (3, "Error", 0, 3, "Recreate"),  # a peer stopped answering: retryable
        (3, "Error", 3, 3, "Fail"),  # ... within the budget only
        (None, "", 0, 1, "Recreate"),  # failed without an exit code: node lost
    ],
)
def test_a_failed_worker_is_recreated_while_its_budget_lasts(
    exit_code: int | None, reason: str, restarts_so_far: int, max_restarts: int, expected: str
) -> None:
    observed = all_running()
    observed[2] = ObservedReplica(
        role="worker",
        index=1,
        phase="Failed",
        attempt=restarts_so_far,
        exit_code=exit_code,
        reason=reason,
        node="n",
    )
    counters = seen()
    counters.replicas["worker-1"] = ReplicaSupervision(
        seen=True, restarts=restarts_so_far, attempt=restarts_so_far
    )
    d = run(observed, counters, maxRestarts=max_restarts)
    assert kinds(d) == [expected]
    if expected == "Recreate":
        (a,) = [a for a in d.actions if isinstance(a, Recreate)]
        assert (a.role, a.index, a.attempt) == ("worker", 1, restarts_so_far + 1)
        assert d.counters.replicas["worker-1"].restarts == restarts_so_far + 1
        assert not d.counters.replicas["worker-1"].seen
        assert SetCondition("Restarting", "True", "ReplicaRestarted", "worker-1") in d.actions
    else:
        assert d.phase == "Failed"
        assert "worker 1" in d.message


def test_the_restart_budget_is_per_replica_not_per_job() -> None:
    counters = seen()
    counters.replicas["worker-0"] = ReplicaSupervision(seen=True, restarts=1, attempt=1)
    observed = all_running()
    observed[1] = running("worker", 0, attempt=1)
    observed[2] = ObservedReplica(role="worker", index=1, phase="Failed", exit_code=137)
    d = run(observed, counters, maxRestarts=1)
    assert kinds(d) == ["Recreate"]


def test_a_failed_shard_fails_the_job_with_a_clear_message() -> None:
    observed = all_running()
    observed[0] = ObservedReplica(role="ps", index=0, phase="Failed", exit_code=137)
    d = run(observed, seen())
    assert kinds(d) == ["Fail"]
    assert "shard 0" in d.message and "checkpoints" in d.message


@pytest.mark.parametrize(
    ("exit_code", "restarts", "max_restarts", "expected"),
    [
        (137, 0, 3, ["Recreate"]),  # killed: restored from its checkpoint
        (137, 3, 3, ["Fail"]),  # the shard's own budget is spent
        (1, 0, 3, ["Fail"]),  # its own error: permanent, not retried
        (3, 0, 3, ["Recreate"]),  # no worker came for too long: retryable
    ],
)
def test_a_failed_shard_with_surviving_checkpoints_is_restarted_within_its_budget(
    exit_code: int, restarts: int, max_restarts: int, expected: list[str]
) -> None:
    observed = all_running()
    observed[0] = ObservedReplica(role="ps", index=0, phase="Failed", exit_code=exit_code)
    counters = seen()
    counters.replicas["ps-0"] = ReplicaSupervision(seen=True, restarts=restarts)
    d = decide(
        spec=spec(maxRestarts=max_restarts),
        replicas=observed,
        counters=counters,
        progress=None,
        now=NOW,
        start_time=NOW - 10,
        shards_recoverable=True,
    )
    assert [k for k in kinds(d) if k in ("Recreate", "Fail")] == expected
    if expected == ["Recreate"]:
        assert d.counters.replicas["ps-0"].restarts == restarts + 1


@pytest.mark.parametrize(("role", "expected"), [("worker", ["Recreate"]), ("ps", ["Fail"])])
def test_a_replica_that_vanished_after_being_seen_counts_as_deleted(
    role: str, expected: list[str]
) -> None:
    observed = [r for r in all_running() if not (r.role == role and r.index == 0)]
    d = run(observed, seen())
    assert kinds(d) == expected


def test_a_replica_never_seen_is_created_without_counting_a_restart() -> None:
    observed = all_running()[:-1]
    counters = seen()
    counters.replicas["worker-1"] = ReplicaSupervision(seen=False, attempt=2, restarts=2)
    d = run(observed, counters)
    assert [a for a in d.actions if isinstance(a, Create)] == [Create("worker", 1, 2)]
    assert d.counters.replicas["worker-1"].restarts == 2


def test_a_leftover_of_an_older_attempt_is_deleted_and_not_counted() -> None:
    counters = seen()
    counters.replicas["worker-1"] = ReplicaSupervision(seen=False, attempt=1, restarts=1)
    observed = all_running()
    observed[2] = ObservedReplica(role="worker", index=1, phase="Failed", attempt=0, exit_code=137)
    d = run(observed, counters)
    assert kinds(d) == ["Delete"]
    assert d.counters.replicas["worker-1"].restarts == 1
    observed[2] = ObservedReplica(role="worker", index=1, phase="Terminating", attempt=0)
    assert kinds(run(observed, counters)) == []


def test_a_replica_newer_than_the_counters_is_adopted_not_duplicated() -> None:
    observed = all_running()
    observed[2] = running("worker", 1, attempt=2)
    d = run(observed, seen())
    assert kinds(d) == []
    assert d.counters.replicas["worker-1"].attempt == 2


def test_all_workers_succeeded_succeeds_the_job() -> None:
    observed = [running("ps", 0)] + [
        ObservedReplica(role="worker", index=i, phase="Succeeded", exit_code=0) for i in range(2)
    ]
    d = run(observed, seen())
    assert d.actions == (Succeed("AllWorkersSucceeded", "all 2 workers succeeded"),)
    assert d.phase == "Succeeded"


def done_shard(index: int = 0, *, ago: float, attempt: int = 0) -> ObservedReplica:
    return ObservedReplica(
        role="ps",
        index=index,
        phase="Succeeded",
        exit_code=0,
        attempt=attempt,
        finished_at=NOW - ago,
    )


def test_all_shards_finished_succeeds_the_job_past_a_replacement_with_nothing_left_to_train() -> (
    None
):
    # The convergence bench hung so: worker 1 was replaced as a straggler just as it had
    # finished; the shards had every worker's "done", exited 0, and the replacement waited
    # for their welcome forever.
    counters = seen(attempt=0)
    counters.replicas["worker-1"] = ReplicaSupervision(seen=True, attempt=1, replacements=1)
    observed = [
        done_shard(ago=SHARDS_FINISHED_GRACE_S),
        ObservedReplica(role="worker", index=0, phase="Succeeded", exit_code=0),
        running("worker", 1, attempt=1),
    ]
    d = run(observed, counters)
    message = "all 1 parameter-server shards finished 30s ago: every worker said it was done; "
    assert d.actions == (Succeed("ShardsFinished", message + "stopping worker-1, still running"),)
    assert d.phase == "Succeeded"
    # A replacement that failed there is not restarted either: the training is over.
    observed[2] = ObservedReplica(role="worker", index=1, phase="Failed", attempt=1, exit_code=137)
    assert kinds(run(observed, counters)) == ["Succeed"]


def test_workers_get_a_grace_to_exit_on_their_own_after_the_shards_finished() -> None:
    # Worker 0 writes its termination message (the final result) after shard 0 exited, and
    # a kubelet may report the shard's exit before the worker's.
    observed = [done_shard(ago=SHARDS_FINISHED_GRACE_S - 1), *all_running()[1:]]
    assert not any(isinstance(a, Succeed) for a in run(observed, seen()).actions)
    observed[0] = ObservedReplica(role="ps", index=0, phase="Succeeded", exit_code=0)
    assert not any(isinstance(a, Succeed) for a in run(observed, seen()).actions)  # when: unknown


def test_shards_that_finished_while_workers_succeed_end_the_job_the_usual_way() -> None:
    observed = [done_shard(ago=3600.0)] + [
        ObservedReplica(role="worker", index=i, phase="Succeeded", exit_code=0) for i in range(2)
    ]
    assert run(observed, seen()).actions == (
        Succeed("AllWorkersSucceeded", "all 2 workers succeeded"),
    )


@pytest.mark.parametrize(
    "shard",
    [
        ObservedReplica(role="ps", index=1, phase="Running"),
        ObservedReplica(role="ps", index=1, phase="Failed", exit_code=143, finished_at=NOW - 60),
        done_shard(1, ago=60.0, attempt=0),
    ],
    ids=["one shard still running", "one shard stopped by SIGTERM", "a stale shard attempt"],
)
def test_the_job_is_not_finished_by_its_shards_unless_every_current_one_succeeded(
    shard: ObservedReplica,
) -> None:
    counters = seen(shards=2)
    counters.replicas["ps-1"] = ReplicaSupervision(
        seen=True, attempt=1 if shard.phase == "Succeeded" else 0
    )
    observed = [done_shard(ago=60.0), shard, running("worker", 0), running("worker", 1)]
    d = decide(
        spec=spec(shards=2),
        replicas=observed,
        counters=counters,
        progress=None,
        now=NOW,
        start_time=NOW,
        shards_recoverable=True,
    )
    assert not any(isinstance(a, Succeed) for a in d.actions)


def test_one_worker_succeeded_is_not_yet_success() -> None:
    observed = all_running()
    observed[1] = ObservedReplica(role="worker", index=0, phase="Succeeded", exit_code=0)
    assert run(observed, seen()).phase == "Running"


@pytest.mark.parametrize(
    ("pending_for", "deadline", "failed"),
    [(59.0, 60, False), (61.0, 60, True), (10_000.0, None, False)],
)
def test_pending_past_the_deadline_fails_naming_the_reason(
    pending_for: float, deadline: int | None, failed: bool
) -> None:
    observed = all_running()
    observed[2] = ObservedReplica(
        role="worker",
        index=1,
        phase="Pending",
        reason="ImagePullBackOff",
        pending_since=NOW - pending_for,
    )
    d = run(observed, seen(), preRunningDeadlineSeconds=deadline)
    assert (d.phase == "Failed") is failed
    if failed:
        assert "worker-1" in d.message and "ImagePullBackOff" in d.message


@pytest.mark.parametrize(("elapsed", "failed"), [(99.0, False), (101.0, True)])
def test_the_active_deadline_fails_the_job(elapsed: float, failed: bool) -> None:
    d = decide(
        spec=spec(activeDeadlineSeconds=100),
        replicas=all_running(),
        counters=seen(),
        progress=None,
        now=NOW,
        start_time=NOW - elapsed,
    )
    assert (kinds(d) == ["Fail"]) is failed


def slow_progress(step: int, slow_time: float = 1.0) -> Progress:
    return Progress(step=step, step_times={0: 0.1, 1: slow_time, 2: 0.1})


@pytest.mark.parametrize(
    ("slow_windows_before", "replacements_before", "slow_time", "expected"),
    [
        (2, 0, 1.0, ["Recreate"]),  # third slow window: replace
        (1, 0, 1.0, []),  # only the second
        (2, 1, 1.0, []),  # replacement budget exhausted
        (2, 0, 0.29, []),  # 2.9x the median is not slow with k = 3
    ],
)
def test_a_straggler_is_replaced_after_w_slow_windows_within_its_budget(
    slow_windows_before: int, replacements_before: int, slow_time: float, expected: list[str]
) -> None:
    counters = seen(workers=3)
    counters.replicas["worker-1"] = ReplicaSupervision(
        seen=True, slow_windows=slow_windows_before, replacements=replacements_before
    )
    counters = counters.model_copy(update={"last_window": 10})
    d = run(all_running(workers=3), counters, slow_progress(11, slow_time), workers=3)
    assert kinds(d) == expected
    if expected:
        (a,) = [a for a in d.actions if isinstance(a, Recreate)]
        assert a.straggler and a.avoid_nodes == ("node-1",) and a.attempt == 1
        assert d.counters.replicas["worker-1"].replacements == replacements_before + 1
        assert d.counters.replicas["worker-1"].restarts == 0


def test_a_worker_a_few_milliseconds_behind_a_tiny_median_is_no_straggler() -> None:
    # 3 ms against a 0.6 ms median is 5x, but only 2.4 ms behind: under the 10 ms floor.
    counters = seen(workers=3, slow_windows=2).model_copy(update={"last_window": 10})
    tiny = Progress(step=11, step_times={0: 0.0006, 1: 0.003, 2: 0.0006})
    assert kinds(run(all_running(workers=3), counters, tiny, workers=3)) == []
    assert (
        run(all_running(workers=3), counters, tiny, workers=3)
        .counters.replicas["worker-1"]
        .slow_windows
        == 0
    )
    # With the floor off, k x median alone decides, as before the floor existed.
    d = run(all_running(workers=3), counters, tiny, workers=3, straggler={"minLagSeconds": 0})
    assert kinds(d) == ["Recreate"]


def test_the_same_coordinator_window_is_counted_once() -> None:
    counters = seen(workers=3).model_copy(update={"last_window": 11})
    d = run(all_running(workers=3), counters, slow_progress(11), workers=3)
    assert d.counters.replicas["worker-1"].slow_windows == 0
    d = run(all_running(workers=3), counters, slow_progress(12), workers=3)
    assert d.counters.replicas["worker-1"].slow_windows == 1
    assert d.counters.last_window == 12


def test_a_fast_window_resets_the_slow_count() -> None:
    counters = seen(workers=3, slow_windows=2)
    d = run(all_running(workers=3), counters, slow_progress(5, slow_time=0.1), workers=3)
    assert all(r.slow_windows == 0 for r in d.counters.replicas.values())


def test_a_recreated_straggler_keeps_avoiding_its_old_node() -> None:
    counters = seen()
    counters.replicas["worker-1"] = ReplicaSupervision(
        seen=False, attempt=1, replacements=1, avoid_nodes=["node-1"]
    )
    d = run(all_running()[:-1], counters)
    assert Create("worker", 1, 1, ("node-1",)) in d.actions


def test_clean_up_targets_follow_the_clean_pod_policy() -> None:
    reps = [
        running("ps", 0),
        ObservedReplica(role="worker", index=0, phase="Succeeded"),
        ObservedReplica(role="worker", index=1, phase="Pending"),
    ]
    assert [r.name for r in cleanup_targets("Running", reps)] == ["ps-0", "worker-1"]
    assert len(cleanup_targets("All", reps)) == 3
    assert cleanup_targets("None", reps) == []


def test_the_policy_module_does_no_io_and_imports_no_torch_or_zmq() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sgdjob.policy; "
        "bad = [m for m in ('torch', 'zmq', 'aiohttp', 'kopf') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_delete_action_is_used_for_leftovers_only() -> None:
    d = run(all_running(), seen())
    assert not any(isinstance(a, (Delete, Fail)) for a in d.actions)


PHASES = ["Pending", "Running", "Succeeded", "Failed", "Terminating", None]


@given(
    phases=st.lists(st.sampled_from(PHASES), min_size=4, max_size=4),
    codes=st.lists(st.one_of(st.none(), st.integers(-15, 255)), min_size=4, max_size=4),
    restarts=st.lists(st.integers(0, 4), min_size=4, max_size=4),
    attempts=st.lists(st.integers(0, 3), min_size=4, max_size=4),
    seen_flags=st.lists(st.booleans(), min_size=4, max_size=4),
    step_times=st.lists(st.floats(0.01, 5.0), min_size=3, max_size=3),
    max_restarts=st.integers(0, 3),
)
@settings(max_examples=300, deadline=None)
def test_any_observation_yields_a_consistent_decision(
    phases: list[str | None],
    codes: list[int | None],
    restarts: list[int],
    attempts: list[int],
    seen_flags: list[bool],
    step_times: list[float],
    max_restarts: int,
) -> None:
    names = [("ps", 0), ("worker", 0), ("worker", 1), ("worker", 2)]
    observed = [
        ObservedReplica(role=role, index=i, phase=phase, attempt=a, exit_code=c, node="n")  # type: ignore[arg-type]
        for (role, i), phase, a, c in zip(names, phases, attempts, codes, strict=True)
        if phase is not None
    ]
    counters = SupervisionStatus(
        replicas={
            f"{role}-{i}": ReplicaSupervision(attempt=a, restarts=min(r, a), seen=s)
            for (role, i), r, a, s in zip(names, restarts, attempts, seen_flags, strict=True)
        },
        last_window=0,
    )
    d = decide(
        spec=spec(workers=3, maxRestarts=max_restarts),
        replicas=observed,
        counters=counters,
        progress=Progress(step=1, step_times=dict(enumerate(step_times))),
        now=NOW,
        start_time=NOW,
    )
    replica_actions = [a for a in d.actions if isinstance(a, (Create, Recreate, Delete))]
    touched = [(a.role, a.index) for a in replica_actions]
    assert len(touched) == len(set(touched)), "one action per replica at most"
    if any(isinstance(a, (Fail, Succeed)) for a in d.actions):
        assert len(d.actions) == 1 and d.phase in ("Failed", "Succeeded")
    for name, old in counters.replicas.items():
        new = d.counters.replicas[name]
        assert new.attempt >= old.attempt and new.restarts >= old.restarts
        assert new.restarts <= max(old.restarts, max_restarts), "the budget is never exceeded"
    for a in replica_actions:
        if isinstance(a, (Create, Recreate)):
            assert a.attempt == d.counters.replicas[f"{a.role}-{a.index}"].attempt
