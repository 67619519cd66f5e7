"""Run one sgdjob job as bare trainer processes, shards in one netns and workers in another.

The local executor (``sgdjob run``) puts every process on 127.0.0.1; to send the gradients
over a shaped link (``bench.netns``) the shards must bind the address of one end of the veth
and the workers must connect to it from the other end. ``run_split_job`` does exactly what
an executor does, through the same ``ProcessContract``: it writes the validated spec, starts
``python -m sgdjob trainer`` for every shard (``ip netns exec <shard_ns>``, binding
``tcp://<shard_host>:0``, shard 0 also serving /status on ``<shard_host>:0``), waits for their
ready files, starts the workers (``ip netns exec <worker_ns>``) with the shards' endpoints,
and waits for every process to exit 0. Shard 0 writes ``summary.json`` and ``metrics.jsonl``
into ``out`` as in any run. With both namespaces None and ``127.0.0.1`` it is a plain loopback
job without the supervision loop.

Every process it started is killed (its own process group) and reaped on the way out, also
on failure or timeout. No restarts: a benchmark run that loses a process is a failed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.netns import in_netns

_REPO_ROOT = Path(__file__).resolve().parent.parent


class SplitJobError(RuntimeError):
    """A process failed or the job ran past its time limit; the message names the process."""


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _env(contract_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # Children run `-m sgdjob`: make the checkout importable even when it is not installed.
    paths = (str(_REPO_ROOT / "trainer"), str(_REPO_ROOT), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(contract_env)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_split_job(
    doc: dict[str, Any],
    out: Path,
    *,
    shard_ns: str | None = None,
    worker_ns: str | None = None,
    shard_host: str = "127.0.0.1",
    timeout_s: float = 240.0,
) -> dict[str, Any]:
    """Run the job to completion; returns shard 0's summary.json (raises SplitJobError)."""
    from sgdjob.api.validation import parse_job, spec_to_json
    from sgdjob.contract import ProcessContract, with_curve
    from sgdjob.curvekeys import JobKeys

    job = parse_job(doc)
    spec = job.spec
    state = out / ".sgdjob"
    logs = out / "logs"
    state.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    for stale in [*state.glob("ready-*.json"), out / "summary.json", out / "metrics.jsonl"]:
        stale.unlink(missing_ok=True)
    spec_path = state / "spec.json"
    spec_path.write_text(spec_to_json(spec), encoding="utf-8")
    token = secrets.token_hex(16)
    # The same per-job CURVE keys `sgdjob run` would make (spec.security.curve, on by default).
    keys = JobKeys.generate().__dict__ if spec.security.curve else None
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(name: str, ns: str | None, contract: ProcessContract) -> None:
        if keys is not None:
            contract = with_curve(contract, keys)
        log_path = logs / f"{name}.log"
        with log_path.open("wb") as logf:
            proc = subprocess.Popen(
                in_netns(ns, [sys.executable, "-m", "sgdjob", "trainer"]),
                env=_env(contract.to_env()),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: killed as a unit on the way out
            )
        procs.append((name, proc, log_path))

    def check_alive(name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        code = proc.poll()
        if code not in (None, 0):
            raise SplitJobError(f"{name} exited {code}; log {log_path}\n{_tail(log_path)}")

    deadline = time.monotonic() + timeout_s
    try:
        ready_files = []
        for k in range(spec.parameter_servers.shards):
            ready = state / f"ready-{k}.json"
            ready_files.append(ready)
            contract = ProcessContract(
                role="ps",
                index=k,
                job_name=job.metadata.name,
                spec_path=str(spec_path),
                token=token,
                output_dir=str(out),
                bind=f"tcp://{shard_host}:0",
                status_bind=f"{shard_host}:0" if k == 0 else "",
                ready_file=str(ready),
            )
            start(f"ps-{k}", shard_ns, contract)
        endpoints = []
        for ready, (name, proc, log_path) in zip(ready_files, procs, strict=True):
            while not ready.exists():
                check_alive(name, proc, log_path)
                if proc.poll() == 0 or time.monotonic() > deadline:
                    raise SplitJobError(f"{name} never wrote {ready}\n{_tail(log_path)}")
                time.sleep(0.05)
            endpoints.append(str(json.loads(ready.read_text(encoding="utf-8"))["endpoint"]))
        for i in range(spec.workers.replicas + spec.training.backup_workers):
            contract = ProcessContract(
                role="worker",
                index=i,
                job_name=job.metadata.name,
                spec_path=str(spec_path),
                token=token,
                output_dir=str(out),
                shard_addrs=tuple(endpoints),
            )
            start(f"worker-{i}", worker_ns, contract)
        # Workers first (they end the job), then the shards (they exit after the summary).
        order = sorted(procs, key=lambda p: not p[0].startswith("worker"))
        for name, proc, log_path in order:
            while proc.poll() is None:
                for other in procs:
                    check_alive(*other)
                if time.monotonic() > deadline:
                    raise SplitJobError(f"{name} still running after {timeout_s:.0f}s")
                time.sleep(0.05)
            check_alive(name, proc, log_path)
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group of a child we started
            proc.wait()
    summary = out / "summary.json"
    if not summary.exists():
        raise SplitJobError(f"the job ended without {summary}")
    return dict(json.loads(summary.read_text(encoding="utf-8")))
