"""Operator benchmark: `python -m bench.operator [--jobs 500] [--real-jobs 200]`.

First on the real local API server (``bench/operator/real.py``: kubectl apply, the chart's
RBAC, the operator as its own process), then on KMock for comparison.

On KMock:
Measures (1) the time from creating one SGDJob (2 shards, 4 workers) to all of its children
existing, over a few repetitions, and (2) with N SGDJobs (1 shard, 1 worker each) created at
once: the time until every child exists and every job has a status, the operator's total
reconcile time (sum of its reconcile passes) and the operator process's peak RSS. KMock runs in
a child process so the RSS is the operator's own (plus this small driver). Writes a markdown
table to stdout and to bench/results/operator.md. Bounded by --deadline (default 150 s).

Set BENCH_KMOCK_PY_ARGS (e.g. "-m cProfile -o /tmp/kmock.prof") to run KMock's process under
extra interpreter arguments when profiling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from sgdjob_operator.entry import operator_in_loop
from sgdjob_operator.handlers import OperatorConfig
from sgdjob_operator.kube import Credentials
from sgdjob_operator.manifests import PodSettings
from sgdjob_operator.metrics import OperatorMetrics

NS = "bench"
RESULTS = Path(__file__).resolve().parent.parent / "results" / "operator.md"


def job_body(name: str, shards: int, workers: int) -> dict[str, Any]:
    return {
        "apiVersion": "sgdjob.dev/v1alpha1",
        "kind": "SGDJob",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": str(uuid.uuid4()),
            "resourceVersion": "1",
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "model": {"builtin": "mlp"},
            "data": {"builtin": "digits"},
            "training": {"maxSteps": 100},
            "parameterServers": {"shards": shards},
            "workers": {"replicas": workers},
        },
    }


async def create_job(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> None:
    url = f"{base}/apis/sgdjob.dev/v1alpha1/namespaces/{NS}/sgdjobs"
    async with session.post(url, json=body) as resp:
        if resp.status not in (200, 201):
            raise RuntimeError(f"create job: {resp.status} {await resp.text()}")


async def wait_until(check: Callable[[], bool], *, deadline: float) -> float:
    """Poll an in-process check every millisecond; returns the time it became true."""
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        await asyncio.sleep(0.001)
    raise TimeoutError("benchmark deadline reached")


def _created_at_least(metrics: OperatorMetrics, target: int) -> Callable[[], bool]:
    return lambda: metrics.children_created >= target


async def latency(
    session: aiohttp.ClientSession,
    base: str,
    metrics: OperatorMetrics,
    *,
    repeats: int,
    deadline: float,
) -> list[float]:
    """Seconds from POSTing one job (2 shards, 4 workers) to the operator having created its
    9 children (counted from the API server's answers, no polling of the server)."""
    times = []
    for i in range(repeats):
        target = metrics.children_created + 3 + 2 + 4
        t0 = time.monotonic()
        await create_job(session, base, job_body(f"lat-{i}", shards=2, workers=4))
        t1 = await wait_until(_created_at_least(metrics, target), deadline=deadline)
        times.append(t1 - t0)
    return times


async def count_children(session: aiohttp.ClientSession, base: str) -> int:
    total = 0
    for plural in ("pods", "configmaps", "secrets", "services"):
        async with session.get(f"{base}/api/v1/namespaces/{NS}/{plural}") as resp:
            total += len((await resp.json()).get("items") or [])
    return total


async def scale(
    session: aiohttp.ClientSession,
    base: str,
    metrics: OperatorMetrics,
    *,
    jobs: int,
    deadline: float,
) -> tuple[float, float]:
    """Create N jobs at once; seconds until all children exist, and until all have a phase.

    Children are counted on the server (every 0.25 s): under load a create can time out on
    the client after the server made the object, so the operator's own counter may miss it.
    """
    expected = await count_children(session, base) + jobs * (3 + 1 + 1)
    bodies = [job_body(f"job-{i:04d}", shards=1, workers=1) for i in range(jobs)]
    uids = [b["metadata"]["uid"] for b in bodies]
    t0 = time.monotonic()
    sem = asyncio.Semaphore(32)

    async def one(body: dict[str, Any]) -> None:
        async with sem:
            await create_job(session, base, body)

    await asyncio.gather(*(one(b) for b in bodies))
    t_children = None
    while t_children is None:
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark deadline reached")
        if await count_children(session, base) >= expected:
            t_children = time.monotonic()
        else:
            await asyncio.sleep(0.25)
    t_status = await wait_until(
        lambda: all(u in metrics.job_phase for u in uids), deadline=deadline
    )
    return t_children - t0, t_status - t0


def _kmock_kubeconfig(base: str) -> str:
    """KMock speaks plain HTTP without authentication."""
    path = Path(tempfile.mkdtemp(prefix="kmock-")) / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: k, cluster: {{server: '{base}'}}}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: k, context: {cluster: k, user: u}}]\ncurrent-context: k\n"
    )
    return str(path)


