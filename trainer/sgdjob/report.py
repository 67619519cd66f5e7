"""What a finished local run shows a person: the summary table and the loss/metric PNG.

The held-out metric is the task's (accuracy, rmse, bitsPerToken, or a custom task's name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line after a crash is not fatal to the report
    return rows


def summary_table(summary: dict[str, Any], *, name: str) -> str:
    def fmt(v: Any, spec: str = "") -> str:
        if v is None:
            return "-"
        return format(v, spec) if spec else str(v)

    metric = summary.get("metric", "accuracy")
    rows = [
        ("job", name),
        ("mode", summary.get("mode")),
        (
            "shards x workers",
            f"{summary.get('shards')} x {summary.get('workers')}"
            + (f" (+{summary['backupWorkers']} backup)" if summary.get("backupWorkers") else ""),
        ),
        ("steps per worker", fmt(summary.get("stepsPerWorker"))),
        ("parameter version", fmt(summary.get("version"))),
        (
            f"final test {metric}",
            fmt(summary.get("finalMetric", summary.get("finalAccuracy")), ".4f"),
        ),
        ("final test loss", fmt(summary.get("finalTestLoss"), ".4f")),
        ("train loss", fmt(summary.get("trainLoss"), ".4f")),
        ("wall time (s)", fmt(summary.get("wallTimeSeconds"), ".1f")),
        ("samples/s", fmt(summary.get("samplesPerSecond"), ".0f")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def plot_curves(metrics: list[dict[str, Any]], path: Path, *, title: str) -> Path | None:
    """Training loss against version and the held-out metric against step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if m.get("kind") == "train"]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    if not train and not evals:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([m["version"] for m in train], [m["loss"] for m in train], color="tab:blue")
    ax1.set_xlabel("parameter version")
    ax1.set_ylabel("training loss")
    ax1.set_title("loss")
    ax1.grid(alpha=0.3)
    metric = str(evals[0].get("metric", "accuracy")) if evals else "accuracy"
    values = [m.get("value", m.get("accuracy")) for m in evals]
    ax2.plot([m["step"] for m in evals], values, "o-", color="tab:green")
    ax2.set_xlabel("worker 0 step")
    ax2.set_ylabel(f"held-out {metric}")
    if metric == "accuracy":
        ax2.set_ylim(0, 1)
    ax2.set_title(metric)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
