"""The operator's own Prometheus metrics: jobs by phase, restarts, straggler replacements and
reconcile latency, rendered as Prometheus text (format 0.0.4) and served by aiohttp.

The numbers are kept in memory by the handlers (``OperatorMetrics`` is updated, never read,
by the reconcile loop); rendering is a pure function of them.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

PHASES = ("Pending", "Running", "Succeeded", "Failed")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class OperatorMetrics:
    """Counters and gauges of one operator process."""

    # By job uid: a job deleted and created again under its name is another job.
    job_phase: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    replacements: int = 0
    children_created: int = 0
    api_requests: int = 0  # the operator's own API calls (not Kopf's watches and patches)
    reconciles: int = 0
    reconcile_errors: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0

    def set_phase(self, uid: str, phase: str) -> None:
        self.job_phase[uid] = phase

    def forget(self, uid: str) -> None:
        self.job_phase.pop(uid, None)

    def observe_reconcile(self, seconds: float, *, error: bool = False) -> None:
        self.reconciles += 1
        self.reconcile_errors += int(error)
        self.latency_sum += seconds
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        if i < len(self.latency_buckets):
            self.latency_buckets[i] += 1

    def render(self) -> str:
        by_phase = Counter(self.job_phase.values())
        lines = [
            "# HELP sgdjob_operator_jobs SGDJobs this operator supervises, by phase.",
            "# TYPE sgdjob_operator_jobs gauge",
        ]
        lines += [f'sgdjob_operator_jobs{{phase="{p}"}} {by_phase.get(p, 0)}' for p in PHASES]
        lines += [
            "# HELP sgdjob_operator_restarts_total Replica restarts after failures.",
            "# TYPE sgdjob_operator_restarts_total counter",
            f"sgdjob_operator_restarts_total {self.restarts}",
            "# HELP sgdjob_operator_straggler_replacements_total Workers replaced as stragglers.",
            "# TYPE sgdjob_operator_straggler_replacements_total counter",
            f"sgdjob_operator_straggler_replacements_total {self.replacements}",
            "# HELP sgdjob_operator_children_created_total Children (pods, config) created.",
            "# TYPE sgdjob_operator_children_created_total counter",
            f"sgdjob_operator_children_created_total {self.children_created}",
            "# HELP sgdjob_operator_api_requests_total API calls made by the operator's client.",
            "# TYPE sgdjob_operator_api_requests_total counter",
            f"sgdjob_operator_api_requests_total {self.api_requests}",
            "# HELP sgdjob_operator_reconcile_errors_total Reconcile passes that raised.",
            "# TYPE sgdjob_operator_reconcile_errors_total counter",
            f"sgdjob_operator_reconcile_errors_total {self.reconcile_errors}",
            "# HELP sgdjob_operator_reconcile_seconds Time of one reconcile pass.",
            "# TYPE sgdjob_operator_reconcile_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS, self.latency_buckets, strict=True):
            cumulative += count
            lines.append(f'sgdjob_operator_reconcile_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines += [
            f'sgdjob_operator_reconcile_seconds_bucket{{le="+Inf"}} {self.reconciles}',
            f"sgdjob_operator_reconcile_seconds_sum {self.latency_sum:.6f}",
            f"sgdjob_operator_reconcile_seconds_count {self.reconciles}",
        ]
        return "\n".join(lines) + "\n"


async def serve_metrics(metrics: OperatorMetrics, host: str, port: int) -> web.AppRunner:
    """Start `GET /metrics` on host:port; the caller cleans the runner up on shutdown."""

    async def handle(_: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
