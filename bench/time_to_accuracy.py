"""Time to accuracy on a shaped 1 Gbit/s link: sgdjob fp32 and 1-bit against DDP and its hooks.

What is measured: 2 workers train one model on Fashion-MNIST, sync, the same everything
(data, partition and batch of every step, initial weights, optimizer, learning rate and
schedule, number of steps, evaluation steps and items), six ways:

- ``sgdjob sync fp32``, ``sgdjob sync 1-bit both ways`` (``compression.kind: onebit``,
  error feedback, ``serverToWorker: true``) and ``sgdjob sync 1-bit updates both ways`` (the
  same with ``send: updates``: each worker runs the optimizer and sends its step), 1 shard,
  as bare trainer processes
  (``bench.splitjob`` in a child process, ``bench.jobrun``): the shard in namespace A bound to
  A's address, both workers in namespace B, so every push and pull crosses the link;
- torch DDP (gloo) with each hook of ``bench.ddp_hooks`` (fp32, fp16, PowerSGD rank 1 and 4),
  from ``bench.ddp_train``: rank 0 in A, rank 1 in B.

The link: two network namespaces joined by a veth pair with tc tbf at ``--link`` (default
1gbit) in each direction (``bench.netns``; ``--link loopback`` runs without namespaces).

Models: ``mlp``, the ~10M-parameter MLP (784 -> 1024 x 10 -> 10, 10,260,490 parameters: the
built-in ``mlp`` over flattened 28 x 28 images) with Adam (a 10-layer ReLU MLP at torch's
default initialisation barely moves under plain SGD in a few hundred steps), and ``cnn``, the
built-in ResNet-style CNN with BatchNorm of ``bench.workloads`` (Nesterov SGD, warm-up then
cosine).

Every system evaluates the first ``--eval-samples`` test images every ``--eval-interval``
steps on worker/rank 0, inside the training loop, so evaluation time is *included* alike.
Times start at the end of the step-0 evaluation (after the first gradient), excluding process
start-up, data loading and connecting alike: sgdjob's from shard 0's metrics.jsonl eval lines,
DDP's from rank 0's clock. *samples/s*: samples from step 0 to the last periodic evaluation
over that time. *s to target*: the first evaluation at or above ``--target``. *final
accuracy*: the whole test set after the last step, after the same number of samples for all.

Bounded: ``--steps`` caps every run, ``--timeout`` kills a run that overstays (its row then
says failed); the namespaces and every process are removed on the way out, also on failure.

``python -m bench.time_to_accuracy [--models mlp cnn] [--link 1gbit]`` writes
``bench/results/time_to_accuracy.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import workloads
from bench.common import job
from bench.ddp_hooks import HOOKS, label
from bench.ddp_train import run_ddp_job
from bench.jobrun import JobRunError, run_job_process
from bench.netns import NetnsUnavailable, VethLink, veth_link
from bench.report import markdown_table, write_result
from bench.tta import (
    HEADERS,
    Outcome,
    ddp_series,
    rows,
    series_rate,
    sgdjob_series,
    steps_to,
    time_to,
)

WORKERS = 2
SGDJOB: dict[str, dict[str, Any]] = {
    "sgdjob sync fp32": {"kind": "none"},
    "sgdjob sync 1-bit both ways": {
        "kind": "onebit",
        "bucketSize": 512,
        "errorFeedback": True,
        "serverToWorker": True,
    },
    # The optimizer on each worker, its 1-bit step on the wire (bench.onebit_optimizers).
    "sgdjob sync 1-bit updates both ways": {
        "kind": "onebit",
        "bucketSize": 512,
        "errorFeedback": True,
        "serverToWorker": True,
        "send": "updates",
    },
}
# Per model: the target accuracy, and the defaults of a full run.
TARGETS = {"mlp": 0.75, "cnn": 0.80}
DEFAULT_STEPS = {"mlp": 600, "cnn": 300}


def workload(model: str, *, steps: int, eval_interval: int, eval_samples: int) -> dict[str, Any]:
    """The job spec of one model; DDP mirrors it (``bench.ddp_train``)."""
    if model == "cnn":
        spec = workloads.workload(steps)
        spec["parameterServers"] = {"shards": 1}
    elif model == "mlp":
        spec = {
            "model": {"builtin": "mlp", "hidden": [1024] * 10},
            "data": {"builtin": "fashionMnist"},
            "parameterServers": {"shards": 1},
            "workers": {"replicas": WORKERS},
            "training": {
                "maxSteps": steps,
                "batchSize": 32,
                "optimizer": "adam",
                "lr": 0.001,
            },
        }
    else:
        raise ValueError(f"--models: unknown model {model!r} (mlp, cnn)")
    spec["training"].update(
        {"mode": "sync", "evalInterval": eval_interval, "evalSamples": eval_samples, "seed": 0}
    )
    return spec


def _placement(link: VethLink | None) -> Any:
    if link is None:
        return {"split": {}, "master_addr": "127.0.0.1", "netns": None}
    split = {"shard_ns": link.ns[0], "worker_ns": link.ns[1], "shard_host": link.addrs[0]}
    return {"split": split, "master_addr": link.addrs[0], "netns": [*link.ns]}


def run_system(
    name: str,
    spec: dict[str, Any],
    link: VethLink | None,
    *,
    target: float,
    out: Path,
    port: int,
    timeout_s: float,
) -> Outcome:
    """One run of one system, and when it first reached ``target``."""
    where = _placement(link)
    batch = int(spec["training"]["batchSize"])
    if name in SGDJOB:
        spec = {**spec, "compression": SGDJOB[name]}
        summary = run_job_process(
            job("tta", spec), out, executor=False, split=where["split"], timeout_s=timeout_s
        )
        series = sgdjob_series(out / "metrics.jsonl", steps=int(spec["training"]["maxSteps"]))
        final = float(summary["finalAccuracy"])
    else:
        hook = next(h for h in HOOKS if label(h) == name)
        r = run_ddp_job(
            job("tta-ddp", spec),
            hook=hook,
            master_addr=where["master_addr"],
            port=port,
            netns=where["netns"],
            timeout_s=timeout_s,
        )
        series = ddp_series(r["evals"])
        final = float(r["final_accuracy"])
    return Outcome(
        name=name,
        samples_per_s=series_rate(series, workers=WORKERS, batch=batch),
        tta_s=time_to(series, target),
        tta_step=steps_to(series, target),
        final_accuracy=final,
    )


@contextlib.contextmanager
def _link(rate: str) -> Iterator[VethLink | None]:
    if rate == "loopback":
        yield None
    else:
        with veth_link(rate) as link:
            yield link


def measure(model: str, args: argparse.Namespace, tmp: Path, notes: list[str]) -> str:
    steps = args.steps or DEFAULT_STEPS[model]
    target = args.target if args.target is not None else TARGETS[model]
    spec = workload(
        model, steps=steps, eval_interval=args.eval_interval, eval_samples=args.eval_samples
    )
    names = [*SGDJOB, *(label(h) for h in HOOKS)]
    outcomes: list[Outcome] = []
    with _link(args.link) as link:
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            try:
                o = run_system(
                    name,
                    spec,
                    link,
                    target=target,
                    out=tmp / f"{model}-{i}",
                    port=29500 + i,
                    timeout_s=args.timeout,
                )
            except (JobRunError, RuntimeError, ValueError) as exc:  # the rest still run
                notes.append(f"{model}, {name}: failed: {str(exc)[:400]}")
                print(notes[-1], flush=True)
                continue
            outcomes.append(o)
            print(f"{model} {name}: {o} ({time.perf_counter() - t0:.0f}s)", flush=True)
    table = markdown_table(
        HEADERS, rows(outcomes, ddp=label("none"), powersgd=label("powersgd-r4"))
    )
    t = spec["training"]
    return (
        f"## {model}: target test accuracy {target} on the first {args.eval_samples} test "
        f"images, {args.link}\n\n{table}\n\n{WORKERS} workers x batch {t['batchSize']} x "
        f"{steps} steps, {t.get('optimizer', 'sgd')} lr {t['lr']}, evaluation every "
        f"{args.eval_interval} steps (included in the times, alike); final accuracy on all "
        "10,000 test images."
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp", "cnn"])
    parser.add_argument("--link", default="1gbit", help="tc rate, or loopback")
    parser.add_argument("--steps", type=int, default=None, help="steps per worker (cap)")
    parser.add_argument("--target", type=float, default=None, help="test accuracy to reach")
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = parser.parse_args([] if argv is None else argv)
    for m in args.models:
        if m not in TARGETS:
            raise ValueError(f"--models: unknown model {m!r} (mlp, cnn)")
    notes: list[str] = []
    parts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        for model in args.models:
            try:
                parts.append(measure(model, args, Path(tmp), notes))
            except NetnsUnavailable as exc:
                notes.append(f"{model} on veth {args.link}: skipped: {exc}")
                print(notes[-1], flush=True)
    body = "\n\n".join(parts)
    body += (
        "\n\n*samples/s*: step 0 to the last periodic evaluation, evaluations included. "
        "*x DDP fp32*: over plain DDP's samples/s. *s to target*: seconds from the end of the "
        "step-0 evaluation to the first evaluation at or above the target; *TTA / ...*: "
        "that time over the baseline's (below 1 is faster). PowerSGD compresses from step 2 "
        "(bench.ddp_hooks). sgdjob: 1 shard in one namespace, both workers in the other, "
        "ZeroMQ CURVE on (the default); DDP: rank 0 and rank 1 on either side."
    )
    for note in notes:
        body += f"\n\n{note}"
    write_result(
        "time_to_accuracy",
        f"bench/time_to_accuracy: Fashion-MNIST, sgdjob vs DDP and its hooks, {args.link}",
        body,
    )
    return body


if __name__ == "__main__":
    main(sys.argv[1:])
