"""A worker: its data shard, a model replica, and the pull / compute / push loop.

Loop per step (``spec.training.mode``):
- ``sync``: pull parameters of version >= step (the shard answers when the step closed),
  forward/backward, push the gradient tagged with the version. With backup workers a slow
  worker's next pull simply returns a newer version and it goes on from there.
- ``async``: pull whatever the shards hold now, compute, push.
- ``downpour``: pull every ``fetchEvery`` steps; between fetches apply the own gradient
  locally (plain SGD) and accumulate it; push the sum every ``pushEvery`` steps.

Worker 0 also evaluates the held-out set every ``evalInterval`` steps. At the end of a sync run
every worker pulls the final parameters and buffers and logs their digest (in the async modes
the others just leave); worker 0 evaluates them, writes the model atomically and, on a pod,
leaves the final step and metric as its termination message. The loss and the metric are the
task's (``sgdjob.tasks``); non-trainable buffers ride in the flat vector (``sgdjob.models.flat``):
loaded at every pull, their change pushed with every gradient.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sgdjob.api.types import SGDJobSpec
from sgdjob.client import ShardClient, ShardRestarted
from sgdjob.contract import ENV_TERMINATION_LOG
from sgdjob.data import (
    BatchSource,
    Data,
    Dataset,
    eval_batches,
    load_data,
    partition_for,
    total_steps,
)
from sgdjob.data.dataset import from_legacy
from sgdjob.gpus import GPUError
from sgdjob.models import FlatModel, build_model
from sgdjob.optim import LocalUpdate
from sgdjob.output import atomic_write
from sgdjob.overlap import OverlapPusher, fallback_reason
from sgdjob.precision import Precision, clip_grad_norm_
from sgdjob.protocol import Report
from sgdjob.schedule import Schedule
from sgdjob.tasks import Evaluation, Task, evaluate, load_task
from sgdjob.transport import CurveClient, io_threads_for, make_context

log = logging.getLogger("sgdjob.worker")


EVAL_BATCH = 512


def held_out(
    flat: FlatModel, task: Task, data: Data, precision: Precision, *, limit: int | None
) -> Evaluation:
    """The task's metric on the first ``limit`` (or all) test items."""
    return evaluate(
        flat.model,
        task,
        eval_batches(data.test, limit=limit, batch=EVAL_BATCH),
        device=flat.params.device,
        autocast=precision.autocast,
    )


class HostBuffers:
    """Host-side float32 vectors the wire reads and writes.

    On CPU they alias the model's flat buffers (no copy at all). On CUDA they are pinned host
    tensors: parameters are copied host->device once per pull, gradients device->host once
    per push.
    """

    def __init__(self, flat: FlatModel) -> None:
        self.flat = flat
        self.cuda = flat.params.is_cuda
        if self.cuda:
            self.params_t = torch.empty(flat.size, dtype=torch.float32, pin_memory=True)
            self.grads_t = torch.empty(flat.size, dtype=torch.float32, pin_memory=True)
        else:
            self.params_t, self.grads_t = flat.params, flat.grads
        self.params: np.ndarray = self.params_t.numpy()
        self.grads: np.ndarray = self.grads_t.numpy()

    def params_to_device(self) -> None:
        if self.cuda:
            self.flat.params.copy_(self.params_t, non_blocking=True)

    def grads_to_host(self) -> None:
        if self.cuda:
            self.grads_t.copy_(self.flat.grads)  # synchronous: the bytes must be there to send


def choose_device(spec: SGDJobSpec) -> torch.device:
    """The CPU for ``workers.gpus: 0``; else this process's one visible GPU, as cuda:0."""
    if spec.workers.gpus == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GPUError("spec.workers.gpus is 1 but this worker sees no CUDA device")
    return torch.device("cuda", 0)


