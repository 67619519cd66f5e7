"""Running the operator in-loop against the real local API server, and a stand-in coordinator.

Every test gets a fresh namespace on the session's cluster (``tests/kube_cluster.py``) and an
operator that logs in with the chart's ServiceAccount token, so RBAC, schema, defaulting,
owner references, garbage collection and uids are the API server's own. There is no kubelet
yet: a test plays it by binding pods to Node objects it creates and by patching
``pods/status``, and :meth:`Cluster.finish_terminations` confirms graceful deletions the way a
kubelet would (a pod bound to a node stays Terminating until its kubelet says it stopped).

KMock stays only under ``bench/operator``, for the figures beside the real server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from sgdjob.api.types import SGDJobSpec
from sgdjob_operator.entry import operator_in_loop
from sgdjob_operator.handlers import OperatorConfig, OperatorState
from sgdjob_operator.kube import Credentials
from sgdjob_operator.manifests import JobRef, PodSettings
from tests.kube_cluster import KubeCluster

JOBS = "sgdjob.dev/v1alpha1/sgdjobs"
PODS = "v1/pods"
IMAGE = "example.test/sgdjob:test"
_CORE = {
    "pods": "pod",
    "configmaps": "config_map",
    "secrets": "secret",
    "services": "service",
    "events": "event",
}


def basic_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"builtin": "mlp"},
        "data": {"builtin": "digits"},
        "training": {"maxSteps": 100},
        "parameterServers": {"shards": 2},
        "workers": {"replicas": 2},
    }
    spec.update(overrides)
    return spec


def _json(resp: Any) -> Any:
    return json.loads(resp.data) if resp.data else None


class Cluster:
    """Test-side access to one namespace of the real cluster (admin identity)."""

    def __init__(self, kc: KubeCluster, ns: str, token_file: Path) -> None:
        self.kc = kc
        self.ns = ns
        self.token_file = token_file
        self.core = k8s.CoreV1Api(kc.api)
        self.custom = k8s.CustomObjectsApi(kc.api)
        self.k = self  # what `running_operator` takes
        self.kubelet_paused = False  # True: graceful deletions stay Terminating

    def credentials(self) -> Credentials:
        return Credentials(
            server=self.kc.server, token_file=str(self.token_file), ca_path=str(self.kc.ca_path)
        )

    async def create_job(self, name: str, spec: Mapping[str, Any]) -> str:
        body = {
            "apiVersion": "sgdjob.dev/v1alpha1",
            "kind": "SGDJob",
            "metadata": {"name": name},
            "spec": dict(spec),
        }
        got = await asyncio.to_thread(
            self.custom.create_namespaced_custom_object,
            "sgdjob.dev", "v1alpha1", self.ns, "sgdjobs", body,
        )  # fmt: skip
        return str(cast(dict[str, Any], got)["metadata"]["uid"])

    async def delete_job(self, name: str) -> None:
        await asyncio.to_thread(
            self.custom.delete_namespaced_custom_object,
            "sgdjob.dev", "v1alpha1", self.ns, "sgdjobs", name,
        )  # fmt: skip

    def _node(self, node: str) -> None:
        try:
            meta = k8s.V1ObjectMeta(name=node, labels={"sgdjob.test": "fake"})
            self.core.create_node(k8s.V1Node(metadata=meta))
        except ApiException as err:
            if err.status != 409:
                raise

    async def patch_pod(self, name: str, patch: Mapping[str, Any]) -> None:
        """Play the scheduler and the kubelet: ``spec.nodeName`` binds the pod to a (fake)
        Node, ``status`` is merged into ``pods/status``."""
        node = (patch.get("spec") or {}).get("nodeName")
        if node:
            await asyncio.to_thread(self._node, node)
            binding = k8s.V1Binding(
                api_version="v1",
                kind="Binding",
                metadata=k8s.V1ObjectMeta(name=name),
                target=k8s.V1ObjectReference(api_version="v1", kind="Node", name=node),
            )
            await asyncio.to_thread(
                self.core.create_namespaced_pod_binding, name, self.ns, binding,
                _preload_content=False,
            )  # fmt: skip
        if "status" in patch:
            await asyncio.to_thread(
                self.core.patch_namespaced_pod_status, name, self.ns, {"status": patch["status"]},
                _content_type="application/strategic-merge-patch+json",
            )  # fmt: skip

    async def set_phase(self, name: str, phase: str, **container: Any) -> None:
        status: dict[str, Any] = {"phase": phase}
        if container:
            status["containerStatuses"] = [
                {
                    "name": "trainer",
                    "image": IMAGE,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": container,
                }
            ]
        await self.patch_pod(name, {"status": status})

    def finish_terminations(self) -> None:
        """Confirm the deletion of Terminating pods, as their kubelet would."""
        if self.kubelet_paused:
            return
        for name, pod in self.pods().items():
            if pod["metadata"].get("deletionTimestamp"):
                with contextlib.suppress(ApiException):
                    self.core.delete_namespaced_pod(name, self.ns, grace_period_seconds=0)

    def objects(self, resource: str) -> dict[str, dict[str, Any]]:
        """Objects of `group/version/plural` in the test namespace, by name."""
        _, _, plural = resource.rpartition("/")
        if plural == "sgdjobs":
            doc = _json(
                self.custom.list_namespaced_custom_object(
                    "sgdjob.dev", "v1alpha1", self.ns, "sgdjobs", _preload_content=False
                )
            )
        else:
            fn = getattr(self.core, f"list_namespaced_{_CORE[plural]}")
            doc = _json(fn(self.ns, _preload_content=False))
        return {o["metadata"]["name"]: o for o in (doc or {}).get("items") or []}

    def pods(self) -> dict[str, dict[str, Any]]:
        return self.objects(PODS)

    def job(self, name: str) -> dict[str, Any]:
        return self.objects(JOBS)[name]

    def events(self) -> list[dict[str, Any]]:
        return list(self.objects("v1/events").values())


async def eventually(
    check: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition"
) -> Any:
    """Poll until `check()` is truthy (its value is returned) or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
            if last:
                return last
        except (KeyError, IndexError, AssertionError) as err:
            last = err
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@contextlib.asynccontextmanager
async def running_operator(
    cluster: Cluster,
    *,
    coordinator_url: Callable[[JobRef, SGDJobSpec], str] | None = None,
    resync_seconds: float = 0.3,
    poll_seconds: float = 0.2,
    liveness_endpoint: str | None = None,
) -> AsyncIterator[OperatorState]:
    """Run the operator as a task in this loop, as the chart's ServiceAccount; stop it (like
    a process exit) on leaving."""
    config = OperatorConfig(
        pod_settings=PodSettings(trainer_image=IMAGE, cluster_domain="cluster.test"),
        coordinator_url=coordinator_url,
        resync_seconds=resync_seconds,
        poll_seconds=poll_seconds,
        credentials=cluster.credentials(),
    )
    async with operator_in_loop(
        config, namespaces=[cluster.ns], liveness_endpoint=liveness_endpoint
    ) as state:
        yield state


class FakeCoordinator:
    """Serves shard 0's /status contract; the step advances on every request."""

    def __init__(
        self, step_times: Mapping[int, float | None], restored_from: int | None = None
    ) -> None:
        self.step_times = dict(step_times)
        self.restored_from = restored_from
        self.step = 0
        self.requests = 0

    async def handle(self, _: web.Request) -> web.Response:
        self.requests += 1
        self.step += 1
        return web.json_response(
            {
                "step": self.step,
                "totalSteps": 100,
                "loss": 0.5,
                "accuracy": 0.8,
                "samplesPerSecond": 1234.5,
                "finished": False,
                "restoredFrom": self.restored_from,
                "workers": {
                    str(i): {"step": self.step, "stepTime": t, "loss": 0.5}
                    for i, t in self.step_times.items()
                },
            }
        )


@contextlib.asynccontextmanager
async def serve_coordinator(fake: FakeCoordinator) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/status", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/status"
    finally:
        await runner.cleanup()
