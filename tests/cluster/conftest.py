"""Real pods: the local cluster with its node (hack/node.sh) and the chart's operator pod.

Every test here is marked ``cluster`` (run by ``make test-cluster``). A cluster without a node
(not root, not Linux, or ``CLUSTER_NODE=0``) skips the module with one line saying why; under
``CI=true`` that fails instead. The chart's operator Deployment is scaled to one replica for
this package and back to zero afterwards, so the operator suite's own operator never competes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster.node import Node
from tests.kube_cluster import KubeCluster, delete_namespace, kube_cluster, new_namespace

__all__ = ["kube_cluster"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/cluster/" in item.nodeid:
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.node)


@pytest.fixture(scope="package")
def node(kube_cluster: KubeCluster) -> Iterator[Node]:
    n = Node(kube_cluster)
    reason = n.why_not_ready()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the node is required in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    n.scale_operator(1)
    try:
        yield n
    finally:
        n.scale_operator(0)


@pytest.fixture
def namespace(node: Node) -> Iterator[str]:
    ns = new_namespace(node.cluster)
    yield ns
    delete_namespace(node.cluster, ns)
