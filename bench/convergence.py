"""Convergence of every mode on digits and the teacher task: accuracy, steps, time, staleness.

Rows: sync; sync with a straggler, without and with one backup worker (same 4 processes);
async with the none / zhang / odena rules at N = 2, 4, 8 workers; downpour. Each worker runs
the same number of steps, so every row sees the same number of samples per worker.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import job, run_job
from bench.report import markdown_table, write_result

TASKS: dict[str, dict[str, Any]] = {
    "digits": {"model": {"builtin": "mlp", "hidden": [64]}, "data": {"builtin": "digits"}},
    "teacher": {
        "model": {"builtin": "mlp", "hidden": [128]},
        "data": {
            "builtin": "teacher",
            "teacher": {
                "inputDim": 64,
                "hiddenDim": 128,
                "classes": 10,
                "trainSamples": 8192,
                "testSamples": 2048,
            },
        },
    },
}
STEPS = 150
STRAGGLER_MS = 40


def configs(quick: bool) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, training overrides, other spec overrides)."""
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("sync N=4", {"mode": "sync"}, {"workers": {"replicas": 4}}),
        (
            "sync N=4, straggler",
            {"mode": "sync"},
            {"workers": {"replicas": 4}, "debug": {"slowWorkers": {3: STRAGGLER_MS}}},
        ),
        (
            "sync N=3+1 backup, straggler",
            {"mode": "sync", "backupWorkers": 1},
            {"workers": {"replicas": 3}, "debug": {"slowWorkers": {3: STRAGGLER_MS}}},
        ),
    ]
    for n in (2, 4) if quick else (2, 4, 8):
        for rule in ("none", "zhang", "odena"):
            extra = {"odenaScale": 20.0} if rule == "odena" else {}
            out.append(
                (
                    f"async {rule} N={n}",
                    {"mode": "async", "staleness": rule, **extra},
                    {"workers": {"replicas": n}},
                )
            )
    for rule in ("none", "zhang"):
        out.append(
            (
                f"downpour {rule} N=4 fetch 4 push 2",
                {"mode": "downpour", "fetchEvery": 4, "pushEvery": 2, "staleness": rule},
                {"workers": {"replicas": 4}},
            )
        )
    return out


def main(quick: bool = False) -> str:
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for task, base in TASKS.items():
            rows = []
            for i, (label, training, other) in enumerate(configs(quick)):
                spec = {
                    **base,
                    "parameterServers": {"shards": 2},
                    **other,
                    "training": {
                        "maxSteps": STEPS,
                        "batchSize": 32,
                        "lr": 0.05,
                        "momentum": 0.9,
                        "evalInterval": STEPS,
                        **training,
                    },
                }
                s = run_job(job(f"conv-{i}", spec), Path(tmp) / f"{task}-{i}")
                dropped = sum(w["droppedGradients"] for w in s["workerStats"].values())
                rows.append(
                    (
                        label,
                        s["finalAccuracy"],
                        s["version"],
                        s["wallTimeSeconds"],
                        s["staleness"]["mean"],
                        s["staleness"]["p99"],
                        dropped,
                    )
                )
            sections.append(
                f"### {task}\n\n"
                + markdown_table(
                    [
                        "mode",
                        "final accuracy",
                        "updates applied",
                        "wall s",
                        "staleness mean",
                        "staleness p99",
                        "dropped gradients",
                    ],
                    rows,
                )
            )
    text = "\n\n".join(sections)
    write_result(
        "convergence",
        f"bench/convergence: {STEPS} steps per worker, batch 32, lr 0.05, momentum 0.9, "
        f"2 shards; the straggler sleeps {STRAGGLER_MS} ms a step",
        text,
    )
    return text


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
