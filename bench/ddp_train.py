"""DDP on real data, from an sgdjob spec: the baseline of the time-to-accuracy benches.

``run_ddp_job(doc, hook=...)`` trains the job's model on the job's data with torch
``DistributedDataParallel`` (gloo, CPU, one process per worker, torch threads 1), exactly as
the job's sync workers and shards would:

- the same data (``sgdjob.data.load_data``), model and initial weights (``build_model`` with
  the job seed), and the same partition and batch of every step (``partition_for``: rank r
  trains on worker r's shard);
- the same update: the torch optimizer the shards use (``sgdjob.optim``: SGD with the spec's
  momentum, Nesterov flag and weight decay, or Adam / AdamW with its betas, eps and weight
  decay), the learning rate of step s from ``sgdjob.schedule.Schedule`` (the closed form the
  shards use); DDP averages the gradients across ranks as the shards do;
- the same evaluations: rank 0 evaluates the first ``evalSamples`` test items (or all) at
  every step s with ``s % evalInterval == 0``, on the parameters after s updates, right after
  step s's gradient (sgdjob's worker 0 does it after pushing that gradient), and the whole
  test set after the last step. The evaluations are on the critical path in both systems.

Times are rank 0's ``perf_counter`` from the end of the step-0 evaluation, the origin the
time-to-accuracy bench uses for sgdjob too (shard 0's eval lines in metrics.jsonl), so
process start-up, data loading and the first connection are excluded alike.

The gradients go through a compression hook of ``bench.ddp_hooks`` (``hook``). Only sync SGD
with fp32 precision and no clipping is mirrored; anything else in the spec is refused.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.ddp import RESULT_PREFIX, leave_finished_rank, run_ranks
from bench.ddp_hooks import HOOKS, validate_hook, wrap


def check_mirrorable(doc: dict[str, Any]) -> None:
    """ValueError naming the field when the spec uses something these ranks do not mirror."""
    from sgdjob.api.validation import parse_job

    spec = parse_job(doc).spec
    t = spec.training
    wrong = {
        "spec.training.mode": (t.mode, "sync"),
        "spec.training.precision": (t.precision, "float32"),
        "spec.training.gradClipNorm": (t.grad_clip_norm, None),
        "spec.training.task": (t.task, "classification"),
        "spec.training.backupWorkers": (t.backup_workers, 0),
    }
    for name, (got, want) in wrong.items():
        if got != want:
            raise ValueError(f"{name} must be {want!r} for the DDP baseline; got {got!r}")
    if t.max_steps is None:
        raise ValueError("spec.training.maxSteps must be set for the DDP baseline")


def run_ddp_job(
    doc: dict[str, Any],
    *,
    hook: str = "none",
    master_addr: str,
    port: int,
    netns: list[str | None] | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Train ``doc``'s job with DDP; rank 0's result.

    Keys: ``evals`` (``[step, seconds from the step-0 evaluation, accuracy]`` per periodic
    evaluation), ``final_accuracy`` (whole test set after the last step), ``train_seconds``
    (step-0 evaluation to the end of the last step), ``steps``, ``workers``, ``batch``,
    ``hook``, ``link``.
    """
    validate_hook(hook)
    check_mirrorable(doc)
    workers = int(doc["spec"]["workers"]["replicas"])
    with tempfile.TemporaryDirectory(prefix="ddp-job-") as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(doc), encoding="utf-8")
        argv = ["--job", str(path), "--hook", hook, "--master-addr", master_addr]
        argv += ["--port", str(port), "--workers", str(workers)]
        result = run_ranks(
            module="bench.ddp_train",
            rank_argv=argv,
            workers=workers,
            netns=netns,
            timeout_s=timeout_s,
        )
    return dict(result)


def _rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from sgdjob.api.validation import parse_job
    from sgdjob.data import eval_batches, gather, load_data, partition_for
    from sgdjob.models import build_model
    from sgdjob.schedule import Schedule
    from sgdjob.tasks import CLASSIFICATION, evaluate

    torch.set_num_threads(1)
    spec = parse_job(json.loads(Path(args.job).read_text(encoding="utf-8"))).spec
    t = spec.training
    steps = int(t.max_steps or 0)
    data = load_data(spec.data, seed=t.seed, task=t.task)
    model = build_model(
        spec.model, input_shape=data.input_shape, num_classes=data.num_classes, seed=t.seed
    )
    part = partition_for(
        data.n_train, workers=args.workers, index=args.rank, batch_size=t.batch_size, seed=t.seed
    )
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master_addr}:{args.port}",
        rank=args.rank,
        world_size=args.workers,
        timeout=timedelta(seconds=300),
    )
    try:
        ddp = wrap(model, args.hook)
        opt: torch.optim.Optimizer
        if t.optimizer == "sgd":
            opt = torch.optim.SGD(
                ddp.parameters(),
                lr=t.lr,
                momentum=t.momentum,
                nesterov=t.nesterov,
                weight_decay=t.weight_decay,
            )
        else:  # the shards' Adam / AdamW (sgdjob.optim), with the spec's hyper-parameters
            cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
            opt = cls(
                ddp.parameters(),
                lr=t.lr,
                betas=(t.beta1, t.beta2),
                eps=t.eps,
                weight_decay=t.weight_decay,
            )
        schedule = Schedule(t.lr, t.schedule)
        cpu = torch.device("cpu")

        def accuracy(limit: int | None) -> float:
            batches = eval_batches(data.test, limit=limit, batch=512)
            return float(evaluate(model, CLASSIFICATION, batches, device=cpu).metric)

        evals: list[list[float]] = []
        origin = 0.0
        for step in range(steps):
            x, y = gather(data.train, torch.from_numpy(part.batch(step)))
            opt.zero_grad(set_to_none=True)
            CLASSIFICATION.loss(ddp(x), y).backward()  # DDP all-reduces (or compresses) here
            if args.rank == 0 and step % t.eval_interval == 0:
                acc = accuracy(t.eval_samples)  # parameters after `step` updates
                now = time.perf_counter()
                origin = now if step == 0 else origin
                evals.append([step, now - origin, acc])
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(step, total_steps=steps)
            opt.step()
        train_seconds = time.perf_counter() - origin
        if args.rank == 0:
            result = {
                "evals": evals,
                "final_accuracy": accuracy(None),
                "train_seconds": train_seconds,
                "steps": steps,
                "workers": args.workers,
                "batch": t.batch_size,
                "hook": args.hook,
            }
            print(RESULT_PREFIX + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True, help="internal: this DDP rank")
    parser.add_argument("--job", required=True, help="the job document, as JSON")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--hook", default="none", type=validate_hook, help=", ".join(HOOKS))
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    _rank_main(parser.parse_args(argv))
    leave_finished_rank()


if __name__ == "__main__":
    main()
