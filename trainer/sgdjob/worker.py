"""A worker: its data shard, a model replica, and the pull / compute / push loop.

Loop per step (``spec.training.mode``):
- ``sync``: pull parameters of version >= step (the shard answers when the step closed),
  forward/backward, push the gradient tagged with the version. With backup workers a slow
  worker's next pull simply returns a newer version and it goes on from there.
- ``async``: pull whatever the shards hold now, compute, push.
- ``downpour``: pull every ``fetchEvery`` steps; between fetches apply the own gradient
  locally (plain SGD) and accumulate it; push the sum every ``pushEvery`` steps.

Worker 0 also evaluates the held-out set every ``evalInterval`` steps and, at the end, pulls
the final parameters, evaluates, and writes the model atomically.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zmq
from torch import nn

from sgdjob.api.types import SGDJobSpec
from sgdjob.client import ShardClient, ShardRestarted
from sgdjob.data import Dataset, load_dataset, partition_for, total_steps
from sgdjob.models import FlatModel, build_model
from sgdjob.output import atomic_write
from sgdjob.protocol import Report
from sgdjob.transport import CurveClient

log = logging.getLogger("sgdjob.worker")


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int = 4096
) -> Evaluation:
    device = next(model.parameters()).device
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
            out = model(xb)
            loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(dim=1) == yb).sum())
    model.train()
    n = max(1, x.shape[0])
    return Evaluation(accuracy=correct / n, loss=loss_sum / n)


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
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if spec.workers.gpus > 0:
        log.warning("spec.workers.gpus=%d but CUDA is not available; using CPU", spec.workers.gpus)
    return torch.device("cpu")


def run_worker(
    *,
    spec: SGDJobSpec,
    index: int,
    addrs: tuple[str, ...],
    token: bytes,
    output_dir: str,
    timeout_s: float | None = None,
    chunk_bytes: int = 4 << 20,
    dataset: Dataset | None = None,
    attempt: int = 0,
    curve: CurveClient | None = None,
) -> int:
    t = spec.training
    torch.set_num_threads(spec.workers.threads)
    n_workers = spec.workers.replicas + t.backup_workers
    ds = dataset or load_dataset(spec.data, seed=t.seed)
    device = choose_device(spec)
    model = build_model(spec.model, input_dim=ds.input_dim, num_classes=ds.num_classes, seed=t.seed)
    flat = FlatModel(model, device)
    host = HostBuffers(flat)
    part = partition_for(
        ds.x_train.shape[0], workers=n_workers, index=index, batch_size=t.batch_size, seed=t.seed
    )
    steps = total_steps(
        n_train=ds.x_train.shape[0],
        workers=n_workers,
        batch_size=t.batch_size,
        epochs=t.epochs,
        max_steps=t.max_steps,
    )
    # The straggler knob models a slow machine: it slows the first attempt of that worker
    # only, so a replacement (which lands on another node in a cluster) runs at full speed.
    delay_s = spec.debug.slow_workers.get(index, 0) / 1000.0 if attempt == 0 else 0.0
    if delay_s:
        log.warning("debug.slowWorkers: worker %d sleeps %.3fs per step", index, delay_s)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
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
    onebit = spec.compression.kind == "onebit"
    try:
        welcome = client.hello(flat.size, total_steps=steps)
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
        while step < steps:
            if t.mode != "downpour" or not versions or step % t.fetch_every == 0:
                min_version = step if t.mode == "sync" else 0
                try:
                    versions, finished = client.pull(host.params, min_version=min_version)
                except ShardRestarted as err:
                    log.warning("worker %d: %s; resynced", index, err)
                    if t.mode == "sync":
                        step = min(step, err.version)  # replay what the shard lost
                    versions = []
                    continue
                host.params_to_device()
                if finished:
                    break
                if t.mode == "sync":
                    step = max(step, min(versions))  # a backup worker skips closed steps
                    if step >= steps:
                        break
            # Step time is this worker's own work, not the wait for the others in a pull: a
            # straggler then stands out even in sync mode, where everybody waits for it.
            t0 = time.perf_counter()
            xb_idx = torch.from_numpy(part.batch(step))
            xb = ds.x_train[xb_idx].to(device, non_blocking=True)
            yb = ds.y_train[xb_idx].to(device, non_blocking=True)
            client.wait_sent()  # the last push may still be reading the gradient buffer
            flat.zero_grad()
            loss = nn.functional.cross_entropy(flat.model(xb), yb)
            loss.backward()
            if delay_s:
                time.sleep(delay_s)
            if local_acc is not None or not onebit:
                host.grads_to_host()  # 1-bit encodes on the device; only bits come to host
            if local_acc is not None:
                # Downpour: step locally between fetches, push the accumulated gradient.
                local_acc += host.grads
                flat.params.sub_(flat.grads, alpha=t.lr)
                since_push += 1
                if since_push >= t.push_every or step + 1 >= steps:
                    client.push(local_acc, versions=versions, step=step)
                    client.wait_sent()
                    local_acc.fill(0.0)
                    since_push = 0
            else:
                client.push(flat.grads if onebit else host.grads, versions=versions, step=step)
            ev = None
            if index == 0 and step % t.eval_interval == 0:
                ev = evaluate(flat.model, ds.x_test, ds.y_test)
            client.report(
                Report(
                    step=step,
                    loss=float(loss),
                    step_time=time.perf_counter() - t0,
                    samples=t.batch_size,
                    bytes_sent=client.bytes_sent,
                    bytes_received=client.bytes_received,
                    eval_accuracy=ev.accuracy if ev else math.nan,
                    eval_loss=ev.loss if ev else math.nan,
                )
            )
            step += 1
        if index != 0:
            client.done()
            return 0
        # Worker 0: wait for the end of training, evaluate and save the final model.
        while True:
            try:
                versions, _ = client.pull(host.params, min_version=0, final=True)
                break
            except ShardRestarted as err:
                log.warning("worker 0: %s during the final pull; resynced", err)
        host.params_to_device()
        ev = evaluate(flat.model, ds.x_test, ds.y_test)
        save_model(flat.model, Path(output_dir) / "model.pt")
        client.report(
            Report(
                step=step,
                loss=ev.loss,
                step_time=0.0,
                samples=0,
                bytes_sent=client.bytes_sent,
                bytes_received=client.bytes_received,
                eval_accuracy=ev.accuracy,
                eval_loss=ev.loss,
                final=True,
            )
        )
        client.wait_sent()
        log.info("worker 0: final test accuracy %.4f at version %s", ev.accuracy, versions)
        return 0
    finally:
        client.close()
        ctx.term()


def save_model(model: nn.Module, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()))