def run_worker(
    *,
    spec: SGDJobSpec,
    index: int,
    addrs: tuple[str, ...],
    token: bytes,
    output_dir: str,
    timeout_s: float | None = None,
    chunk_bytes: int = 4 << 20,
    dataset: Data | Dataset | None = None,
    attempt: int = 0,
    curve: CurveClient | None = None,
) -> int:
    t = spec.training
    torch.set_num_threads(spec.workers.threads)
    n_workers = spec.workers.replicas + t.backup_workers
    task = load_task(t)
    data = dataset or load_data(spec.data, seed=t.seed, task=t.task)
    if isinstance(data, Dataset):
        data = from_legacy(data)
    device = choose_device(spec)
    model = build_model(
        spec.model,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        target_shape=data.target_shape,
        task=t.task,
        seed=t.seed,
    )
    onebit = spec.compression.kind == "onebit"
    flat = FlatModel(model, device)  # buffers are averaged by the shards: sgdjob.models.flat
    host = HostBuffers(flat)
    precision = Precision(t.precision, device)
    schedule = Schedule(t.lr, t.schedule)
    part = partition_for(
        data.n_train, workers=n_workers, index=index, batch_size=t.batch_size, seed=t.seed
    )
    steps = total_steps(
        n_train=data.n_train,
        workers=n_workers,
        batch_size=t.batch_size,
        epochs=t.epochs,
        max_steps=t.max_steps,
    )
    source = BatchSource(data.train, part, steps=steps, loader_workers=spec.data.loader_workers)
    # The straggler knob models a slow machine: it slows the first attempt of that worker
    # only, so a replacement (which lands on another node in a cluster) runs at full speed.
    delay_s = spec.debug.slow_workers.get(index, 0) / 1000.0 if attempt == 0 else 0.0
    if delay_s:
        log.warning("debug.slowWorkers: worker %d sleeps %.3fs per step", index, delay_s)
    # One I/O thread per shard: CURVE encrypts each connection on its own I/O thread.
    ctx = make_context(io_threads=io_threads_for(len(addrs)))
    client = ShardClient(
        ctx=ctx,
        addrs=addrs,
        token=token,
        worker=index,
        timeout_s=timeout_s,
        chunk_bytes=chunk_bytes,
        compression=spec.compression,
        curve=curve,
        # 1-bit encoding runs where the gradient is (the GPU); Downpour accumulates on host.
        ef_device="cpu" if t.mode == "downpour" else flat.grads.device,
    )
    # compression.send: updates: this worker runs the optimizer and pushes the step it takes.
    local = (
        LocalUpdate(trainable=flat.trainable, spec=t, device=device)
        if spec.compression.send == "updates"
        else None
    )
    overlap: OverlapPusher | None = None
    reason = fallback_reason(spec, precision)
    if reason is None:
        overlap = OverlapPusher(
            flat,
            client,
            host_grads=host.grads_t,
            bucket_mb=t.bucket_mb,
            align=spec.compression.bucket_size if onebit else None,
        )
        log.info(
            "worker %d: pushing %d gradient buckets during backward", index, len(overlap.buckets)
        )
    elif t.bucket_mb:
        log.info("worker %d: pushing the gradient after backward: %s", index, reason)

    def zero_while_waiting() -> None:
        # The shards are closing the step: zero the gradient buffer meanwhile, once ZeroMQ
        # no longer reads it (off the critical path; backward accumulates into it).
        client.wait_sent()
        flat.zero_grad()

    try:
        welcome = client.hello(flat.size, total_steps=steps, trainable=flat.trainable)
        step = welcome.resume_step
        log.info(
            "worker %d: %d parameters, %d steps, resuming at %d on %s",
            index,
            flat.size,
            steps,
            step,
            device,
        )
        versions: list[int] = []
        local_acc = np.zeros(flat.size, dtype=np.float32) if t.mode == "downpour" else None
        since_push = 0
        train_loss: float | None = None  # this worker's last training loss, for its final word
        while step < steps:
            if t.mode != "downpour" or not versions or step % t.fetch_every == 0:
                min_version = step if t.mode == "sync" else 0
                try:
                    versions, finished = client.pull(
                        host.params, min_version=min_version, while_waiting=zero_while_waiting
                    )
                except ShardRestarted as err:
                    log.warning("worker %d: %s; resynced", index, err)
                    if t.mode == "sync":
                        step = min(step, err.version)  # replay what the shard lost
                    versions = []
                    continue
                host.params_to_device()
                flat.load_buffers()
                if finished:
                    break
                if t.mode == "sync":
                    step = max(step, min(versions))  # a backup worker skips closed steps
                    if step >= steps:
                        break
            # Step time is this worker's own work, not the wait for the others in a pull: a
            # straggler then stands out even in sync mode, where everybody waits for it.
            t0 = time.perf_counter()
            xb, yb = source.get(step)
            xb = xb.to(device, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            client.wait_sent()  # the last push may still be reading the gradient buffer
            if overlap is not None:
                overlap.arm(versions=versions, step=step)
            loss = compute_gradient(
                flat, task, precision, xb, yb, clip=t.grad_clip_norm, overlap=overlap
            )
            if not math.isfinite(float(loss)):
                # Say so and stop: a NaN report would be refused and the job left waiting.
                raise Diverged(f"worker {index}: the loss is {float(loss)} at step {step}")
            if delay_s:
                time.sleep(delay_s)
            if overlap is None and (local_acc is not None or not onebit):
                host.grads_to_host()  # 1-bit encodes on the device; only bits come to host
            if local_acc is not None:
                # Downpour: step locally between fetches, push the accumulated gradient.
                local_acc += host.grads
                flat.local_step(schedule.lr_at(step, total_steps=steps))
                since_push += 1
                if since_push >= t.push_every or step + 1 >= steps:
                    client.push(local_acc, versions=versions, step=step)
                    client.wait_sent()
                    local_acc.fill(0.0)
                    since_push = 0
            elif overlap is None:
                if local is not None:
                    local.apply(flat.params, flat.grads, lr=schedule.lr_at(step, total_steps=steps))
                client.push(flat.grads if onebit else host.grads, versions=versions, step=step)
            ev = None
            if index == 0 and step % t.eval_interval == 0:
                ev = held_out(flat, task, data, precision, limit=t.eval_samples)
            train_loss = float(loss)
            client.report(
                Report(
                    step=step,
                    loss=train_loss,
                    step_time=time.perf_counter() - t0,
                    samples=t.batch_size,
                    bytes_sent=client.bytes_sent,
                    bytes_received=client.bytes_received,
                    eval_metric=ev.metric if ev else math.nan,
                    eval_loss=ev.loss if ev else math.nan,
                )
            )
            step += 1
        if index != 0 and t.mode != "sync":
            client.done()  # async modes: nobody waits for the slowest worker to finish
            return 0
        # Sync: every worker ends on the final parameters and buffers, as every DDP rank does;
        # worker 0 then evaluates and saves them. The digest in each log lets anyone check.
        versions = final_pull(client, host, flat, index)
        log.info(
            "worker %d: final model sha256 %s at version %s",
            index,
            state_digest(flat.model.state_dict()),
            versions,
        )
        if index != 0:
            client.done()
            return 0
        ev = held_out(flat, task, data, precision, limit=None)
        save_model(flat.model, Path(output_dir) / "model.pt")
        client.report(
            Report(
                step=step,
                loss=ev.loss,
                step_time=0.0,
                samples=0,
                bytes_sent=client.bytes_sent,
                bytes_received=client.bytes_received,
                eval_metric=ev.metric,
                eval_loss=ev.loss,
                final=True,
            )
        )
        client.wait_sent()
        log.info("worker 0: final test %s %.4f at version %s", task.metric, ev.metric, versions)
        final = final_message(
            version=versions[0] if versions else step,
            total_steps=steps,
            metric=task.metric,
            ev=ev,
            loss=train_loss,
        )
        write_termination_message(os.environ.get(ENV_TERMINATION_LOG, ""), final)
        return 0
    finally:
        if overlap is not None:
            overlap.close()
        source.close()
        client.close()
        ctx.term()


def final_pull(client: ShardClient, host: HostBuffers, flat: FlatModel, index: int) -> list[int]:
    """Wait for the end of training and load the final parameters and buffers."""
    while True:
        try:
            versions, _ = client.pull(host.params, min_version=0, final=True)
            break
        except ShardRestarted as err:
            log.warning("worker %d: %s during the final pull; resynced", index, err)
    host.params_to_device()
    flat.load_buffers()
    return versions


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (in key order)."""
    h = hashlib.sha256()
    for name, value in state.items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes of any dtype
    return h.hexdigest()


def final_message(
    *, version: int, total_steps: int, metric: str, ev: Evaluation, loss: float | None
) -> str:
    """The final result in the shape of the coordinator's /status (a subset, far below the
    kubelet's 4 KiB limit); non-finite numbers become null, as JSON has no NaN. ``loss`` is
    worker 0's last training loss (None when it ran no step): a job that ends before the
    operator's first poll of the coordinator still shows its loss and step count."""

    def num(x: float | None) -> float | None:
        return x if x is not None and math.isfinite(x) else None

    doc = {
        "step": version,
        "totalSteps": total_steps,
        "finished": True,
        "loss": num(loss),
        "metric": metric,
        "metricValue": num(ev.metric),
        "accuracy": num(ev.metric) if metric == "accuracy" else None,
        "testLoss": num(ev.loss),
    }
    return json.dumps(doc, allow_nan=False, sort_keys=True)


def write_termination_message(path: str, message: str) -> None:
    """Best effort: the model is saved already; a missing message only leaves status older."""
    if not path:
        return
    try:
        Path(path).write_text(message, encoding="utf-8")
    except OSError as err:
        log.warning("worker 0: cannot write the termination message to %s: %s", path, err)


class Diverged(RuntimeError):
    """Training produced a non-finite loss (lower training.lr, clip, or use float32)."""


def compute_gradient(
    flat: FlatModel,
    task: Task,
    precision: Precision,
    xb: torch.Tensor,
    yb: torch.Tensor,
    *,
    clip: float | None,
    overlap: OverlapPusher | None = None,
) -> torch.Tensor:
    """Forward, backward (autocast, loss scaling, clipping) and the buffers' change, all
    written into ``flat.grads``; returns the batch's loss. With ``overlap`` (armed; only
    where ``fallback_reason`` is None: no clipping, no loss scaling) each bucket is pushed
    as backward finishes it."""
    flat.ensure_zero_grad()  # zeroed during the pull already, as a rule
    with precision.autocast():
        loss = task.loss(flat.model(xb), yb)
    flat.grads_zero = False
    if overlap is not None:
        flat.buffer_deltas()  # buffers change in forward only
        overlap.forward_done()
        loss.backward()
        overlap.backward_done()
        return loss.detach()
    scaler = precision.scaler
    if scaler is not None:
        scaler.scale_loss(loss).backward()
        if not scaler.unscale_(flat.param_grads):
            log.warning("fp16 gradients overflowed; pushing zeros, loss scale now %g", scaler.scale)
    else:
        loss.backward()
    if clip is not None:
        clip_grad_norm_(flat.param_grads, clip)
    flat.buffer_deltas()
    return loss.detach()


def save_model(model: nn.Module, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()))
