"""The shard's update rule: time per step of ``sgdjob.optim.SliceOptimizer`` on one slice.

A sync step closes on the shard with the update rule over its whole slice, while every worker
waits for the answer to its pull, so the rule's time is on each step's critical path. The
shards run torch's own optimizers with its fused kernels (``sgdjob.optim.torch_optimizer``),
except plain SGD, one pass either way. The baseline, timed in the same run on the same
vector, is the same optimizer with torch's single-tensor kernels: what ``torch.optim`` runs
on CPU tensors by default, and so what a DDP worker's ``opt.step()`` runs unless it asks for
``fused=True``.

Each row is one optimizer setting of the spec over a slice of the ~10M-parameter MLP of the
throughput benches (one shard's slice with one shard), on one thread, as the trainer's
processes run (``OMP_NUM_THREADS=1``), with glibc's allocator tuned as in a shard process
(``sgdjob.transport.keep_freed_buffers``: the single-tensor kernels' temporaries are reused
heap rather than fresh mappings). Both kernels are checked against each other on the
timed vectors: the same parameters to within float rounding (the bits are asserted equal in
tests/test_optim.py for the fused kernels against torch's fused optimizer).

``python -m bench.update_rule [--elements N] [--repeats R]`` writes
``bench/results/update_rule.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from bench.ddp import mlp_params
from bench.report import markdown_table, write_result
from sgdjob.api.types import TrainingSpec
from sgdjob.optim import SliceOptimizer, fused_kernels, torch_optimizer
from sgdjob.transport import keep_freed_buffers

HIDDEN, LAYERS = 1024, 10
SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("SGD, no momentum (the throughput benches' rule)", {"momentum": 0.0}),
    ("SGD, momentum 0.9", {"momentum": 0.9}),
    ("SGD, momentum 0.9, weight decay 1e-4", {"momentum": 0.9, "weightDecay": 1e-4}),
    (
        "SGD, Nesterov 0.9, weight decay 1e-4",
        {"momentum": 0.9, "nesterov": True, "weightDecay": 1e-4},
    ),
    ("Adam", {"optimizer": "adam", "momentum": 0.0}),
    ("AdamW, weight decay 0.01", {"optimizer": "adamw", "momentum": 0.0, "weightDecay": 0.01}),
]


def rebuild(opt: SliceOptimizer, spec: TrainingSpec, *, fused: bool) -> None:
    """Rebuild ``opt``'s torch optimizer with the fused or the single-tensor kernels, on the
    same state buffers."""
    new = torch_optimizer(opt.param, spec, fused=fused)
    new.state[opt.param] = opt.opt.state[opt.param]  # the same buffers, used in place
    opt.opt = new


def time_steps(opt: SliceOptimizer, grads: list[np.ndarray], repeats: int) -> float:
    """Median seconds of one ``opt.step`` over ``repeats`` steps, after two untimed ones."""
    for g in grads[:2]:
        opt.step(g, lr=0.01)
    times = []
    for i in range(repeats):
        g = grads[i % len(grads)]
        t0 = time.perf_counter()
        opt.step(g, lr=0.01)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(elements: int, repeats: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(elements, dtype=np.float32)
    grads = [rng.standard_normal(elements, dtype=np.float32) * 0.1 for _ in range(3)]
    rows = []
    for label, over in SETTINGS:
        spec = TrainingSpec.model_validate({"maxSteps": 10, "lr": 0.01, **over})
        chosen = "fused" if fused_kernels(spec) else "single-tensor"
        runs: dict[str, tuple[float, np.ndarray]] = {}
        # Interleaved: fused, single-tensor, fused, single-tensor; the faster of each pair.
        for _ in range(2):
            for kind in ("fused", "single"):
                params = p0.copy()
                opt = SliceOptimizer(params, trainable=elements, spec=spec)
                rebuild(opt, spec, fused=kind == "fused")
                s = time_steps(opt, grads, repeats)
                best = runs.get(kind)
                runs[kind] = (min(s, best[0]) if best else s, params)
        fused_s, fused_p = runs["fused"]
        single_s, single_p = runs["single"]
        np.testing.assert_allclose(fused_p, single_p, rtol=1e-5, atol=1e-6)
        gbps = 4 * elements / fused_s / 1e9
        rows.append(
            [
                label,
                f"{single_s * 1e3:.1f}",
                f"{fused_s * 1e3:.1f}",
                f"{single_s / fused_s:.2f}",
                f"{gbps:.1f}",
                chosen,
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.update_rule")
    ap.add_argument("--elements", type=int, default=mlp_params(HIDDEN, LAYERS))
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_buffers()  # glibc tuned as in a shard process (sgdjob.transport.make_context)
    rows = measure(args.elements, args.repeats)
    body = markdown_table(
        [
            f"update rule, {args.elements / 1e6:.1f} M elements, one thread",
            "single-tensor ms",
            "fused ms",
            "speed-up",
            "fused GB/s of parameters",
            "sgdjob's shards run",
        ],
        rows,
    )
    body += (
        "\n\n*single-tensor*: torch.optim's default on CPU tensors (what a DDP worker's "
        "`opt.step()` runs unless it asks for `fused=True`); *fused*: `fused=True`. The shards "
        "run the fused kernels except for plain SGD, one pass either way. Median of the timed "
        "steps, the faster of two interleaved rounds; both kernels end on the same parameters "
        "to within float rounding."
    )
    write_result("update_rule", "bench/update_rule: the shard's update rule per step", body)
    return body


if __name__ == "__main__":
    main(sys.argv[1:])
