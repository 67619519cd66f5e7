"""The local executor: `sgdjob run JOB.yaml` runs a whole job as processes on 127.0.0.1.

Starts S shard processes (each binds a free port and reports it through a ready file), then
the workers with the shards' addresses: the same ``ProcessContract`` a pod gets. It polls
the coordinator's /status for a live progress line, stops every child on Ctrl-C, SIGTERM,
SIGHUP or failure (and the kernel kills them if the launcher itself dies: ``sgdjob.signals``),
and names the replica and the reason when it fails. ``output`` is this run's directory
(``sgdjob.runs`` lays them out): child output goes to its ``logs/``, and ``run.json`` records
the run id, spec hash and state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from sgdjob.api.supervision import SupervisionStatus
from sgdjob.api.types import SGDJob
from sgdjob.api.validation import spec_to_json
from sgdjob.contract import EXIT_MEANINGS, ProcessContract, Role, with_curve
from sgdjob.curvekeys import JobKeys
from sgdjob.gpus import GPUError, assign_gpus, visible_gpus
from sgdjob.policy import (
    Create,
    Delete,
    Fail,
    ObservedReplica,
    Phase,
    Progress,
    Recreate,
    Succeed,
    decide,
    replica_name,
)
from sgdjob.runs import RunLock, new_run_id, write_record
from sgdjob.signals import die_with_parent_preexec, stop_signals, stop_signals_ignored

log = logging.getLogger("sgdjob.launcher")

SHARD_EXIT_TIMEOUT_S = 120.0  # after the workers: the shards only write the summary and exit


class LaunchError(RuntimeError):
    """The job failed; the message names the replica and the reason."""


@dataclass
class Replica:
    """One child process and what the executor knows about it."""

    role: Role
    index: int
    contract: ProcessContract
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    attempt: int = 0
    exit_code: int | None = None
    finished_at: float | None = None  # time.time() when poll() first saw it exit
    # CUDA_VISIBLE_DEVICES: the worker's own GPU, or "" (shards and CPU workers see none).
    gpus: str = ""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.contract.to_env())
        # One torch/BLAS thread pool per process: N processes must not oversubscribe cores.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = self.gpus
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf: IO[bytes] = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sgdjob", "trainer"],
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children
            preexec_fn=die_with_parent_preexec(os.getpid()),  # ... and dies with it
        )
        logf.close()
        self.exit_code = None
        self.finished_at = None

    def poll(self) -> int | None:
        if self.proc is not None and self.exit_code is None:
            self.exit_code = self.proc.poll()
            if self.exit_code is not None:
                self.finished_at = time.time()
        return self.exit_code

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code} ({EXIT_MEANINGS.get(code, 'error')})"


class LocalJob:
    """The processes of one job and the loop that watches them."""

    def __init__(
        self,
        job: SGDJob,
        *,
        output: Path,
        progress: bool = True,
        run_id: str | None = None,
        resume: bool = False,
    ) -> None:
        self.job = job
        self.spec = job.spec
        self.output = output
        self.run_id = run_id or new_run_id()
        self.resume = resume
        self.lock = RunLock(output)
        self.state = "new"
        self.progress = progress and sys.stderr.isatty()
        self.state_dir = output / ".sgdjob"
        self.spec_path = self.state_dir / "spec.json"
        self.token = secrets.token_hex(16)
        # Generated in memory for this run only; each process gets its role's share by env.
        self.keys = JobKeys.generate().__dict__ if self.spec.security.curve else None
        self.shards: list[Replica] = []
        self.workers: list[Replica] = []
        self.status_url = ""
        self._last_print = 0.0
        self.counters = SupervisionStatus()
        self.restarted: list[tuple[str, str]] = []  # (replica, why), in order

    def contract(self, role: Role, index: int, addrs: tuple[str, ...] = ()) -> ProcessContract:
        ps = role == "ps"
        contract = ProcessContract(
            role=role,
            index=index,
            job_name=self.job.metadata.name,
            spec_path=str(self.spec_path),
            token=self.token,
            output_dir=str(self.output),
            shard_addrs=addrs,
            bind="tcp://127.0.0.1:0" if ps else "",
            status_bind="127.0.0.1:0" if ps and index == 0 else "",
            ready_file=str(self.state_dir / f"ready-{index}.json") if ps else "",
            run_id=self.run_id,
        )
        return with_curve(contract, self.keys) if self.keys else contract

    # -- start ---------------------------------------------------------------------------
    def record(self, state: str) -> None:
        """``run.json``: running, then succeeded, failed or interrupted."""
        self.state = state
        write_record(
            self.output, run_id=self.run_id, job=self.job.metadata.name, spec=self.spec, state=state
        )

    def start(self) -> None:
        self.lock.acquire()
        self.record("running")
        try:
            self._start()
        except LaunchError:
            self.record("failed")
            raise

    def _start(self) -> None:
        n = self.spec.workers.replicas + self.spec.training.backup_workers
        try:  # before any process starts: a machine short of GPUs runs nothing
            gpus = assign_gpus(
                workers=n,
                gpus_per_worker=self.spec.workers.gpus,
                available=visible_gpus() if self.spec.workers.gpus else [],
            )
        except GPUError as err:
            raise LaunchError(f"spec.workers.gpus: {err}") from None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.state_dir.glob("ready-*.json"):
            stale.unlink()
        # A resumed run appends to its metrics; its old summary is stale either way.
        for name in ("summary.json",) if self.resume else ("metrics.jsonl", "summary.json"):
            (self.output / name).unlink(missing_ok=True)
        self.spec_path.write_text(spec_to_json(self.spec), encoding="utf-8")
        logs = self.output / "logs"
        for k in range(self.spec.parameter_servers.shards):
            r = Replica("ps", k, self.contract("ps", k), logs / f"ps-{k}.log")
            r.start()
            self.shards.append(r)
        addrs = []
        for r in self.shards:
            ready = self._wait_ready(r)
            addrs.append(ready["endpoint"])
            if r.index == 0:
                self.status_url = f"http://127.0.0.1:{ready['statusPort']}/status"
        # Restarted shards must come back on the same endpoints: pin them in the contract.
        for r, addr in zip(self.shards, addrs, strict=True):
            r.contract = replace(r.contract, bind=addr)
        status_host_port = self.status_url.removeprefix("http://").removesuffix("/status")
        self.shards[0].contract = replace(self.shards[0].contract, status_bind=status_host_port)
        for i in range(n):
            w = Replica(
                "worker",
                i,
                self.contract("worker", i, tuple(addrs)),
                logs / f"worker-{i}.log",
                gpus=gpus[i] or "",
            )
            w.start()
            self.workers.append(w)

    def _wait_ready(self, r: Replica) -> dict[str, Any]:
        path = Path(r.contract.ready_file)
        # Not running yet is "Pending": preRunningDeadlineSeconds bounds it, if set.
        limit = self.spec.supervision.pre_running_deadline_seconds
        deadline = time.monotonic() + limit if limit is not None else None
        while deadline is None or time.monotonic() < deadline:
            if path.exists():
                return dict(json.loads(path.read_text(encoding="utf-8")))
            code = r.poll()
            if code is not None:
                raise LaunchError(
                    f"{r.name} failed before it was ready: {describe_exit(code)}\n{r.tail()}"
                )
            time.sleep(0.05)
        raise LaunchError(
            f"PreRunningDeadlineExceeded: {r.name} was not ready after {limit}s "
            f"(supervision.preRunningDeadlineSeconds)\n{r.tail()}"
        )

    # -- watch ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        if not self.status_url:
            return None
        try:
            with urllib.request.urlopen(self.status_url, timeout=1.0) as resp:
                return dict(json.loads(resp.read()))
        except (OSError, ValueError):
            return None

    def observe(self) -> list[ObservedReplica]:
        """What the policy sees: every process as a replica with its phase and exit code."""
        out = []
        for r in self.shards + self.workers:
            code = r.poll()
            if code is None:
                phase: Phase = "Running" if r.proc is not None else "Pending"
            else:
                phase = "Succeeded" if code == 0 else "Failed"
            # Popen reports "killed by signal N" as -N; pods report 128 + N. Use the latter.
            exit_code = None if code is None else (128 - code if code < 0 else code)
            out.append(
                ObservedReplica(
                    role=r.role,
                    index=r.index,
                    phase=phase,
                    attempt=r.attempt,
                    exit_code=exit_code,
                    finished_at=r.finished_at,
                )
            )
        return out

    def progress_from_status(self, status: dict[str, Any] | None) -> Progress | None:
        if not status:
            return None
        times = {int(i): w.get("stepTime") for i, w in (status.get("workers") or {}).items()}
        return Progress(step=int(status.get("step") or 0), step_times=times)

    def wait(self) -> None:
        """Supervise until the job succeeds; raise LaunchError when it fails (see ``_wait``)."""
        try:
            self._wait()
        except LaunchError:
            self.record("failed")
            raise
        self.record("succeeded")

    def _wait(self) -> None:
        """Supervise until the job succeeds; raise LaunchError when the policy fails it.

        The decisions are ``sgdjob.policy.decide``'s, the same the operator makes: a worker
        killed by a signal is restarted within ``supervision.maxRestarts``, a straggler is
        replaced within its budget, a permanent error or a failed shard fails the job.
        """
        started = time.time()
        by_name = {r.name: r for r in self.shards + self.workers}
        while True:
            status = self.status()
            d = decide(
                shards_recoverable=self.spec.checkpoint.every is not None,
                spec=self.spec,
                replicas=self.observe(),
                counters=self.counters,
                progress=self.progress_from_status(status),
                now=time.time(),
                start_time=started,
            )
            self.counters = d.counters
            for a in d.actions:
                if isinstance(a, Fail):
                    culprit = next(
                        (
                            r
                            for r in by_name.values()
                            if r.name in a.message
                            or (
                                f"{r.role.replace('ps', 'shard')} {r.index}" in a.message
                                and r.exit_code not in (None, 0)
                            )
                        ),
                        None,
                    )
                    tail = f"; log {culprit.log_path}\n{culprit.tail()}" if culprit else ""
                    raise LaunchError(f"{a.reason}: {a.message}{tail}")
                if isinstance(a, Succeed):
                    if a.reason != "AllWorkersSucceeded":  # say why the leftovers are stopped
                        log.warning("%s", a.message)
                        print(f"\nsgdjob: {a.message}", file=sys.stderr, flush=True)
                    self._wait_shards()
                    return
                if isinstance(a, (Create, Recreate)):
                    r = by_name[replica_name(a.role, a.index)]
                    why = a.reason if isinstance(a, Recreate) else "created"
                    log.warning("%s: %s; starting attempt %d", r.name, why, a.attempt)
                    print(
                        f"\nsgdjob: {r.name} {why}; restarting (attempt {a.attempt})",
                        file=sys.stderr,
                        flush=True,
                    )
                    r.stop(signal.SIGKILL)
                    if r.proc is not None:
                        r.proc.wait()
                    r.attempt = a.attempt
                    # A restarted shard counts the workers that already succeeded as done.
                    done = tuple(w.index for w in self.workers if w.poll() == 0)
                    r.contract = replace(
                        r.contract, attempt=a.attempt, done_workers=done if r.role == "ps" else ()
                    )
                    r.start()
                    if isinstance(a, Recreate):
                        self.restarted.append((r.name, why))
                elif isinstance(a, Delete):
                    by_name[replica_name(a.role, a.index)].stop(signal.SIGKILL)
            self._show_progress(status)
            time.sleep(0.25)

    def _wait_shards(self, timeout_s: float = SHARD_EXIT_TIMEOUT_S) -> None:
        """After the workers: shards exit once the coordinator wrote the summary."""
        deadline = time.monotonic() + timeout_s
        for r in self.shards:
            while r.poll() is None:
                if time.monotonic() > deadline:
                    raise LaunchError(f"{r.name} did not exit {timeout_s:.0f}s after the workers")
                time.sleep(0.05)
            if r.exit_code != 0:
                raise LaunchError(
                    f"replica {r.name} failed: {describe_exit(r.exit_code or 0)}; "
                    f"log {r.log_path}\n{r.tail()}"
                )

    def _show_progress(self, s: dict[str, Any] | None) -> None:
        now = time.monotonic()
        if now - self._last_print < (0.5 if self.progress else 10.0):
            return
        self._last_print = now
        if s is None or not s.get("totalSteps"):
            return  # no worker has said hello yet: nothing worth printing
        line = progress_line(s)
        if self.progress:
            sys.stderr.write("\r" + line.ljust(100)[:120])
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every live child, then SIGKILL what is left after ``grace_s``."""
        replicas = self.shards + self.workers
        for r in replicas:
            r.stop(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for r in replicas:
            if r.proc is None:
                continue
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                r.stop(signal.SIGKILL)
                r.proc.wait()
        if self.progress:
            sys.stderr.write("\n")
        if self.state == "running":
            self.record("interrupted")
        self.lock.release()


def progress_line(s: dict[str, Any]) -> str:
    """One line: a bar over the slowest worker's steps, version, loss, accuracy, throughput."""
    total = int(s.get("totalSteps") or 0)
    workers = s.get("workers") or {}
    done = min((int(w.get("step", 0)) + 1 for w in workers.values()), default=0)
    done = min(done, total) if total else 0
    frac = done / total if total else 0.0
    parts = [f"[{'#' * int(frac * 20):<20}] step {done}/{total}", f"version {s.get('step', 0)}"]
    if s.get("loss") is not None:
        parts.append(f"loss {s['loss']:.4f}")
    if s.get("metricValue") is not None:
        parts.append(f"{s.get('metric', 'accuracy')} {s['metricValue']:.3f}")
    parts.append(f"{s.get('samplesPerSecond') or 0:.0f} samples/s")
    return " ".join(parts)


def run_local(
    job: SGDJob,
    *,
    output: Path,
    progress: bool = True,
    run_id: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the job to completion in the run directory ``output``; returns summary.json.

    Raises LaunchError when the job fails, KeyboardInterrupt (``signals.Stopped`` for SIGTERM
    and SIGHUP) when stopped; every child is stopped either way.
    """
    lj = LocalJob(job, output=output, progress=progress, run_id=run_id, resume=resume)
    interrupted = False
    try:
        with stop_signals():
            lj.start()
            lj.wait()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        with stop_signals_ignored():
            lj.stop()
        if interrupted:
            log.warning("interrupted: stopped every replica")
    summary_path = output / "summary.json"
    if not summary_path.exists():
        raise LaunchError(f"the job ended without {summary_path}")
    return dict(json.loads(summary_path.read_text(encoding="utf-8")))
