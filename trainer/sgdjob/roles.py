"""Run one trainer role as a process: what `sgdjob trainer` does in a pod or a local child.

The executor supplies only the ``ProcessContract`` (role, index, addresses, token, output
directory, spec path); everything else comes from the spec. Exit codes are defined in
``sgdjob.contract`` (0 done, 1 an error, 2 invalid spec or contract or a checkpoint of another
spec: permanent; 3 a peer stopped answering: retryable within ``supervision.maxRestarts``).

How long a process waits for a peer (a shard for any message, a worker for a reply) is the
job's own deadline, ``supervision.activeDeadlineSeconds``: the executor fails the job then
anyway. Without one it waits as long as the executor keeps it (a restarted or Pending peer
may take any time to come back; ``preRunningDeadlineSeconds`` bounds the Pending part).
``SGDJOB_COMM_TIMEOUT`` (workers) and ``SGDJOB_IDLE_TIMEOUT`` (shards), in seconds, override
it, for tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sgdjob.api.types import SGDJobSpec
from sgdjob.api.validation import Problem, SpecError, validate_spec
from sgdjob.contract import (
    ENV_CURVE_CLIENT_PUBLIC,
    ENV_CURVE_CLIENT_SECRET,
    ENV_CURVE_SERVER_PUBLIC,
    ENV_CURVE_SERVER_SECRET,
    EXIT_OK,
    EXIT_PEER,
    EXIT_SPEC,
    ProcessContract,
)
from sgdjob.output import JsonLines, atomic_write_json
from sgdjob.runs import spec_hash
from sgdjob.transport import CurveClient, CurveServer

log = logging.getLogger("sgdjob.roles")

ENV_COMM_TIMEOUT = "SGDJOB_COMM_TIMEOUT"  # a worker's wait for a shard's reply
ENV_IDLE_TIMEOUT = "SGDJOB_IDLE_TIMEOUT"  # a shard's wait for any message


def peer_timeout_s(
    spec: SGDJobSpec, override: str = ENV_COMM_TIMEOUT, env: Mapping[str, str] | None = None
) -> float | None:
    """How long to wait for a peer before exiting EXIT_PEER; None: as long as it takes."""
    raw = (os.environ if env is None else env).get(override, "")
    if raw:
        return float(raw)
    deadline = spec.supervision.active_deadline_seconds
    return None if deadline is None else float(deadline)


def load_spec(path: str) -> SGDJobSpec:
    """The mounted spec JSON, validated again: a pod must not trust its ConfigMap blindly."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SpecError([Problem(path, f"cannot read the spec: {err}")]) from None
    return validate_spec(raw)


def run_identity(contract: ProcessContract) -> str:
    """The run this process's checkpoints belong to: ``SGDJOB_RUN_ID``, else the job token.

    An executor older than run ids sets no ``SGDJOB_RUN_ID``; its job token is still fresh per
    job (a Secret per SGDJob, per ``sgdjob run`` locally), so checkpoints left by an earlier
    job of the same name are still never restored.
    """
    if contract.run_id:
        return contract.run_id
    return "token-" + hashlib.sha256(contract.token.encode()).hexdigest()[:16]


def curve_missing(contract: ProcessContract) -> list[str]:
    """The CURVE variables this role needs but did not get."""
    need = [
        (ENV_CURVE_SERVER_PUBLIC, contract.curve_server_public),
        (ENV_CURVE_CLIENT_PUBLIC, contract.curve_client_public),
    ]
    if contract.role == "ps":
        need.append((ENV_CURVE_SERVER_SECRET, contract.curve_server_secret))
    else:
        need.append((ENV_CURVE_CLIENT_SECRET, contract.curve_client_secret))
    return [name for name, value in need if not value]


def client_curve(contract: ProcessContract) -> CurveClient:
    return CurveClient(
        server_public=contract.curve_server_public,
        public=contract.curve_client_public,
        secret=contract.curve_client_secret,
    )


