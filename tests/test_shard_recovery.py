"""kill -9 of a parameter-server shard during `sgdjob run`: restored from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sgdjob.api.validation import parse_job
from sgdjob.launcher import LocalJob
from tests.conftest import job_doc
from tests.test_local_supervision import run_with

EVERY = 20


def kill_shard_run(tmp_path: Path, doc: dict[str, Any], *, shard: int, at: int) -> dict[str, Any]:
    seen: dict[str, int] = {}

    def kill(lj: LocalJob) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            s = lj.status()
            if s and s.get("step", 0) >= at:
                seen["before"] = int(s["step"])
                proc = lj.shards[shard].proc
                assert proc is not None
                os.kill(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    lj = LocalJob(parse_job(doc), output=tmp_path, progress=False)
    run_with(lj, kill)
    assert [name for name, _ in lj.restarted] == [f"ps-{shard}"]
    log = (tmp_path / "logs" / f"ps-{shard}.log").read_text()
    restored = [
        int(line.rsplit("restored version ", 1)[1].split()[0])
        for line in log.splitlines()
        if "restored version" in line
    ]
    assert len(restored) == 1
    # Steps lost: what the shard had applied when it died minus what it restored.
    assert seen["before"] - restored[0] <= EVERY
    return dict(json.loads((tmp_path / "summary.json").read_text()))


@pytest.mark.parametrize("shard", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_shard_killed_mid_run_is_restored_and_the_job_matches_a_clean_run(
    tmp_path: Path, run_job: Any, shard: int
) -> None:
    doc = job_doc(
        "shardkill",
        parameterServers={"shards": 2},
        workers={"replicas": 2},
        training={"maxSteps": 200},
        checkpoint={"every": EVERY},
    )
    clean, _ = run_job(doc, subdir="clean")
    summary = kill_shard_run(tmp_path / "killed", doc, shard=shard, at=70)
    assert summary["finalAccuracy"] >= clean["finalAccuracy"] - 0.01


# Slow (make test-slow): the plain shard-kill test covers the restore in make test.
@pytest.mark.slow
def test_with_the_workers_updates_a_killed_shard_holds_no_optimizer_state_and_is_restored(
    tmp_path: Path, run_job: Any
) -> None:
    # compression.send: updates: Adam's moments live on the workers, the shard's checkpoint
    # holds the parameters only, and the run goes on from them.
    doc = job_doc(
        "updkill",
        parameterServers={"shards": 2},
        workers={"replicas": 2},
        training={"maxSteps": 200, "optimizer": "adam", "lr": 0.005},
        compression={"kind": "onebit", "bucketSize": 64, "send": "updates"},
        checkpoint={"every": EVERY},
    )
    clean, _ = run_job(doc, subdir="clean")
    summary = kill_shard_run(tmp_path / "killed", doc, shard=1, at=70)
    print(clean["finalAccuracy"], summary["finalAccuracy"])
    assert summary["finalAccuracy"] >= clean["finalAccuracy"] - 0.03
    assert not summary["rejectedMessages"]


def test_without_checkpoints_a_lost_shard_fails_the_job(tmp_path: Path) -> None:
    from sgdjob.launcher import LaunchError

    doc = job_doc(
        "nockpt",
        parameterServers={"shards": 2},
        workers={"replicas": 1},
        training={"maxSteps": 100000},
        checkpoint={"every": None},
    )

    def kill(lj: LocalJob) -> None:
        time.sleep(2.0)
        proc = lj.shards[1].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)

    lj = LocalJob(parse_job(doc), output=tmp_path, progress=False)
    with pytest.raises(LaunchError, match=r"shard 1 failed .*checkpoints do not survive"):
        run_with(lj, kill)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_shard_kill_recovery_holds_over_ten_seeds(tmp_path: Path, run_job: Any, seed: int) -> None:
    doc = job_doc(
        f"seed{seed}",
        parameterServers={"shards": 2},
        workers={"replicas": 2},
        training={"maxSteps": 200, "seed": seed},
        checkpoint={"every": EVERY},
    )
    clean, _ = run_job(doc, subdir="clean")
    summary = kill_shard_run(tmp_path / "killed", doc, shard=seed % 2, at=40 + 7 * seed)
    assert summary["finalAccuracy"] >= clean["finalAccuracy"] - 0.01


def test_a_shard_lost_after_a_worker_finished_is_restored_and_the_job_still_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Worker 1 finishes and exits; then shard 1 dies. The restored shard must count worker 1
    # as done (its checkpoint and the executor both say so), or worker 0's final pull waits
    # for a worker that will never come back.
    monkeypatch.setenv("SGDJOB_COMM_TIMEOUT", "60")  # what "waits forever" looks like here
    doc = job_doc(
        "afterdone",
        parameterServers={"shards": 2},
        workers={"replicas": 2},
        training={"mode": "async", "maxSteps": 200},
        debug={"slowWorkers": {0: 30}},
        supervision={"straggler": {"maxReplacements": 0}},
        checkpoint={"every": EVERY},
    )

    def kill_after_worker_1(lj: LocalJob) -> None:
        deadline = time.monotonic() + 120
        while lj.workers[1].poll() != 0:
            assert time.monotonic() < deadline, "worker 1 never finished"
            time.sleep(0.05)
        assert lj.workers[0].poll() is None  # worker 0 is still training
        proc = lj.shards[1].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)

    lj = LocalJob(parse_job(doc), output=tmp_path, progress=False)
    run_with(lj, kill_after_worker_1)
    assert [name for name, _ in lj.restarted] == ["ps-1"]
    assert lj.shards[1].contract.done_workers == (1,)
    assert "restored version" in (tmp_path / "logs" / "ps-1.log").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["finalAccuracy"] > 0.8
