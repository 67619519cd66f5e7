"""The operator's /metrics, its flags and its import boundary."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from typing import Any

import aiohttp

from sgdjob.api.validation import validate_spec
from sgdjob_operator.entry import DEFAULT_IMAGE, config_from_args, parse_args
from sgdjob_operator.manifests import JobRef
from sgdjob_operator.metrics import OperatorMetrics, serve_metrics
from tests.operator.harness import Cluster, basic_spec, eventually, running_operator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_render_jobs_by_phase_counters_and_a_latency_histogram() -> None:
    m = OperatorMetrics()
    m.set_phase("uid-a", "Running")
    m.set_phase("uid-b", "Running")
    m.set_phase("uid-c", "Failed")
    m.restarts, m.replacements = 3, 1
    m.observe_reconcile(0.02)
    m.observe_reconcile(20.0, error=True)
    text = m.render()
    m.forget("uid-c")
    assert 'sgdjob_operator_jobs{phase="Failed"} 0' in m.render()
    assert 'sgdjob_operator_jobs{phase="Running"} 2' in text
    assert 'sgdjob_operator_jobs{phase="Failed"} 1' in text
    assert 'sgdjob_operator_jobs{phase="Succeeded"} 0' in text
    assert "sgdjob_operator_restarts_total 3" in text
    assert "sgdjob_operator_straggler_replacements_total 1" in text
    assert "sgdjob_operator_reconcile_errors_total 1" in text
    assert 'sgdjob_operator_reconcile_seconds_bucket{le="0.025"} 1' in text
    assert 'sgdjob_operator_reconcile_seconds_bucket{le="10.0"} 1' in text
    assert 'sgdjob_operator_reconcile_seconds_bucket{le="+Inf"} 2' in text
    assert "sgdjob_operator_reconcile_seconds_count 2" in text


async def test_metrics_are_served_over_http_while_the_operator_runs(cluster: Cluster) -> None:
    port = free_port()
    async with running_operator(cluster.k) as state:
        runner = await serve_metrics(state.config.metrics, "127.0.0.1", port)
        try:
            await cluster.create_job("j", basic_spec())
            await eventually(lambda: len(cluster.pods()) == 4)
            await eventually(lambda: state.config.metrics.reconciles >= 2)
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{port}/metrics") as resp,
            ):
                assert resp.status == 200
                text = await resp.text()
        finally:
            await runner.cleanup()
    assert 'sgdjob_operator_jobs{phase="Pending"} 1' in text
    assert "sgdjob_operator_reconcile_seconds_count" in text
    assert "sgdjob_operator_children_created_total 7" in text


async def test_the_liveness_endpoint_answers_while_the_operator_runs(cluster: Cluster) -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    async with running_operator(cluster.k, liveness_endpoint=url):

        async def probe() -> int:
            async with aiohttp.ClientSession() as s, s.get(url) as resp:
                return resp.status

        async def until_up() -> int:
            for _ in range(100):
                try:
                    return await probe()
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            return 0

        assert await until_up() == 200


def test_flags_have_documented_defaults_and_namespaces_repeat() -> None:
    args = parse_args([])
    assert args.namespace == [] and args.cluster_domain == "cluster.local"
    assert args.trainer_image == DEFAULT_IMAGE and args.liveness is None
    args = parse_args(["-n", "a", "--namespace", "b", "--cluster-domain", "k8s.local"])
    assert args.namespace == ["a", "b"]
    config = config_from_args(args)
    assert config.pod_settings.cluster_domain == "k8s.local"
    spec = validate_spec(basic_spec())
    ref = JobRef(name="j", namespace="a", uid="u")
    assert config.url_for(ref, spec) == "http://j-ps-0.j-ps.a.svc.k8s.local:8080/status"


def test_the_coordinator_url_template_overrides_the_in_cluster_address() -> None:
    args = parse_args(["--coordinator-url", "http://127.0.0.1:{port}/{namespace}/{name}"])
    config = config_from_args(args)
    ref = JobRef(name="j", namespace="a", uid="u")
    assert config.url_for(ref, validate_spec(basic_spec())) == "http://127.0.0.1:8080/a/j"


def test_the_operator_package_imports_no_torch_no_zmq_and_only_allowed_sgdjob_modules() -> None:
    code = (
        "import sys; import sgdjob_operator.entry, sgdjob_operator.handlers; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'zmq')]; "
        "ours = {m for m in sys.modules if m.startswith('sgdjob.')}; "
        "allowed = ('sgdjob.api', 'sgdjob.contract', 'sgdjob.policy', 'sgdjob.exits', "
        "'sgdjob.curvekeys'); "
        "extra = [m for m in ours if not m.startswith(allowed)]; "
        "assert not bad and not extra, (bad, extra)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sgdjob_operator_verbose_really_turns_on_debug_logging(monkeypatch: Any) -> None:
    from sgdjob import cli
    from sgdjob_operator import entry

    async def no_operator(_: Any) -> None:
        return None

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    monkeypatch.setattr(entry, "_main", no_operator)
    try:
        assert cli.main(["operator", "--verbose", "--metrics-port", "0"]) == 0
        assert root.level == logging.DEBUG
        assert logging.getLogger("kopf").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("sgdjob_operator").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
