"""The chart's pre-delete hook (`sgdjob operator --drain`) on the real API server: no SGDJob
outlives the operator with a finalizer nobody can remove."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sgdjob_operator.drain import FINALIZER, drain
from tests.operator.harness import Cluster, basic_spec, eventually, running_operator


def jobs(cluster: Cluster) -> dict[str, dict]:
    return cluster.objects("sgdjob.dev/v1alpha1/sgdjobs")


async def test_draining_with_the_operator_running_lets_it_remove_its_finalizers(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_operator(cluster):
        await cluster.create_job("j", basic_spec())
        await eventually(
            lambda: FINALIZER in (jobs(cluster)["j"]["metadata"].get("finalizers") or []),
            what="Kopf's finalizer",
        )
        with caplog.at_level(logging.INFO, logger="sgdjob_operator.drain"):
            n = await drain(
                namespaces=[cluster.ns], timeout=120, credentials=cluster.credentials(), poll=0.2
            )
    assert n == 1 and jobs(cluster) == {}
    assert "removing" not in caplog.text  # the operator let the job go, not the fallback


async def test_draining_without_an_operator_clears_the_finalizer_after_the_timeout(
    cluster: Cluster,
) -> None:
    await cluster.create_job("j", basic_spec())
    await asyncio.to_thread(
        cluster.custom.patch_namespaced_custom_object,
        "sgdjob.dev", "v1alpha1", cluster.ns, "sgdjobs", "j",
        {"metadata": {"finalizers": [FINALIZER, "example.test/keep"]}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    task = asyncio.create_task(
        drain(namespaces=[cluster.ns], timeout=1, credentials=cluster.credentials(), poll=0.2)
    )
    # Deleted, but held by the finalizers while no operator runs.
    await eventually(lambda: jobs(cluster)["j"]["metadata"].get("deletionTimestamp"))
    await task
    left = jobs(cluster)["j"]["metadata"]
    assert left["finalizers"] == ["example.test/keep"]  # only ours is removed
    await asyncio.to_thread(
        cluster.custom.patch_namespaced_custom_object,
        "sgdjob.dev", "v1alpha1", cluster.ns, "sgdjobs", "j",
        {"metadata": {"finalizers": None}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    await eventually(lambda: "j" not in jobs(cluster), what="the job gone")
