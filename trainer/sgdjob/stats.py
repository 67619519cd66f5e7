"""A shard's counters and, on shard 0, the job's progress: what /status and /metrics show.

Pure bookkeeping with a lock: the shard's loop records events, the HTTP thread reads
snapshots. ``status()`` is the JSON contract the operator's straggler timer reads:
``{"step", "totalSteps", "loss", "accuracy", "samplesPerSecond", "finished",
"workers": {"<i>": {"step", "stepTime", "loss", ...}}, ...}``.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from sgdjob.protocol import Report

STEP_TIME_WINDOW = 20  # recent steps per worker whose median is "the" step time
STALENESS_WINDOW = 10_000


@dataclass
class WorkerStats:
    step: int = 0
    loss: float | None = None
    step_times: deque[float] = field(default_factory=lambda: deque(maxlen=STEP_TIME_WINDOW))
    bytes_sent: int = 0
    bytes_received: int = 0
    samples: int = 0
    dropped: int = 0
    pushes: int = 0
    pulls: int = 0
    hellos: int = 0

    def step_time(self) -> float | None:
        return statistics.median(self.step_times) if self.step_times else None


def _quantile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    pos = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[pos])


class ShardStats:
    """Everything one shard counts; shard 0 also aggregates worker reports."""

    def __init__(self, *, shard: int, workers: int, mode: str, metric: str = "accuracy") -> None:
        self.lock = threading.Lock()
        self.metric = metric  # the task's held-out metric (accuracy, rmse, bitsPerToken, ...)
        self.shard = shard
        self.mode = mode
        self.total_steps: int | None = None
        self.version = 0
        self.incarnation = 0
        self.restored_from: int | None = None
        self.started = time.time()
        self.finished_at: float | None = None
        self.workers = {i: WorkerStats() for i in range(workers)}
        self.rejected: Counter[str] = Counter()
        self.staleness: deque[int] = deque(maxlen=STALENESS_WINDOW)
        self.staleness_sum = 0
        self.staleness_count = 0
        self.samples = 0
        self.metric_value: float | None = None
        self.test_loss: float | None = None
        self.final_report: Report | None = None
        self.evals: list[tuple[int, float, float | None]] = []  # (step, metric, test loss)
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- recording (called from the shard loop) ------------------------------------------
    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def record_staleness(self, tau: int) -> None:
        with self.lock:
            self.staleness.append(tau)
            self.staleness_sum += tau
            self.staleness_count += 1

    def record_drop(self, worker: int) -> None:
        with self.lock:
            self.workers[worker].dropped += 1

    def record_hello(self, worker: int) -> None:
        """A (re)started worker: its old step times describe another process."""
        with self.lock:
            self.workers[worker].step_times.clear()
            self.workers[worker].hellos += 1

    def record_push(self, worker: int) -> None:
        with self.lock:
            self.workers[worker].pushes += 1

    def record_pull(self, worker: int) -> None:
        with self.lock:
            self.workers[worker].pulls += 1

    def record_report(self, worker: int, report: Report) -> None:
        with self.lock:
            w = self.workers[worker]
            w.step = max(w.step, report.step)
            w.loss = report.loss
            if report.step_time > 0:
                w.step_times.append(report.step_time)
            w.bytes_sent = report.bytes_sent
            w.bytes_received = report.bytes_received
            w.samples += report.samples
            self.samples += report.samples
            if not math.isnan(report.eval_metric):
                self.metric_value = report.eval_metric
                self.test_loss = None if math.isnan(report.eval_loss) else report.eval_loss
                self.evals.append((report.step, report.eval_metric, self.test_loss))
            if report.final:
                self.final_report = report

    # -- reading (HTTP thread, summary) --------------------------------------------------
    def mean_loss(self) -> float | None:
        losses = [w.loss for w in self.workers.values() if w.loss is not None]
        return sum(losses) / len(losses) if losses else None

    def samples_per_second(self) -> float:
        end = self.finished_at or time.time()
        return self.samples / max(1e-9, end - self.started)

    def staleness_summary(self) -> dict[str, float]:
        values = sorted(self.staleness)
        mean = self.staleness_sum / self.staleness_count if self.staleness_count else 0.0
        return {
            "count": float(self.staleness_count),
            "mean": mean,
            "p50": _quantile(values, 0.5),
            "p99": _quantile(values, 0.99),
            "max": float(values[-1]) if values else 0.0,
        }

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "shard": self.shard,
                "mode": self.mode,
                "incarnation": self.incarnation,
                "restoredFrom": self.restored_from,
                "step": self.version,
                "totalSteps": self.total_steps,
                "finished": self.finished_at is not None,
                "loss": self.mean_loss(),
                "accuracy": self.metric_value if self.metric == "accuracy" else None,
                "metric": self.metric,
                "metricValue": self.metric_value,
                "testLoss": self.test_loss,
                "samples": self.samples,
                "samplesPerSecond": self.samples_per_second(),
                "elapsedSeconds": (self.finished_at or time.time()) - self.started,
                "bytesSent": self.bytes_sent,
                "bytesReceived": self.bytes_received,
                "rejected": dict(self.rejected),
                "staleness": self.staleness_summary(),
                "workers": {
                    str(i): {
                        "step": w.step,
                        "stepTime": w.step_time(),
                        "loss": w.loss,
                        "bytesSent": w.bytes_sent,
                        "bytesReceived": w.bytes_received,
                        "droppedGradients": w.dropped,
                        "pushes": w.pushes,
                        "pulls": w.pulls,
                        "hellos": w.hellos,
                    }
                    for i, w in self.workers.items()
                },
            }


def prometheus_text(status: dict[str, Any], *, job: str) -> str:
    """Render a status snapshot in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    base = f'job_name="{job}",shard="{status["shard"]}"'

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float | None]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            lab = base + ("," + labels if labels else "")
            lines.append(f"{name}{{{lab}}} {float(value):.17g}")

    workers: dict[str, dict[str, Any]] = status["workers"]
    metric("sgdjob_step", "gauge", "Parameter version (updates applied).", [("", status["step"])])
    metric("sgdjob_total_steps", "gauge", "Steps per worker to run.", [("", status["totalSteps"])])
    metric("sgdjob_loss", "gauge", "Mean recent training loss.", [("", status["loss"])])
    metric("sgdjob_accuracy", "gauge", "Held-out accuracy.", [("", status["accuracy"])])
    metric(
        "sgdjob_eval_metric",
        "gauge",
        "The task's held-out metric, named by the label.",
        [(f'metric="{status["metric"]}"', status["metricValue"])],
    )
    metric(
        "sgdjob_samples_per_second",
        "gauge",
        "Training throughput.",
        [("", status["samplesPerSecond"])],
    )
    metric(
        "sgdjob_rejected_messages_total",
        "counter",
        "Messages rejected, by reason.",
        [(f'reason="{r}"', n) for r, n in sorted(status["rejected"].items())],
    )
    stal = status["staleness"]
    metric(
        "sgdjob_staleness",
        "gauge",
        "Gradient staleness (updates since the pull).",
        [(f'stat="{k}"', stal[k]) for k in ("mean", "p50", "p99", "max")],
    )
    for key, name, kind, help_ in (
        ("stepTime", "sgdjob_worker_step_seconds", "gauge", "Median recent step time."),
        ("step", "sgdjob_worker_step", "gauge", "Last step reported by the worker."),
        ("bytesSent", "sgdjob_worker_bytes_sent_total", "counter", "Bytes the worker sent."),
        ("bytesReceived", "sgdjob_worker_bytes_received_total", "counter", "Bytes received."),
        ("droppedGradients", "sgdjob_worker_dropped_gradients_total", "counter", "Dropped."),
    ):
        metric(name, kind, help_, [(f'worker="{i}"', w[key]) for i, w in sorted(workers.items())])
    return "\n".join(lines) + "\n"
