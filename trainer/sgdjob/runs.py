"""Run identity and the local run directories: which run an output or a checkpoint belongs to.

A *run* is one execution of a job. Its id is ``SGDJOB_RUN_ID`` (``ProcessContract.run_id``):
the SGDJob's uid on Kubernetes, a fresh sortable id per ``sgdjob run`` locally (or the resumed
run's id with ``--resume``). Its *spec hash* is the SHA-256 of the canonical JSON of what
decides the trained numbers (``TRAINED_SECTIONS``): model, data, training, compression, the
shard count and the worker count. How a run is executed (``supervision``, ``kubernetes``,
``checkpoint``, ``output``, ``debug``, ``security``, threads, ports) is not part of it, so a
resumed run may change those.

Every executor gives each run its own directory (the contract's ``output_dir``); locally::

    <root>/<job>/<run-id>/      model.pt, summary.json, metrics.jsonl, curves.png, logs/,
                                checkpoints/, run.json (this module's record), .sgdjob/
    <root>/<job>/latest         symlink to the newest run started

``<root>`` is ``--output``, else ``spec.output.directory``, else ``runs``. ``run.json`` holds
the run id, the job name, the spec hash and the state (``running``, ``succeeded``,
``failed``, ``interrupted``); a launcher holds an ``flock`` on ``.sgdjob/lock`` while it runs,
so a run whose launcher died (state still ``running``, lock free) is known to be interrupted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sgdjob.api.types import SGDJobSpec
from sgdjob.output import atomic_write_json

RECORD = "run.json"
LATEST = "latest"
TRAINED_SECTIONS = ("model", "data", "training", "compression")


class RunError(ValueError):
    """A run cannot be resumed (or found); the message says why and what to do."""


def new_run_id() -> str:
    """A fresh local run id; ids of one job sort by start time (UTC, then random)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def trained_spec(spec: SGDJobSpec) -> dict[str, Any]:
    """The part of a spec that decides the trained parameters (camelCase, JSON-ready)."""
    raw = spec.model_dump(mode="json", by_alias=True)
    out = {k: raw[k] for k in TRAINED_SECTIONS}
    out["parameterServers"] = {"shards": spec.parameter_servers.shards}
    out["workers"] = {"replicas": spec.workers.replicas}
    return out


def spec_hash(spec: SGDJobSpec) -> str:
    canonical = json.dumps(trained_spec(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def spec_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "spec") -> list[str]:
    """Dotted paths where two ``trained_spec`` dicts differ, e.g. ``spec.training.lr``."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(spec_differences(a, b, f"{prefix}.{key}"))
        elif a != b:
            out.append(f"{prefix}.{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


@dataclass(frozen=True)
class RunRecord:
    """What ``run.json`` says about one run directory."""

    path: Path
    run_id: str
    job: str
    spec_hash: str
    state: str
    trained: dict[str, Any]

    @property
    def live(self) -> bool:
        """True while a launcher holds the run's lock."""
        return lock_holder(self.path) is not None


def job_dir(root: Path, job: str) -> Path:
    return root / job


def read_record(path: Path) -> RunRecord | None:
    try:
        raw = json.loads((path / RECORD).read_text(encoding="utf-8"))
        return RunRecord(
            path=path,
            run_id=str(raw["runId"]),
            job=str(raw["job"]),
            spec_hash=str(raw["specHash"]),
            state=str(raw["state"]),
            trained=dict(raw.get("trainedSpec") or {}),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(path: Path, *, run_id: str, job: str, spec: SGDJobSpec, state: str) -> None:
    atomic_write_json(
        path / RECORD,
        {
            "runId": run_id,
            "job": job,
            "specHash": spec_hash(spec),
            "trainedSpec": trained_spec(spec),
            "state": state,
            "updated": time.time(),
        },
    )


def list_runs(root: Path, job: str) -> list[RunRecord]:
    """Every run of ``job`` under ``root`` with a readable record, oldest first."""
    d = job_dir(root, job)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_symlink() or not p.is_dir():
            continue
        rec = read_record(p)
        if rec is not None and rec.job == job:
            found.append(rec)
    return sorted(found, key=lambda r: r.run_id)


def point_latest(root: Path, job: str, run_id: str) -> None:
    """Make ``<root>/<job>/latest`` name ``run_id`` (atomically: a new link renamed over)."""
    d = job_dir(root, job)
    tmp = d / f".{LATEST}.{secrets.token_hex(4)}"
    os.symlink(run_id, tmp)
    os.replace(tmp, d / LATEST)


def choose_resume(
    root: Path, job: str, spec: SGDJobSpec, run_id: str | None, *, shards: int
) -> RunRecord:
    """The run ``--resume [RUN_ID]`` continues, or RunError saying why there is none.

    Without ``run_id``: the newest run of the job that did not succeed and is not running.
    The run must have been started from the same trained spec (``spec_hash``) and hold a
    checkpoint of every shard.
    """
    where = job_dir(root, job)
    runs = list_runs(root, job)
    names = ", ".join(r.run_id for r in runs) or "none"
    if run_id is not None:
        chosen = next((r for r in runs if r.run_id == run_id), None)
        if chosen is None:
            raise RunError(f"no run {run_id} of job {job} in {where} (runs there: {names})")
        if chosen.live:
            raise RunError(f"run {run_id} is still running (its launcher holds {where})")
        if chosen.state == "succeeded":
            raise RunError(f"run {run_id} already succeeded; nothing to resume")
    else:
        candidates = [r for r in runs if r.state != "succeeded" and not r.live]
        if not candidates:
            raise RunError(
                f"no interrupted or failed run of job {job} to resume in {where} "
                f"(runs there: {names}); run without --resume to start a new one"
            )
        chosen = candidates[-1]
    if chosen.spec_hash != spec_hash(spec):
        diffs = spec_differences(chosen.trained, trained_spec(spec))
        raise RunError(
            f"run {chosen.run_id} was started from a different spec, so its checkpoints do "
            f"not fit this one: {'; '.join(diffs) or 'spec hash differs'}. Run without "
            "--resume to start a new run"
        )
    missing = [
        k
        for k in range(shards)
        if not any((chosen.path / "checkpoints" / f"shard-{k}").glob("ckpt-*.sgdckpt"))
    ]
    if missing:
        raise RunError(
            f"run {chosen.run_id} has no checkpoint of shard {', '.join(map(str, missing))} "
            "(it stopped before its first checkpoint, or checkpoint.every is unset); "
            "run without --resume to start a new run"
        )
    return chosen


def lock_path(run: Path) -> Path:
    return run / ".sgdjob" / "lock"


def lock_holder(run: Path) -> str | None:
    """The pid that holds ``run``'s lock, or None when no launcher runs it."""
    path = lock_path(run)
    if not path.exists():
        return None
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            return fh.read().strip() or "?"
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


class RunLock:
    """An exclusive ``flock`` on a run directory for as long as one launcher runs it."""

    def __init__(self, run: Path) -> None:
        self.path = lock_path(run)
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunError(f"{self.path.parent.parent} is being run by another launcher") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
