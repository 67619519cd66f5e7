"""Sync sgdjob against torch DDP (gloo): samples/s of the same ~10M-parameter MLP on 127.0.0.1.

What is compared: a sync sgdjob job run through the local executor (``sgdjob run``'s code
path: 1 or 2 parameter-server shards, 2 workers) and ``bench.ddp.run_ddp`` (2 gloo ranks,
CPU), both training the same MLP (1024-wide, 10 hidden layers, 10-class head: 10,506,250
parameters) with plain SGD, the same batch per worker, the same number of steps, one torch
thread per process, measured in the same run and interleaved round by round so that other
load on a shared machine hits every system alike.

The headline number uses the same window in both: ``--steps`` timed steps after ``--warmup``
untimed ones. DDP times its step loop between two barriers; for sgdjob the window comes from
shard 0's ``metrics.jsonl`` (the time step ``warmup`` closed to the time the last step closed,
``bench.common.steady_rate``). Each row is the median over ``--rounds`` rounds (min-max
beside it). For transparency the table also gives the coordinator's own ``samplesPerSecond``
from ``summary.json``, which divides all samples by the whole life of shard 0 (process
start-up, worker imports and hello, warm-up, final evaluation and model write), and the wall
time of the whole call for both systems (process start to exit).

The baseline is DDP: it all-reduces gradient buckets while backward is still running and
needs no extra processes; sgdjob pushes the whole gradient after backward, shards average
and apply the update, and workers pull the parameters back, with the shard processes sharing
the same CPUs.

``python -m bench.sync_vs_ddp [--rounds 3] [--steps 25] [--warmup 3]`` writes
``bench/results/sync_vs_ddp.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import job, mlp_workload, run_job, steady_rate
from bench.ddp import free_port, mlp_params, run_ddp
from bench.report import markdown_table, write_result
from bench.splitjob import run_split_job

HIDDEN, LAYERS, WORKERS = 1024, 10, 2


def number(x: object) -> float:
    if not isinstance(x, (int, float)):
        raise TypeError(f"expected a number, got {x!r}")
    return float(x)


def sgdjob_round(
    shards: int,
    args: argparse.Namespace,
    out: Path,
    *,
    executor: bool = True,
    curve: bool = True,
) -> dict[str, float]:
    total = args.warmup + args.steps
    spec = mlp_workload(
        hidden=HIDDEN,
        layers=LAYERS,
        batch=args.batch,
        steps=total,
        workers=WORKERS,
        shards=shards,
    )
    spec["security"] = {"curve": curve}
    doc = job(f"sync-vs-ddp-{shards}", spec)
    t0 = time.perf_counter()
    summary = run_job(doc, out) if executor else run_split_job(doc, out)
    wall = time.perf_counter() - t0
    rate = steady_rate(out, warmup=args.warmup, workers=WORKERS, batch=args.batch)
    return {
        "samples_per_s": rate.samples_per_s,
        "step_ms": rate.step_ms,
        "timed_steps": rate.last - rate.first,
        "whole_run": float(summary["samplesPerSecond"]),
        "wall_s": wall,
    }


def ddp_round(args: argparse.Namespace) -> dict[str, float]:
    t0 = time.perf_counter()
    r = run_ddp(
        workers=WORKERS,
        hidden=HIDDEN,
        layers=LAYERS,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        master_addr="127.0.0.1",
        port=free_port(),
    )
    return {
        "samples_per_s": number(r["samples_per_s"]),
        "step_ms": number(r["step_ms"]),
        "timed_steps": number(r["steps"]),
        "whole_run": float("nan"),
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    args = parser.parse_args([] if argv is None else argv)
    ddp = "torch DDP (gloo)"
    systems: dict[str, Callable[[Path], dict[str, float]]] = {
        "sgdjob sync, 1 shard": lambda out: sgdjob_round(1, args, out),
        "sgdjob sync, 2 shards": lambda out: sgdjob_round(2, args, out),
        "sgdjob sync, 2 shards, CURVE off": lambda out: sgdjob_round(2, args, out, curve=False),
        "sgdjob sync, 1 shard, no executor": lambda out: sgdjob_round(1, args, out, executor=False),
        ddp: lambda out: ddp_round(args),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory(prefix="sync-vs-ddp-") as tmp:
        for r in range(args.rounds):
            for i, (name, run) in enumerate(systems.items()):
                results[name].append(run(Path(tmp) / f"r{r}-{i}"))
                print(f"round {r}: {name}: {results[name][-1]}", flush=True)
    ddp_median = statistics.median(x["samples_per_s"] for x in results[ddp])
    rows: list[list[object]] = []
    for name in systems:
        runs = results[name]
        sps = [x["samples_per_s"] for x in runs]
        med = statistics.median(sps)
        whole = [x["whole_run"] for x in runs]
        rows.append(
            [
                name,
                f"{statistics.median(x['step_ms'] for x in runs):.0f}",
                f"{med:.0f}",
                f"{min(sps):.0f}-{max(sps):.0f}",
                f"{med / ddp_median:.2f}",
                "-" if name == ddp else f"{statistics.median(whole):.0f}",
                f"{statistics.median(x['wall_s'] for x in runs):.1f}",
            ]
        )
    body = markdown_table(
        [
            "system (2 workers)",
            "step ms",
            "samples/s",
            "min-max",
            "vs DDP",
            "coordinator whole-run samples/s",
            "wall s",
        ],
        rows,
    )
    body += (
        f"\n\nMLP 1024 x {LAYERS} + head ({mlp_params(HIDDEN, LAYERS):,} parameters), "
        f"batch {args.batch} per worker, {WORKERS} workers, plain SGD, CPU, torch threads 1 per "
        f"process; {args.warmup} warm-up + {args.steps} timed steps per run; median of "
        f"{args.rounds} interleaved rounds."
        "\n\n*samples/s* and *step ms*: the timed steps only, in both systems (DDP: its step "
        "loop between barriers; sgdjob: shard 0's metrics.jsonl from the close of the last "
        "warm-up step to the close of the last step). *vs DDP*: samples/s over DDP's median. "
        "*coordinator whole-run samples/s*: sgdjob's summary.json figure, all samples over "
        "shard 0's whole life (start-up, hello, warm-up, final evaluation and model write "
        "included), so it is lower. *wall s*: the whole call, process start to exit, in both."
        "\n\n*no executor*: the same job as bare `sgdjob trainer` processes (bench.splitjob, "
        "the harness bench.compression uses), with nothing polling the coordinator (the "
        "local executor polls /status 4 times a second). Every sgdjob row runs with ZeroMQ "
        "CURVE, the default, except *CURVE off*: encrypting 42 MB each way per worker per step "
        "is the largest cost on loopback; DDP's gloo traffic is not encrypted. Rows whose "
        "min-max ranges overlap are not distinguishable on this shared machine.\n"
    )
    write_result(
        "sync_vs_ddp",
        "bench/sync_vs_ddp: sync sgdjob vs torch DDP (gloo) on 127.0.0.1, ~10M parameters",
        body,
    )
    return body


if __name__ == "__main__":
    main(sys.argv[1:])
