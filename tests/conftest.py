"""Shared helpers: build SGDJob documents and run them with the real local executor."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

# Tests run several trainer processes on 2 cores: one thread each keeps them honest.
os.environ.setdefault("OMP_NUM_THREADS", "1")

BASE_JOB: dict[str, Any] = {
    "apiVersion": "sgdjob.dev/v1alpha1",
    "kind": "SGDJob",
    "metadata": {"name": "t"},
    "spec": {
        "model": {"builtin": "mlp", "hidden": [32]},
        "data": {"builtin": "digits"},
        "training": {
            "mode": "sync",
            "maxSteps": 60,
            "batchSize": 32,
            "lr": 0.05,
            "momentum": 0.9,
            "seed": 0,
            "evalInterval": 20,
        },
        "parameterServers": {"shards": 1},
        "workers": {"replicas": 1},
    },
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def job_doc(name: str = "t", **spec: Any) -> dict[str, Any]:
    """A valid SGDJob document with ``spec`` sections merged over a small digits job."""
    return merge(BASE_JOB, {"metadata": {"name": name}, "spec": spec})


@pytest.fixture
def run_job(tmp_path: Path) -> Any:
    """Run a job document through the local executor; returns (summary, output dir)."""
    from sgdjob.api.validation import parse_job
    from sgdjob.launcher import run_local

    def run(doc: dict[str, Any], *, subdir: str = "out") -> tuple[dict[str, Any], Path]:
        job = parse_job(doc)
        out = tmp_path / subdir
        return run_local(job, output=out, progress=False), out

    return run
