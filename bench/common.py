"""Shared bench helpers: a job runner, a one-shard server process, the ~10M-parameter MLP
workload shared by the throughput benches, and the steady-state samples/s of a finished job
read from its ``metrics.jsonl`` (tables: bench.report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def job(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "sgdjob.dev/v1alpha1",
        "kind": "SGDJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def mlp_workload(
    *, hidden: int, layers: int, batch: int, steps: int, workers: int, shards: int
) -> dict[str, Any]:
    """Spec of a sync job training the same MLP as ``bench.ddp`` (``layers`` hidden x hidden
    blocks and a 10-class head) on the teacher task with ``inputDim == hidden``: at 1024 x 10
    that is 10,506,250 parameters, exactly ``bench.ddp.mlp_params(1024, 10)``.

    Plain SGD (no momentum, no weight decay) like the DDP baseline; evaluation only at step 0
    (the test set is small), so the timed steps do no extra work on worker 0.
    """
    return {
        "model": {"builtin": "mlp", "hidden": [hidden] * layers},
        "data": {
            "builtin": "teacher",
            "teacher": {
                "inputDim": hidden,
                "classes": 10,
                "trainSamples": max(1024, 2 * workers * batch),
                "testSamples": 256,
            },
        },
        "training": {
            "mode": "sync",
            "maxSteps": steps,
            "batchSize": batch,
            "lr": 0.01,
            "momentum": 0.0,
            "evalInterval": 10**6,
        },
        "workers": {"replicas": workers},
        "parameterServers": {"shards": shards},
    }


@dataclass(frozen=True)
class SteadyRate:
    """Throughput over the parameter versions ``first`` .. ``last`` of a sync job."""

    first: int
    last: int
    seconds: float
    samples_per_s: float

    @property
    def step_ms(self) -> float:
        return 1e3 * self.seconds / (self.last - self.first)


def steady_rate(out: Path, *, warmup: int, workers: int, batch: int) -> SteadyRate:
    """Samples/s of the sync steps after the first ``warmup``, from shard 0's metrics.jsonl.

    Shard 0 writes a ``train`` line (with seconds since it started) right after the parameter
    version changes; in sync mode version v means steps 0..v-1 are closed. The window runs
    from the first line at version >= ``warmup`` to the first at the final version, i.e. the
    same "time ``steps - warmup`` whole steps after ``warmup`` untimed ones" that
    ``bench.ddp`` measures, excluding process start-up, hello, the final evaluation and the
    model write that the coordinator's whole-run ``samplesPerSecond`` includes.
    """
    first_seen: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            first_seen.setdefault(int(rec["version"]), float(rec["time"]))
    last = max(first_seen, default=0)
    starts = [v for v in first_seen if v >= warmup]
    if not starts or last - min(starts) < 1:
        raise RuntimeError(f"{out}/metrics.jsonl has no versions past warm-up {warmup}")
    first = min(starts)
    seconds = first_seen[last] - first_seen[first]
    return SteadyRate(
        first=first,
        last=last,
        seconds=seconds,
        samples_per_s=workers * batch * (last - first) / max(seconds, 1e-9),
    )


def run_job(doc: dict[str, Any], out: Path) -> dict[str, Any]:
    from sgdjob.api.validation import parse_job
    from sgdjob.launcher import run_local

    return run_local(parse_job(doc), output=out, progress=False)


@contextmanager
def shard_process(
    doc: dict[str, Any],
    workdir: Path,
    *,
    token: str = "bench",
    netns: str | None = None,
    bind_host: str = "127.0.0.1",
    keys: Any = None,
) -> Iterator[str]:
    """One shard (index 0 of a 1-shard job) in its own process; yields its endpoint.

    ``keys`` (a ``sgdjob.curvekeys.JobKeys``) is required when the spec keeps CURVE on.
    """
    from sgdjob.api.validation import parse_job, spec_to_json
    from sgdjob.contract import ProcessContract, with_curve

    spec = parse_job(doc).spec
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(spec_to_json(spec))
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    c = ProcessContract(
        role="ps",
        index=0,
        job_name=doc["metadata"]["name"],
        spec_path=str(workdir / "spec.json"),
        token=token,
        output_dir=str(workdir),
        bind=f"tcp://{bind_host}:0",
        ready_file=str(ready),
    )
    if keys is not None:
        c = with_curve(c, keys.__dict__)
    cmd = [sys.executable, "-m", "sgdjob", "trainer"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **c.to_env(), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("bench shard did not start")
            time.sleep(0.05)
        yield str(json.loads(ready.read_text())["endpoint"])
    finally:
        proc.kill()
        proc.wait()
