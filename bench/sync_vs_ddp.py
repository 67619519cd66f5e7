"""Sync sgdjob against torch DDP (gloo): samples/s of the same ~10M-parameter MLP on 127.0.0.1.

What is compared: a sync sgdjob job run through the local executor (``sgdjob run``'s code
path, in a child process: ``bench.jobrun``; 1 or 2 parameter-server shards, 2 workers, CURVE
on and off) and ``bench.ddp.run_ddp`` (2 gloo ranks, CPU) with each of its gradient hooks
(``bench.ddp_hooks``: fp32, fp16, PowerSGD rank 1 and 4), all training the same MLP
(1024-wide, 10 hidden layers, 10-class head: 10,506,250 parameters) with plain SGD, the same
batch per worker, the same number of steps, one torch thread per process, measured in the
same run and interleaved round by round so that other load on a shared machine hits every
system alike. Besides samples/s, every system's CPU seconds per 1,000 samples (``bench.cpu``:
user + sys of every process, start-up cancelled by a second, shorter run).

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
import functools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import job, mlp_workload, steady_rate
from bench.cpu import CpuSample, cpu_per_1000, measured
from bench.ddp import free_port, mlp_params, run_ddp
from bench.ddp_hooks import HOOKS, POWERSGD_START_ITER, label
from bench.jobrun import run_job_process
from bench.loopback import LoopbackSample, mb_per_step, tx_bytes
from bench.report import markdown_table, write_result

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
    steps: int,
    executor: bool = True,
    curve: bool = True,
) -> dict[str, float]:
    """One sgdjob run of ``warmup + steps`` steps in a child process (``bench.jobrun``)."""
    total = args.warmup + steps
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
    lo0 = tx_bytes()
    summary, cpu_s = measured(lambda: run_job_process(doc, out, executor=executor))
    wall = time.perf_counter() - t0
    lo = _grown(lo0)
    rate = steady_rate(out, warmup=args.warmup, workers=WORKERS, batch=args.batch)
    return {
        "samples_per_s": rate.samples_per_s,
        "step_ms": rate.step_ms,
        "timed_steps": rate.last - rate.first,
        "whole_run": float(summary["samplesPerSecond"]),
        "wall_s": wall,
        "cpu_s": cpu_s,
        "samples": float(WORKERS * args.batch * total),
        "steps": float(total),
        "lo_bytes": lo,
    }


def _grown(before: int | None) -> float:
    """Loopback bytes sent since ``before`` (NaN where the counter is not readable)."""
    after = tx_bytes()
    return float("nan") if before is None or after is None else float(after - before)


def ddp_round(args: argparse.Namespace, *, steps: int, hook: str) -> dict[str, float]:
    t0 = time.perf_counter()
    lo0 = tx_bytes()
    r, cpu_s = measured(
        lambda: run_ddp(
            workers=WORKERS,
            hidden=HIDDEN,
            layers=LAYERS,
            batch=args.batch,
            steps=steps,
            warmup=args.warmup,
            master_addr="127.0.0.1",
            port=free_port(),
            hook=hook,
        )
    )
    return {
        "samples_per_s": number(r["samples_per_s"]),
        "step_ms": number(r["step_ms"]),
        "timed_steps": number(r["steps"]),
        "whole_run": float("nan"),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": cpu_s,
        "samples": float(WORKERS * args.batch * (args.warmup + steps)),
        "steps": float(args.warmup + steps),
        "lo_bytes": _grown(lo0),
    }


Runner = Callable[[Path, int], dict[str, float]]


def systems(args: argparse.Namespace) -> dict[str, Runner]:
    """Every system of the table: ``run(out, timed_steps)``."""
    table: dict[str, Runner] = {
        "sgdjob sync, 1 shard": lambda out, n: sgdjob_round(1, args, out, steps=n),
        "sgdjob sync, 2 shards": lambda out, n: sgdjob_round(2, args, out, steps=n),
        "sgdjob sync, 2 shards, CURVE off": lambda out, n: sgdjob_round(
            2, args, out, steps=n, curve=False
        ),
        "sgdjob sync, 1 shard, CURVE off": lambda out, n: sgdjob_round(
            1, args, out, steps=n, curve=False
        ),
        "sgdjob sync, 1 shard, no executor": lambda out, n: sgdjob_round(
            1, args, out, steps=n, executor=False
        ),
    }
    for hook in HOOKS:
        table[label(hook)] = functools.partial(_ddp_runner, args, hook)
    return table


def _ddp_runner(args: argparse.Namespace, hook: str, out: Path, steps: int) -> dict[str, float]:
    del out  # DDP writes nothing
    return ddp_round(args, steps=steps, hook=hook)


def summarize(
    results: dict[str, list[dict[str, float]]],
    cpu: dict[str, list[float]],
    lo: dict[str, list[float]] | None = None,
) -> list[list[object]]:
    """One table row per system: medians over rounds, ratios to DDP fp32's medians;
    ``lo``: each round's loopback MB per step (``bench.loopback``), where measured."""
    base = label("none")
    ddp_sps = statistics.median(x["samples_per_s"] for x in results[base])
    ddp_cpu = statistics.median(cpu[base]) if cpu.get(base) else None
    rows: list[list[object]] = []
    for name, runs in results.items():
        sps = [x["samples_per_s"] for x in runs]
        med = statistics.median(sps)
        whole = [x["whole_run"] for x in runs]
        per_k = statistics.median(cpu[name]) if cpu.get(name) else None
        mb = [x for x in (lo or {}).get(name, []) if not math.isnan(x)]
        rows.append(
            [
                name,
                f"{statistics.median(x['step_ms'] for x in runs):.0f}",
                f"{med:.0f}",
                f"{min(sps):.0f}-{max(sps):.0f}",
                f"{med / ddp_sps:.2f}",
                "-" if per_k is None else f"{per_k:.3f}",
                "-" if per_k is None or not ddp_cpu else f"{per_k / ddp_cpu:.2f}",
                f"{statistics.median(mb):.1f}" if mb else "-",
                "-" if name.startswith("torch") else f"{statistics.median(whole):.0f}",
                f"{statistics.median(x['wall_s'] for x in runs):.1f}",
            ]
        )
    return rows


