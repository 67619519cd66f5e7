"""Run identity through `sgdjob run` as a user meets it: run twice, interrupt, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sgdjob.api.validation import parse_job
from sgdjob.runs import RunError, choose_resume, list_runs
from tests.conftest import job_doc

STEPS = 60


def small_job(name: str = "twice", **spec: Any) -> dict[str, Any]:
    over: dict[str, Any] = {
        "parameterServers": {"shards": 2},
        "workers": {"replicas": 2},
        "training": {"maxSteps": STEPS, "evalInterval": 20},
        "checkpoint": {"every": 20},
    }
    for k, v in spec.items():
        over[k] = {**over.get(k, {}), **v}
    return job_doc(name, **over)


def sgdjob_run(
    tmp_path: Path, *args: str, timeout: float = 300
) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "sgdjob", "run", "job.yaml", "--no-progress", *args],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    return res, time.monotonic() - t0


def write_job(tmp_path: Path, doc: dict[str, Any]) -> None:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))


def test_running_a_job_twice_in_one_output_directory_trains_twice_from_step_zero(
    tmp_path: Path,
) -> None:
    write_job(tmp_path, small_job())
    first, first_s = sgdjob_run(tmp_path)
    assert first.returncode == 0, first.stderr
    second, second_s = sgdjob_run(tmp_path)
    assert second.returncode == 0, second.stderr
    runs = list_runs(tmp_path / "runs", "twice")
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
    assert [r.state for r in runs] == ["succeeded", "succeeded"]
    # `latest` names the newest run; runs/<name>/latest/model.pt is where a user looks.
    latest = tmp_path / "runs" / "twice" / "latest"
    assert latest.resolve() == runs[1].path.resolve()
    summaries = []
    for run, elapsed in zip(runs, (first_s, second_s), strict=True):
        summary = json.loads((run.path / "summary.json").read_text())
        summaries.append(summary)
        assert summary["version"] == STEPS
        assert summary["samples"] == STEPS * 32 * 2  # every step trained in this run
        assert summary["wallTimeSeconds"] <= elapsed  # its own wall time, not the first run's
        for k in (0, 1):
            assert "restored" not in (run.path / "logs" / f"ps-{k}.log").read_text()
        evals = [
            json.loads(x)
            for x in (run.path / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "eval"
        ]
        assert [e["step"] for e in evals][:1] == [0]
    # A fixed-seed sync run is reproducible bit for bit: the second run trained the same
    # model from scratch rather than restoring the first one's final state.
    assert summaries[0]["finalAccuracy"] == summaries[1]["finalAccuracy"]
    m0, m1 = (torch.load(r.path / "model.pt") for r in runs)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)


def wait_for_checkpoints(
    run_root: Path, shards: int, *, files: int = 1, timeout: float = 120.0
) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in run_root.glob("*/checkpoints"):
            if not run.parent.is_symlink() and all(
                len(list((run / f"shard-{k}").glob("ckpt-*"))) >= files for k in range(shards)
            ):
                return run.parent
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of every shard under {run_root}")


def interrupted_run(
    tmp_path: Path, doc: dict[str, Any], sig: int = signal.SIGTERM, *, files: int = 1
) -> Path:
    """Start `sgdjob run`, stop the launcher with ``sig`` once every shard checkpointed."""
    write_job(tmp_path, doc)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgdjob", "run", "job.yaml", "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run = wait_for_checkpoints(
            tmp_path / "runs" / doc["metadata"]["name"], shards=2, files=files
        )
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert f"--resume {run.name}" in err
    return run


def test_resume_continues_an_interrupted_run_from_its_checkpoints(tmp_path: Path) -> None:
    doc = small_job("resumable", training={"maxSteps": 400}, checkpoint={"every": 10})
    run = interrupted_run(tmp_path, doc)
    assert json.loads((run / "run.json").read_text())["state"] == "interrupted"
    # How the run is supervised is not part of its identity: it may change on resume.
    doc["spec"]["supervision"] = {"maxRestarts": 5}
    write_job(tmp_path, doc)
    res, _ = sgdjob_run(tmp_path, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"run {run.name}" in res.stderr  # the same run, not a new one
    assert [r.run_id for r in list_runs(tmp_path / "runs", "resumable")] == [run.name]
    assert json.loads((run / "run.json").read_text())["state"] == "succeeded"
    for k in (0, 1):
        restored = [x for x in _read(run / "logs" / f"ps-{k}.log").splitlines() if "restored" in x]
        assert restored, f"shard {k} did not restore its checkpoint"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["version"] == 400
    assert summary["finalAccuracy"] > 0.9


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_resume_refuses_a_run_of_another_spec_naming_the_field(tmp_path: Path) -> None:
    doc = small_job("changed", training={"maxSteps": 100000}, checkpoint={"every": 10})
    run = interrupted_run(tmp_path, doc, signal.SIGHUP)
    doc["spec"]["training"]["lr"] = 0.01
    write_job(tmp_path, doc)
    res, _ = sgdjob_run(tmp_path, "--resume", run.name)
    assert res.returncode == 2
    assert "different spec" in res.stderr and "spec.training.lr: 0.05 -> 0.01" in res.stderr
    assert json.loads((run / "run.json").read_text())["state"] == "interrupted"  # untouched


def test_resume_with_nothing_to_resume_says_so_and_starts_nothing(tmp_path: Path) -> None:
    write_job(tmp_path, small_job("fresh"))
    res, _ = sgdjob_run(tmp_path, "--resume")
    assert res.returncode == 2
    assert "no interrupted or failed run of job fresh" in res.stderr
    res, _ = sgdjob_run(tmp_path, "--resume", "20990101-000000-abcdef")
    assert res.returncode == 2 and "no run 20990101-000000-abcdef" in res.stderr
    assert list_runs(tmp_path / "runs", "fresh") == []


def test_a_succeeded_run_is_not_resumed(tmp_path: Path) -> None:
    from sgdjob.runs import write_record

    job = parse_job(small_job("done"))
    run = tmp_path / "done" / "r1"
    (run / "checkpoints" / "shard-0").mkdir(parents=True)
    write_record(run, run_id="r1", job="done", spec=job.spec, state="succeeded")
    with pytest.raises(RunError, match="already succeeded"):
        choose_resume(tmp_path, "done", job.spec, "r1", shards=2)
    with pytest.raises(RunError, match="no interrupted or failed run"):
        choose_resume(tmp_path, "done", job.spec, None, shards=2)


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_every_child_stops_when_the_launcher_is_stopped_or_killed(tmp_path: Path, sig: int) -> None:
    write_job(tmp_path, small_job("stopme", training={"maxSteps": 100000}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgdjob", "run", "job.yaml", "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(children) < 4:  # 2 shards + 2 workers
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
            children = _children(proc.pid)
        time.sleep(1.0)
        children = _children(proc.pid)
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while any(_alive(c) for c in children):
            assert time.monotonic() < deadline, "children outlived the launcher"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in children | _children(proc.pid):
            if _alive(c):
                os.kill(c, signal.SIGKILL)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)


def test_a_resumed_run_whose_shards_saved_different_versions_replays_from_the_oldest(
    tmp_path: Path,
) -> None:
    # Interrupted between two shards' saves: shard 1's newest checkpoint is older than shard
    # 0's. The workers resume at the oldest version, and shard 0 drops the steps it closed.
    doc = small_job("skewed", training={"maxSteps": 400}, checkpoint={"every": 10, "keep": 3})
    run = interrupted_run(tmp_path, doc, files=3)

    def saved(k: int) -> list[tuple[int, Path]]:
        files = (run / "checkpoints" / f"shard-{k}").glob("ckpt-*.sgdckpt")
        return sorted((int(p.name.split("-")[1].split(".")[0]), p) for p in files)

    newest0 = saved(0)[-1][0]
    for version, path in saved(1):  # shard 1's sync versions are within a step of shard 0's
        if version >= newest0:
            path.unlink()
    assert saved(1), "shard 1 must keep an older checkpoint"
    res, _ = sgdjob_run(tmp_path, "--resume", run.name)
    assert res.returncode == 0, res.stderr
    versions = [
        int(line.rsplit("restored version ", 1)[1].split()[0])
        for k in (0, 1)
        for line in _read(run / "logs" / f"ps-{k}.log").splitlines()
        if "restored version" in line
    ]
    assert len(versions) == 2 and versions[0] > versions[1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["version"] == 400 and summary["finalAccuracy"] > 0.9