def run_role(contract: ProcessContract) -> int:
    """Run the role the contract names; returns the process exit code."""
    from sgdjob.client import ShardRejected, ShardUnavailable
    from sgdjob.data import DataError
    from sgdjob.entrypoints import EntryPointError
    from sgdjob.gpus import GPUError
    from sgdjob.models import ModelError
    from sgdjob.protocol import token_digest

    try:
        spec = load_spec(contract.spec_path)
    except SpecError as err:
        log.error("invalid spec: %s", err)
        return EXIT_SPEC
    # SIGTERM (pod deletion, local stop) becomes a clean exception, not a dead process.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    token = token_digest(contract.token)
    missing = curve_missing(contract) if spec.security.curve else []
    if missing:
        log.error(
            "spec.security.curve is on but %s %s not set",
            ", ".join(missing),
            "is" if len(missing) == 1 else "are",
        )
        return EXIT_SPEC
    if not spec.security.curve:
        log.warning(
            "spec.security.curve is off: traffic is unencrypted and any peer that "
            "reaches this process and knows the job token is trusted"
        )
    try:
        if contract.role == "ps":
            return run_shard_process(contract, spec, token)
        from sgdjob.worker import run_worker

        n = spec.workers.replicas + spec.training.backup_workers
        if contract.index >= n:
            log.error("worker index %d out of range 0..%d", contract.index, n - 1)
            return EXIT_SPEC
        if len(contract.shard_addrs) != spec.parameter_servers.shards:
            log.error(
                "%d shard addresses for %d shards",
                len(contract.shard_addrs),
                spec.parameter_servers.shards,
            )
            return EXIT_SPEC
        return run_worker(
            spec=spec,
            index=contract.index,
            addrs=contract.shard_addrs,
            token=token,
            output_dir=contract.output_dir,
            timeout_s=peer_timeout_s(spec),
            attempt=contract.attempt,
            curve=client_curve(contract) if spec.security.curve else None,
        )
    except ShardUnavailable as err:
        log.error("%s", err)
        return EXIT_PEER
    except (ShardRejected, EntryPointError, DataError, ModelError, GPUError) as err:
        log.error("%s", err)
        return EXIT_SPEC
    except KeyboardInterrupt:
        log.warning("stopped by signal")
        return 128 + signal.SIGTERM


def run_shard_process(contract: ProcessContract, spec: SGDJobSpec, token: bytes) -> int:
    import numpy as np
    import torch

    from sgdjob.checkpoint import BackgroundCheckpointer, Checkpointer, CheckpointMismatch
    from sgdjob.data import data_shapes
    from sgdjob.httpstatus import CachedChecksum, serve_status
    from sgdjob.models import FlatModel, build_model
    from sgdjob.shard import Shard
    from sgdjob.slicing import partition
    from sgdjob.stats import ShardStats
    from sgdjob.tasks import load_task
    from sgdjob.transport import bind_router, io_threads_for, make_context

    k = contract.index
    if k >= spec.parameter_servers.shards:
        log.error("shard index %d out of range 0..%d", k, spec.parameter_servers.shards - 1)
        return EXIT_SPEC
    torch.set_num_threads(1)
    t = spec.training
    shapes = data_shapes(spec.data, seed=t.seed, task=t.task)
    model = build_model(
        spec.model,
        input_shape=shapes.input_shape,
        num_classes=shapes.num_classes,
        target_shape=shapes.target_shape,
        task=t.task,
        seed=t.seed,
    )
    flat = FlatModel(model, torch.device("cpu"))
    trainable = flat.trainable
    slices = partition(flat.size, spec.parameter_servers.shards)
    initial = np.ascontiguousarray(flat.params.numpy()[slices[k].offset : slices[k].end])
    del flat
    n_workers = spec.workers.replicas + t.backup_workers
    stats = ShardStats(shard=k, workers=n_workers, mode=t.mode, metric=load_task(t).metric)
    # An I/O thread per worker: their pushes are received (and CURVE-decrypted) in parallel.
    ctx = make_context(io_threads=io_threads_for(n_workers))
    curve = (
        CurveServer(
            public=contract.curve_server_public,
            secret=contract.curve_server_secret,
            client_public=contract.curve_client_public,
        )
        if spec.security.curve
        else None
    )
    endpoint, concrete = bind_router(
        ctx, contract.bind, curve=curve, on_handshake_failure=stats.reject
    )
    shard = Shard(
        spec=spec,
        slice_=slices[k],
        initial=initial,
        total_size=slices[-1].end,
        token=token,
        send=endpoint.send,
        stats=stats,
        incarnation=secrets.randbits(32),
        chunk_bytes=4 << 20,
        trainable=trainable,
    )
    every = spec.checkpoint.every
    ckpt = None
    if every:
        s = slices[k]
        ckpt = Checkpointer(
            Path(contract.output_dir) / "checkpoints" / f"shard-{k}",
            shard=k,
            offset=s.offset,
            count=s.count,
            keep=spec.checkpoint.keep,
            run_id=run_identity(contract),
            spec_hash=spec_hash(spec),
        )
        try:
            state = ckpt.load_latest()
        except CheckpointMismatch as err:
            log.error("shard %d: %s", k, err)
            return EXIT_SPEC
        if state is not None:
            shard.restore(state)
            log.warning(
                "shard %d: restored version %d from its newest valid checkpoint", k, state.version
            )
    if contract.done_workers:
        # The executor saw these workers succeed: they will never push again.
        shard.workers_exited(contract.done_workers)
    # Snapshots in the loop, writes on a thread: a crash still loses at most `every` versions
    # (see BackgroundCheckpointer), and never leaves a half-written file.
    writer = (
        BackgroundCheckpointer(
            ckpt, every=every, version=shard.version, milestone=shard.milestone()
        )
        if ckpt is not None and every
        else None
    )
    status_port = 0
    if contract.status_bind:
        # The parameters change only with the version: one pass per version at most.
        params_checksum = CachedChecksum(shard.checksum, key=lambda: shard.version)

        def snapshot(checksum: bool = False) -> dict[str, Any]:
            s = stats.status()
            s["bytesSent"] = endpoint.counters.bytes_sent
            s["bytesReceived"] = endpoint.counters.bytes_received
            if checksum:  # a pass over the whole slice: only when asked (?checksum=1)
                s["paramsChecksum"] = params_checksum()
            return s

        _, status_port = serve_status(contract.status_bind, status=snapshot, job=contract.job_name)
    if contract.ready_file:
        atomic_write_json(contract.ready_file, {"endpoint": concrete, "statusPort": status_port})
    log.info(
        "shard %d: %d parameters [%d, %d) on %s",
        k,
        slices[k].count,
        slices[k].offset,
        slices[k].end,
        concrete,
    )
    metrics = MetricsWriter(Path(contract.output_dir), stats) if k == 0 else None
    idle_s = peer_timeout_s(spec, ENV_IDLE_TIMEOUT)
    last_msg = time.monotonic()
    try:
        while True:
            if endpoint.poll(200):
                msg = endpoint.recv()
                last_msg = time.monotonic()
                if msg is None:
                    stats.reject("TRUNCATED")
                else:
                    shard.handle(msg)
                    # Also saved when a worker is done or the training finished: a shard
                    # restored after workers exited must not wait for steps nobody will send.
                    milestone = shard.milestone()
                    if writer is not None and writer.due(shard.version, milestone):
                        writer.submit(shard.state(), milestone=milestone)
            if metrics:
                metrics.tick()
            if shard.should_exit() and (k != 0 or stats.final_report is not None):
                break
            if idle_s is not None and time.monotonic() - last_msg > idle_s:
                log.error("shard %d: no message for %.0fs; giving up", k, idle_s)
                return EXIT_PEER
        shard.flush_sends()
        if writer is not None:
            writer.close()  # the final checkpoint is durable before the shard says finished
        with stats.lock:
            stats.finished_at = time.time()
        if metrics:
            metrics.finish(spec, endpoint.counters.bytes_sent, endpoint.counters.bytes_received)
        log.info("shard %d: finished at version %d", k, shard.version)
        return EXIT_OK
    finally:
        if writer is not None:
            # Leaving on a signal or an error: still finish the file being written (a failed
            # write is logged then, not raised, so it does not hide why the shard stops).
            writer.close(raise_error=False)
        endpoint.close()
        ctx.term()