HEADERS = [
    "system (2 workers)",
    "step ms",
    "samples/s",
    "min-max",
    "vs DDP fp32",
    "CPU s / 1000 samples",
    "CPU vs DDP fp32",
    "loopback MB / step",
    "coordinator whole-run samples/s",
    "wall s",
]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    parser.add_argument(
        "--short-steps",
        type=int,
        default=None,
        help="timed steps of the second, shorter run for the CPU figure (default steps/2; "
        "0: no CPU figure)",
    )
    args = parser.parse_args([] if argv is None else argv)
    short = args.steps // 2 if args.short_steps is None else args.short_steps
    if short >= args.steps:
        raise ValueError(f"--short-steps {short} must be below --steps {args.steps}")
    if args.warmup < POWERSGD_START_ITER:
        raise ValueError(f"--warmup must be at least {POWERSGD_START_ITER} (PowerSGD's start)")
    table = systems(args)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in table}
    cpu: dict[str, list[float]] = {name: [] for name in table}
    lo: dict[str, list[float]] = {name: [] for name in table}
    with tempfile.TemporaryDirectory(prefix="sync-vs-ddp-") as tmp:
        for r in range(args.rounds):
            for i, (name, run) in enumerate(table.items()):
                if short > 0:
                    s = run(Path(tmp) / f"r{r}-{i}-short", short)
                long = run(Path(tmp) / f"r{r}-{i}", args.steps)
                results[name].append(long)
                if short > 0:
                    cpu[name].append(
                        cpu_per_1000(
                            CpuSample(s["cpu_s"], int(s["samples"])),
                            CpuSample(long["cpu_s"], int(long["samples"])),
                        )
                    )
                    if not math.isnan(s["lo_bytes"] + long["lo_bytes"]):
                        lo[name].append(
                            mb_per_step(
                                LoopbackSample(int(s["lo_bytes"]), int(s["steps"])),
                                LoopbackSample(int(long["lo_bytes"]), int(long["steps"])),
                            )
                        )
                print(f"round {r}: {name}: {long} cpu/1000 {cpu[name][-1:]}", flush=True)
    body = markdown_table(HEADERS, summarize(results, cpu, lo))
    body += (
        f"\n\nMLP 1024 x {LAYERS} + head ({mlp_params(HIDDEN, LAYERS):,} parameters), "
        f"batch {args.batch} per worker, {WORKERS} workers, plain SGD, CPU, torch threads 1 per "
        f"process; {args.warmup} warm-up + {args.steps} timed steps per run; median of "
        f"{args.rounds} interleaved rounds."
        "\n\n*samples/s* and *step ms*: the timed steps only, in both systems (DDP: its step "
        "loop between barriers; sgdjob: shard 0's metrics.jsonl from the close of the last "
        "warm-up step to the close of the last step). *vs DDP fp32*: samples/s over plain "
        "DDP's median. *coordinator whole-run samples/s*: sgdjob's summary.json figure, all "
        "samples over shard 0's whole life (start-up, hello, warm-up, final evaluation and "
        "model write included), so it is lower. *wall s*: the whole call, process start to "
        "exit, in both."
        "\n\n*DDP rows*: plain fp32 all-reduce, torch's fp16 compression hook, and PowerSGD "
        f"(rank 1, 4; error feedback and warm start on) compressing from step "
        f"{POWERSGD_START_ITER} (the earliest torch allows), so every timed step is compressed."
        "\n\n*CPU s / 1000 samples*: user + sys seconds of every process of the run (for "
        "sgdjob the whole job runs in a child process, executor and its polling thread, shards "
        "and workers included; for DDP both ranks), counted from the kernel's rusage of the "
        f"reaped children. Each system also runs a shorter run ({args.warmup} + {short} "
        "steps) in the same round; the figure is (CPU(long) - CPU(short)) / (samples(long) - "
        "samples(short)) x 1000, so start-up, imports, hello and the final evaluation cancel. "
        "Median over the rounds; *CPU vs DDP fp32*: over plain DDP's median."
        "\n\n*loopback MB / step*: bytes sent over 127.0.0.1 per training step of both "
        "workers (bench.loopback: the growth of lo's transmit counter, from the same short and "
        "long runs, so start-up cancels). A parameter server moves every gradient byte to a "
        "shard and every parameter byte back: each worker's whole vector both ways. A ring "
        "all-reduce over 2 ranks sends from each rank as many bytes as its vector holds, half "
        "in the reduce-scatter and half in the all-gather."
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