def seconds(value: float | None) -> str:
    return "not reached before --deadline" if value is None else f"{value:.1f} s"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(jobs: int, repeats: int, budget: float) -> str:
    deadline = time.monotonic() + budget
    server = subprocess.Popen(
        [
            sys.executable,
            *os.environ.get("BENCH_KMOCK_PY_ARGS", "").split(),
            "-m",
            "bench.operator.kmock_server",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        if not line.startswith("URL "):
            raise RuntimeError(f"KMock did not start: {line!r}")
        base = line.split(" ", 1)[1]
        config = OperatorConfig(
            pod_settings=PodSettings(trainer_image="bench:latest"),
            credentials=Credentials(kubeconfig=_kmock_kubeconfig(base)),
        )
        rss_before = peak_rss_mib()
        cpu_before = cpu_seconds()
        connector = aiohttp.TCPConnector(force_close=True, limit=32)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            operator_in_loop(config, namespaces=[NS], scanning=False) as state,
        ):
            metrics = state.config.metrics
            await asyncio.sleep(0.5)  # let Kopf start its watches
            lat = await latency(session, base, metrics, repeats=repeats, deadline=deadline)
            t_children: float | None
            t_status: float | None
            try:
                t_children, t_status = await scale(
                    session, base, metrics, jobs=jobs, deadline=deadline
                )
            except TimeoutError:
                # Report what was measured rather than nothing; the table says it timed out.
                t_children = t_status = None
            reconciles, reconcile_sum = metrics.reconciles, metrics.latency_sum
        rss_peak = peak_rss_mib()
        cpu = cpu_seconds() - cpu_before
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
    rows = [
        (
            "one job (2 shards, 4 workers): creation → 9 children, median",
            f"{statistics.median(lat) * 1000:.0f} ms",
        ),
        ("one job: creation → 9 children, max of " + str(repeats), f"{max(lat) * 1000:.0f} ms"),
        (f"{jobs} jobs created at once → all {jobs * 5} children exist", seconds(t_children)),
        (f"{jobs} jobs → every job reconciled once (status written)", seconds(t_status)),
        ("reconcile passes (all jobs, whole run)", f"{reconciles}"),
        ("total reconcile time (sum of pass durations; passes overlap)", f"{reconcile_sum:.1f} s"),
        (
            "mean reconcile pass (wall time, mostly waiting on the API)",
            f"{reconcile_sum / max(reconciles, 1) * 1000:.1f} ms",
        ),
        ("operator process CPU time, whole run (user + system)", f"{cpu:.1f} s"),
        ("operator process peak RSS", f"{rss_peak:.0f} MiB"),
        ("operator process RSS before the operator started", f"{rss_before:.0f} MiB"),
    ]
    lines = [
        "# Operator on KMock",
        "",
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs (shared), KMock in a child "
        "process over loopback HTTP. Times include KMock's own latency; a real API server adds "
        "admission, etcd writes and the scheduler.",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.operator")
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--real-jobs", type=int, default=200)
    p.add_argument("--deadline", type=float, default=150.0, help="seconds for each server")
    p.add_argument("--no-real", action="store_true", help="KMock only (no local cluster)")
    args = p.parse_args(argv)
    tables = []
    if not args.no_real:
        from bench.operator.real import run_real

        tables.append(run_real(args.real_jobs, args.repeats, args.deadline))
    tables.append(asyncio.run(run(args.jobs, args.repeats, args.deadline)))
    table = "\n".join(tables)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