class MetricsWriter:
    """Shard 0's metrics.jsonl (a line per evaluation and per 1% of progress) and summary."""

    def __init__(self, out: Path, stats: Any) -> None:
        self.out = out
        self.stats = stats
        self.lines = JsonLines(out / "metrics.jsonl")
        self.evals_written = 0
        self.last_version = -1

    def tick(self) -> None:
        s = self.stats
        with s.lock:
            # Versions to expect: one per step in sync, one per gradient in the async modes.
            total = (s.total_steps or 0) * (1 if s.mode == "sync" else len(s.workers))
            every = max(1, total // 100)
            new_evals = s.evals[self.evals_written :]
            self.evals_written = len(s.evals)
            due = s.version - self.last_version >= every
            loss, version = s.mean_loss(), s.version
            elapsed, sps = time.time() - s.started, s.samples_per_second()
        for step, acc, test_loss in new_evals:
            self.lines.write(
                {
                    "kind": "eval",
                    "step": step,
                    "version": version,
                    "metric": self.stats.metric,
                    "value": acc,
                    "testLoss": test_loss,
                    "time": elapsed,
                }
            )
        if due and loss is not None:
            self.last_version = version
            self.lines.write(
                {
                    "kind": "train",
                    "version": version,
                    "loss": loss,
                    "samplesPerSecond": sps,
                    "time": elapsed,
                }
            )

    def finish(self, spec: SGDJobSpec, bytes_sent: int, bytes_received: int) -> None:
        self.tick()
        self.lines.close()
        st = self.stats.status()
        final = self.stats.final_report
        summary = {
            "mode": spec.training.mode,
            "shards": spec.parameter_servers.shards,
            "workers": spec.workers.replicas,
            "backupWorkers": spec.training.backup_workers,
            "version": st["step"],
            "stepsPerWorker": st["totalSteps"],
            "task": spec.training.task,
            "metric": self.stats.metric,
            "finalMetric": final.eval_metric if final else None,
            # Kept for classification (and older readers): the same number under its name.
            "finalAccuracy": final.eval_metric
            if final and self.stats.metric == "accuracy"
            else None,
            "finalTestLoss": final.eval_loss if final else None,
            "trainLoss": st["loss"],
            "wallTimeSeconds": st["elapsedSeconds"],
            "samples": st["samples"],
            "samplesPerSecond": st["samplesPerSecond"],
            "shard0BytesSent": bytes_sent,
            "shard0BytesReceived": bytes_received,
            "staleness": st["staleness"],
            "workerStats": st["workers"],
            "rejectedMessages": st["rejected"],
        }
        atomic_write_json(self.out / "summary.json", summary)
