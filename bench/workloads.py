"""Fashion-MNIST CNN: sgdjob's modes beside torch DDP, test accuracy at equal samples.

Every row trains the built-in ResNet-style CNN with BatchNorm on Fashion-MNIST with the same
optimizer (Nesterov SGD, weight decay, warmup then cosine), the same per-worker batch, the
same number of steps per worker and the same data partition (``sgdjob.data.partition_for``),
so every row sees the same samples. Rows: sgdjob sync, async with Zhang's staleness rule,
sync with 1-bit gradients and error feedback (2 shards x 2 workers each), and torch
``DistributedDataParallel`` (gloo, 2 CPU ranks), measured in the same run. DDP keeps
BatchNorm statistics its own way (rank 0's buffers broadcast at every forward); sgdjob
averages them through the shards.

``python -m bench.workloads [--quick]`` writes ``bench/results/workloads.md``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import job, run_job
from bench.ddp import free_port
from bench.report import markdown_table, write_result

WORKERS = 2
BATCH = 64
LR = 0.1
WARMUP = 30


def workload(steps: int) -> dict[str, Any]:
    return {
        "model": {"builtin": "resnet", "resnet": {"channels": [16, 32, 64], "blocks": 1}},
        "data": {"builtin": "fashionMnist"},
        "parameterServers": {"shards": 2},
        "workers": {"replicas": WORKERS},
        "training": {
            "maxSteps": steps,
            "batchSize": BATCH,
            "optimizer": "sgd",
            "lr": LR,
            "momentum": 0.9,
            "nesterov": True,
            "weightDecay": 5e-4,
            "schedule": {"kind": "cosine", "warmupSteps": WARMUP},
            "evalInterval": steps,
            "evalSamples": 1000,
        },
    }


ROWS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("sgdjob sync", {"mode": "sync"}, {}),
    ("sgdjob async, zhang", {"mode": "async", "staleness": "zhang"}, {}),
    ("sgdjob sync, 1-bit + error feedback", {"mode": "sync"}, {"compression": {"kind": "onebit"}}),
]


def _ddp_rank(rank: int, port: int, doc: dict[str, Any], out: str) -> None:
    """One DDP rank: the same model, partition, optimizer and schedule as the sgdjob rows."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim import lr_scheduler as ls

    from sgdjob.api.validation import parse_job
    from sgdjob.data import eval_batches, gather, load_data, partition_for
    from sgdjob.models import build_model
    from sgdjob.tasks import CLASSIFICATION, evaluate

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORKERS,
        timeout=timedelta(seconds=300),
    )
    try:
        spec = parse_job(doc).spec
        t = spec.training
        data = load_data(spec.data, seed=t.seed)
        model = build_model(
            spec.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=t.seed
        )
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(
            ddp.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=5e-4
        )
        steps = t.max_steps or 0
        w = t.schedule.warmup_steps
        sched = ls.SequentialLR(
            opt,
            [
                ls.LinearLR(opt, start_factor=t.schedule.warmup_start_factor, total_iters=w),
                ls.CosineAnnealingLR(opt, T_max=steps - w),
            ],
            milestones=[w],
        )
        part = partition_for(
            data.n_train, workers=WORKERS, index=rank, batch_size=t.batch_size, seed=t.seed
        )
        t0 = time.perf_counter()
        for step in range(steps):
            x, y = gather(data.train, torch.from_numpy(part.batch(step)))
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()  # all-reduce here
            opt.step()
            sched.step()
        seconds = time.perf_counter() - t0
        if rank == 0:
            ev = evaluate(
                model,
                CLASSIFICATION,
                eval_batches(data.test, limit=None, batch=512),
                device=torch.device("cpu"),
            )
            Path(out).write_text(json.dumps({"accuracy": ev.metric, "seconds": seconds}))
    finally:
        dist.destroy_process_group()


def run_ddp(doc: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(free_port(), doc, str(out)), nprocs=WORKERS, join=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main(quick: bool = False) -> str:
    steps = 150 if quick else 469  # 469 steps x 2 workers x 64 = one epoch of 60,000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, training, other) in enumerate(ROWS):
            spec = workload(steps)
            spec["training"].update(training)
            spec.update(other)
            s = run_job(job(f"fmnist-{i}", spec), Path(tmp) / f"run-{i}")
            rows.append((label, s["finalAccuracy"], s["samples"], s["wallTimeSeconds"]))
        doc = job("fmnist-ddp", workload(steps))
        d = run_ddp(doc, Path(tmp) / "ddp.json")
        rows.append(
            (
                "torch DDP (gloo), same model and optimizer",
                d["accuracy"],
                steps * WORKERS * BATCH,
                d["seconds"],
            )
        )
    text = markdown_table(["run", "test accuracy", "training samples", "wall s"], rows)
    write_result(
        "workloads",
        f"bench/workloads: Fashion-MNIST, ResNet-style CNN with BatchNorm, {WORKERS} workers x "
        f"batch {BATCH} x {steps} steps, Nesterov SGD lr {LR}, warmup {WARMUP} + cosine",
        text,
    )
    return text


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
