"""Running the operator in-loop against KMock, and a stand-in coordinator.

What these tests cannot see, because KMock (0.8) is a lenient in-memory store and not an API
server:

- no admission or schema checks: an invalid pod or CRD field is stored as is (manifests are
  checked by pydantic on the way in and by shape assertions here, not by the server);
- no defaulting: uid, resourceVersion, creationTimestamp and namespace are never filled in,
  so test jobs are created with them and pods' creationTimestamp is set by the test where a
  deadline needs it;
- label selectors are ignored (the operator filters by owner uid and labels itself);
- no garbage collection through owner references, no graceful deletion of pods (a deleted
  pod is gone at once, so the 409-while-terminating path of a restart is not exercised),
  no kubelet (pod phases change only when a test patches them), no scheduler (no real node
  anti-affinity), and no PUT;
- merge-patches are plain recursive dict merges (no strategic merge of lists).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import kmock
from aiohttp import web

from sgdjob.api.types import SGDJobSpec
from sgdjob_operator.entry import operator_in_loop
from sgdjob_operator.handlers import OperatorConfig, OperatorState
from sgdjob_operator.kube import Connection
from sgdjob_operator.manifests import JobRef, PodSettings

NS = "ns1"
JOBS = "sgdjob.dev/v1alpha1/sgdjobs"
PODS = "v1/pods"
IMAGE = "example.test/sgdjob:test"


def declare_resources(k: kmock.KubernetesEmulator) -> None:
    """The built-in resources and the SGDJob CRD (KMock knows only declared resources)."""
    k.resources.load_bundled()
    k.resources[JOBS] = kmock.ResourceInfo(
        kind="SGDJob",
        singular="sgdjob",
        namespaced=True,
        shortnames={"sgdj"},
        verbs={"list", "watch", "get", "create", "patch", "delete"},
        subresources={"status"},
    )


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


class Cluster:
    """Test-side access to KMock over HTTP (so watch events fire) and to its store."""

    def __init__(self, k: kmock.KubernetesEmulator, session: aiohttp.ClientSession) -> None:
        self.k = k
        self.session = session
        self.base = str(k.url).rstrip("/")

    async def create_job(self, name: str, spec: Mapping[str, Any]) -> str:
        uid = str(uuid.uuid4())
        body = {
            "apiVersion": "sgdjob.dev/v1alpha1",
            "kind": "SGDJob",
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": uid,
                "resourceVersion": "1",
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "spec": dict(spec),
        }
        url = f"{self.base}/apis/sgdjob.dev/v1alpha1/namespaces/{NS}/sgdjobs"
        async with self.session.post(url, json=body) as resp:
            assert resp.status in (200, 201), await resp.text()
        return uid

    async def patch_pod(self, name: str, patch: Mapping[str, Any]) -> None:
        url = f"{self.base}/api/v1/namespaces/{NS}/pods/{name}"
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(url, json=patch, headers=headers) as resp:
            assert resp.status == 200, await resp.text()

    async def set_phase(self, name: str, phase: str, **container: Any) -> None:
        status: dict[str, Any] = {"phase": phase}
        if container:
            status["containerStatuses"] = [{"name": "trainer", "state": container}]
        await self.patch_pod(name, {"status": status})

    def objects(self, resource: str) -> dict[str, dict[str, Any]]:
        """Live (not deleted) objects of `group/version/plural` in the test namespace."""
        group_version, _, plural = resource.rpartition("/")
        out = {}
        for key in list(self.k.objects):
            res, ns, name = key
            obj = self.k.objects[key]
            gv = f"{res.group}/{res.version}" if res.group else res.version
            if (gv, res.plural, ns) == (group_version, plural, NS) and not obj.deleted:
                out[name] = dict(obj.raw)
        return out

    def pods(self) -> dict[str, dict[str, Any]]:
        return self.objects(PODS)

    def job(self, name: str) -> dict[str, Any]:
        return self.objects(JOBS)[name]

    def events(self) -> list[dict[str, Any]]:
        return list(self.objects("v1/events").values())


async def eventually(
    check: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition"
) -> Any:
    """Poll until `check()` is truthy (its value is returned) or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (KeyError, IndexError, AssertionError) as err:
            last = err
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@contextlib.asynccontextmanager
async def running_operator(
    k: kmock.KubernetesEmulator,
    *,
    coordinator_url: Callable[[JobRef, SGDJobSpec], str] | None = None,
    resync_seconds: float = 0.3,
    poll_seconds: float = 0.2,
    liveness_endpoint: str | None = None,
) -> AsyncIterator[OperatorState]:
    """Run the operator as a task in this loop; stop it (like a process exit) on leaving."""
    config = OperatorConfig(
        pod_settings=PodSettings(trainer_image=IMAGE, cluster_domain="cluster.test"),
        coordinator_url=coordinator_url,
        resync_seconds=resync_seconds,
        poll_seconds=poll_seconds,
        connection=Connection(server=str(k.url).rstrip("/")),
    )
    async with operator_in_loop(
        config, namespaces=[NS], scanning=False, liveness_endpoint=liveness_endpoint
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
