"""Fixtures: a fresh namespace of the real local cluster per test, the chart's identity, and a
stand-in kubelet that confirms graceful pod deletions.

Tests that take the ``cluster`` fixture are marked ``cluster`` and run under
``make test-cluster``; the pure-function tests here run under ``make test``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.kube_cluster import KubeCluster, delete_namespace, kube_cluster, new_namespace
from tests.operator.harness import Cluster

__all__ = ["kube_cluster"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def kubelet_free(kube_cluster: KubeCluster) -> KubeCluster:
    """These tests play the kubelet (fake Nodes, patched pod status): a real node would run
    their pods and race them, and the chart's operator would compete with theirs."""
    from kubernetes import client as k8s

    nodes = k8s.CoreV1Api(kube_cluster.api).list_node().items
    metas = [n.metadata for n in nodes if n.metadata is not None]
    real = [str(m.name) for m in metas if (m.labels or {}).get("sgdjob.test") != "fake"]
    if real:
        pytest.skip(
            f"the cluster has a real node ({', '.join(real)}): run the operator suite on one "
            "without (make test-cluster starts it with CLUSTER_NODE=0)"
        )
    return kube_cluster


@pytest.fixture()
def namespace(kubelet_free: KubeCluster) -> Iterator[str]:
    kube_cluster = kubelet_free
    ns = new_namespace(kube_cluster)
    yield ns
    delete_namespace(kube_cluster, ns)


@pytest.fixture()
async def cluster(
    kube_cluster: KubeCluster, namespace: str, tmp_path: Path
) -> AsyncIterator[Cluster]:
    token_file = tmp_path / "token"
    token_file.write_text(kube_cluster.operator_token())
    c = Cluster(kube_cluster, namespace, token_file)

    async def kubelet() -> None:
        while True:
            await asyncio.to_thread(c.finish_terminations)
            await asyncio.sleep(0.3)

    task = asyncio.create_task(kubelet())
    try:
        yield c
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
