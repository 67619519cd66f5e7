"""Shared bench helpers: a job runner and a one-shard server process (tables: bench.report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def job(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "sgdjob.dev/v1alpha1",
        "kind": "SGDJob",
        "metadata": {"name": name},
        "spec": spec,
    }


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
) -> Iterator[str]:
    """One shard (index 0 of a 1-shard job) in its own process; yields its endpoint."""
    from sgdjob.api.validation import parse_job, spec_to_json
    from sgdjob.contract import ProcessContract

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
