"""Starting the operator: flags, the metrics server and ``kopf.operator``.

``run_operator(argv)`` is what ``sgdjob operator ...`` calls. Flags:

- ``--namespace NS`` (repeatable; none means all namespaces),
- ``--cluster-domain`` (default ``cluster.local``), used in shard DNS names,
- ``--trainer-image`` (the image of pods whose spec names none),
- ``--liveness URL`` (Kopf's liveness endpoint, e.g. ``http://0.0.0.0:8081/healthz``),
- ``--metrics-port`` (0 disables ``/metrics``), ``--metrics-host``,
- ``--coordinator-url TEMPLATE`` (e.g. ``http://127.0.0.1:{port}/status``; placeholders
  ``{name} {namespace} {port} {domain}``), for port-forwarded or out-of-cluster operators,
- ``--resync-seconds``, ``--poll-seconds``,
- ``--drain`` (with ``--drain-timeout``): do not run the operator; delete every SGDJob of the
  watched namespaces and wait until they are gone (the chart's pre-delete hook, see ``drain``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import kopf

from sgdjob.api.types import SGDJobSpec
from sgdjob_operator.handlers import OperatorConfig, OperatorState, build_registry
from sgdjob_operator.manifests import JobRef, PodSettings
from sgdjob_operator.metrics import serve_metrics

DEFAULT_IMAGE = "ghcr.io/sgdjob/sgdjob:0.1.0"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sgdjob operator", description="Run the SGDJob operator.")
    p.add_argument("--namespace", "-n", action="append", default=[], help="repeatable")
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--trainer-image", default=DEFAULT_IMAGE)
    p.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8081/healthz")
    p.add_argument("--metrics-port", type=int, default=9090, help="0 disables /metrics")
    p.add_argument("--metrics-host", default="0.0.0.0")
    p.add_argument("--coordinator-url", default=None, help="template for shard 0's /status URL")
    p.add_argument("--resync-seconds", type=float, default=2.0)
    p.add_argument("--poll-seconds", type=float, default=3.0)
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--drain", action="store_true", help="delete every SGDJob and wait; exit")
    p.add_argument("--drain-timeout", type=float, default=120.0)
    return p.parse_args(list(argv))


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    template: str | None = args.coordinator_url
    domain: str = args.cluster_domain

    def from_template(ref: JobRef, spec: SGDJobSpec) -> str:
        assert template is not None
        return template.format(
            name=ref.name,
            namespace=ref.namespace,
            port=spec.parameter_servers.status_port,
            domain=domain,
        )

    return OperatorConfig(
        pod_settings=PodSettings(trainer_image=args.trainer_image, cluster_domain=domain),
        coordinator_url=from_template if template else None,
        resync_seconds=args.resync_seconds,
        poll_seconds=args.poll_seconds,
    )


@contextlib.asynccontextmanager
async def operator_in_loop(
    config: OperatorConfig,
    *,
    namespaces: Sequence[str],
    scanning: bool = True,
    liveness_endpoint: str | None = None,
) -> AsyncIterator[OperatorState]:
    """Run the operator as a task of the current loop until the block exits (tests, benches).

    ``scanning=False`` skips Kopf's CRD/namespace watching, which a mock server cannot serve.
    """
    registry, state = build_registry(config)
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = not scanning
    settings.watching.reconnect_backoff = 0.1
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            stop_flag=stop,
            liveness_endpoint=liveness_endpoint,
        )
    )
    try:
        yield state
    finally:
        stop.set_result(None)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=15)


async def _main(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    registry, _ = build_registry(config)
    runner = None
    if args.metrics_port:
        runner = await serve_metrics(config.metrics, args.metrics_host, args.metrics_port)
    try:
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness,
        )
    finally:
        if runner is not None:
            await runner.cleanup()


def run_operator(argv: list[str]) -> int:
    """Parse flags and run until SIGINT/SIGTERM; returns the process exit code."""
    args = parse_args(argv)
    # force: `sgdjob` has configured logging at INFO already; --verbose must win over that.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    try:
        if args.drain:
            from sgdjob_operator.drain import drain

            n = asyncio.run(drain(namespaces=args.namespace, timeout=args.drain_timeout))
            logging.getLogger("sgdjob_operator").info("drained %d SGDJob(s)", n)
        else:
            asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130
    return 0
