"""On the real API server: restarts, budgets, stragglers, success, deadlines, restarts."""

from __future__ import annotations

import asyncio
from typing import Any

from sgdjob.api.types import SGDJobSpec
from sgdjob_operator.manifests import JobRef
from tests.operator.harness import (
    Cluster,
    FakeCoordinator,
    basic_spec,
    eventually,
    running_operator,
    serve_coordinator,
)


def attempt(cluster: Cluster, pod: str) -> str:
    return cluster.pods()[pod]["metadata"]["labels"]["sgdjob.dev/attempt"]


def status(cluster: Cluster, job: str = "j") -> dict[str, Any]:
    return dict(cluster.job(job).get("status") or {})


async def start_all(cluster: Cluster, n_pods: int) -> None:
    """Wait for the pods and mark every one Running on its own node."""
    await eventually(lambda: len(cluster.pods()) == n_pods, what=f"{n_pods} pods")
    for name in sorted(cluster.pods()):
        await cluster.patch_pod(
            name, {"spec": {"nodeName": f"node-{name}"}, "status": {"phase": "Running"}}
        )
    await eventually(lambda: status(cluster).get("phase") == "Running", what="phase Running")


async def test_a_failed_worker_pod_is_recreated_and_counted(cluster: Cluster) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec())
        await start_all(cluster, 4)
        await cluster.set_phase(
            "j-worker-1", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"}
        )
        await eventually(lambda: attempt(cluster, "j-worker-1") == "1", what="attempt 1")
        st = await eventually(lambda: status(cluster).get("restarts") == 1 and status(cluster))
    assert st["replicaRestarts"] == {"worker-1": 1}
    # A fresh pod, not the old one: the scheduler has not placed it, nothing ran it.
    assert cluster.pods()["j-worker-1"]["status"]["phase"] == "Pending"
    assert attempt(cluster, "j-worker-0") == "0"
    (event,) = [e for e in cluster.events() if e["reason"] == "Restarted"]
    assert event["type"] == "Warning"
    assert "j-worker-1" in event["message"] and "OOMKilled" in event["message"]
    restarting = [c for c in st["conditions"] if c["type"] == "Restarting"]
    assert restarting[0]["status"] == "True" and restarting[0]["message"] == "worker-1"


async def test_restarting_clears_once_the_new_pod_runs(cluster: Cluster) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec())
        await start_all(cluster, 4)
        await cluster.set_phase("j-worker-1", "Failed", terminated={"exitCode": 137})
        await eventually(lambda: attempt(cluster, "j-worker-1") == "1")
        await cluster.set_phase("j-worker-1", "Running")

        def restarting() -> str:
            conds = {c["type"]: c for c in status(cluster).get("conditions", [])}
            return str(conds["Restarting"]["status"])

        await eventually(lambda: restarting() == "False", what="Restarting False")
    assert status(cluster)["phase"] == "Running"


async def test_an_exhausted_restart_budget_fails_the_job_with_a_message(cluster: Cluster) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec(supervision={"maxRestarts": 1}))
        await start_all(cluster, 4)
        await cluster.set_phase("j-worker-0", "Failed", terminated={"exitCode": 143})
        await eventually(lambda: attempt(cluster, "j-worker-0") == "1", what="restart")
        await cluster.set_phase("j-worker-0", "Failed", terminated={"exitCode": 143})
        st = await eventually(
            lambda: status(cluster).get("phase") == "Failed" and status(cluster), what="Failed"
        )
        # cleanPodPolicy Running (the default): the running pods are deleted, the failed kept.
        await eventually(lambda: sorted(cluster.pods()) == ["j-worker-0"], what="clean-up")
    assert "worker 0" in st["message"] and "maxRestarts 1" in st["message"]
    assert st["restarts"] == 1
    assert st["completionTime"]
    failed = [c for c in st["conditions"] if c["type"] == "Failed"]
    assert failed[0]["reason"] == "RestartBudgetExhausted"
    assert any(e["reason"] == "RestartBudgetExhausted" for e in cluster.events())


async def test_a_permanent_worker_error_fails_the_job_at_once(cluster: Cluster) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec())
        await start_all(cluster, 4)
        await cluster.set_phase("j-worker-1", "Failed", terminated={"exitCode": 2})
        st = await eventually(lambda: status(cluster).get("phase") == "Failed" and status(cluster))
    assert "exit code 2" in st["message"] and st["restarts"] == 0


async def test_a_failed_shard_fails_the_job_naming_the_shard(cluster: Cluster) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec())
        await start_all(cluster, 4)
        await cluster.set_phase("j-ps-1", "Failed", terminated={"exitCode": 137})
        st = await eventually(lambda: status(cluster).get("phase") == "Failed" and status(cluster))
    assert "shard 1" in st["message"]


async def test_a_failed_shard_with_checkpoints_on_a_claim_is_recreated_and_restore_shown(
    cluster: Cluster,
) -> None:
    fake = FakeCoordinator({0: 0.1, 1: 0.1}, restored_from=40)
    spec = basic_spec(checkpoint={"every": 20}, kubernetes={"outputClaimName": "runs"})
    async with serve_coordinator(fake) as url:

        def coordinator(_ref: JobRef, _spec: SGDJobSpec) -> str:
            return url

        async with running_operator(cluster.k, coordinator_url=coordinator):
            await cluster.create_job("j", spec)
            await start_all(cluster, 4)
            await cluster.set_phase("j-ps-0", "Failed", terminated={"exitCode": 137})
            await eventually(lambda: attempt(cluster, "j-ps-0") == "1", what="shard recreated")
            # The kubelet runs the new pod; once it runs, the coordinator reports its restore.
            await cluster.patch_pod(
                "j-ps-0", {"spec": {"nodeName": "node-new"}, "status": {"phase": "Running"}}
            )
            st = await eventually(
                lambda: (
                    status(cluster).get("restarts") == 1
                    and status(cluster).get("restoredVersion") == 40
                    and status(cluster)
                )
            )
    assert st["replicaRestarts"] == {"ps-0": 1}
    assert st["phase"] != "Failed"
    volumes = cluster.pods()["j-ps-0"]["spec"]["volumes"]
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "runs"}} in volumes
    (event,) = [e for e in cluster.events() if e["reason"] == "Restarted"]
    assert "j-ps-0" in event["message"]


async def test_every_pod_gets_only_its_roles_share_of_the_job_keys(cluster: Cluster) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec())
        await eventually(lambda: len(cluster.pods()) == 4, what="4 pods")
    secret = cluster.objects("v1/secrets")["j-token"]
    assert {"token", "server-public", "server-secret", "client-public", "client-secret"} <= set(
        secret["data"]
    )
    for name, pod in cluster.pods().items():
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        for var in ("SGDJOB_CURVE_SERVER_PUBLIC", "SGDJOB_CURVE_CLIENT_PUBLIC", "SGDJOB_TOKEN"):
            assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "j-token"
            assert "value" not in env[var]  # no key material in the pod spec
        has_server_secret = "SGDJOB_CURVE_SERVER_SECRET" in env
        has_client_secret = "SGDJOB_CURVE_CLIENT_SECRET" in env
        assert (has_server_secret, has_client_secret) == (
            (True, False) if "-ps-" in name else (False, True)
        )


async def test_a_slow_worker_reported_by_the_coordinator_is_replaced(cluster: Cluster) -> None:
    fake = FakeCoordinator({0: 0.1, 1: 0.11, 2: 1.0})
    spec = basic_spec(
        workers={"replicas": 3},
        supervision={"straggler": {"factor": 3.0, "windows": 2, "maxReplacements": 1}},
    )
    async with serve_coordinator(fake) as url:

        def coordinator(_ref: JobRef, _spec: SGDJobSpec) -> str:
            return url

        async with running_operator(cluster.k, coordinator_url=coordinator):
            await cluster.create_job("j", spec)
            await start_all(cluster, 5)
            await eventually(lambda: attempt(cluster, "j-worker-2") == "1", what="replacement")
            st = await eventually(
                lambda: status(cluster).get("replacedStragglers") == 1 and status(cluster)
            )
    pod = cluster.pods()["j-worker-2"]
    (term,) = pod["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert [term["preference"]] == [
        {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/hostname",
                    "operator": "NotIn",
                    "values": ["node-j-worker-2"],
                }
            ]
        }
    ]
    assert attempt(cluster, "j-worker-0") == attempt(cluster, "j-worker-1") == "0"
    assert st["restarts"] == 0
    assert st["step"] >= 2 and st["loss"] == 0.5 and st["accuracy"] == 0.8
    assert st["samplesPerSecond"] == 1234.5 and st["totalSteps"] == 100
    (event,) = [e for e in cluster.events() if e["reason"] == "ReplacedStraggler"]
    assert "node-j-worker-2" in event["message"]


async def test_a_straggler_is_stopped_gracefully_and_replaced_only_once_it_is_gone(
    cluster: Cluster,
) -> None:
    fake = FakeCoordinator({0: 0.1, 1: 0.11, 2: 1.0})
    spec = basic_spec(
        workers={"replicas": 3},
        supervision={"straggler": {"factor": 3.0, "windows": 2, "maxReplacements": 1}},
    )
    cluster.kubelet_paused = True  # the old pod's kubelet has not confirmed its exit yet
    async with (
        serve_coordinator(fake) as url,
        running_operator(cluster.k, coordinator_url=lambda _r, _s: url) as state,
    ):
        await cluster.create_job("j", spec)
        await start_all(cluster, 5)
        old = cluster.pods()["j-worker-2"]["metadata"]["uid"]
        pod = await eventually(
            lambda: (
                cluster.pods()["j-worker-2"]["metadata"].get("deletionTimestamp")
                and cluster.pods()["j-worker-2"]
            ),
            what="the straggler terminating",
        )
        # Its grace period, not a kill: the pod's own terminationGracePeriodSeconds.
        assert pod["metadata"]["deletionGracePeriodSeconds"] > 0
        passes = state.config.metrics.reconciles
        await eventually(lambda: state.config.metrics.reconciles >= passes + 5, what="passes")
        # Still the one old pod: no second copy of worker-2 while the first may still run.
        assert cluster.pods()["j-worker-2"]["metadata"]["uid"] == old
        assert attempt(cluster, "j-worker-2") == "0"
        cluster.kubelet_paused = False
        await eventually(lambda: attempt(cluster, "j-worker-2") == "1", what="the replacement")
    assert cluster.pods()["j-worker-2"]["metadata"]["uid"] != old


async def test_all_workers_succeeded_succeeds_the_job_and_cleans_up_running_pods(
    cluster: Cluster,
) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec())
        await start_all(cluster, 4)
        for i in range(2):
            await cluster.set_phase(f"j-worker-{i}", "Succeeded", terminated={"exitCode": 0})
        st = await eventually(
            lambda: status(cluster).get("phase") == "Succeeded" and status(cluster)
        )
        await eventually(
            lambda: sorted(cluster.pods()) == ["j-worker-0", "j-worker-1"], what="shards cleaned"
        )
    assert st["completionTime"]
    types = {c["type"]: c["status"] for c in st["conditions"]}
    assert types["Succeeded"] == "True" and types["Running"] == "False"
    assert any(e["reason"] == "AllWorkersSucceeded" for e in cluster.events())


async def test_a_finished_job_is_deleted_after_its_ttl_and_clean_policy_none_keeps_pods(
    cluster: Cluster,
) -> None:
    # A TTL no loaded machine can outrun: the pods are checked while the job still exists.
    spec = basic_spec(supervision={"ttlSecondsAfterFinished": 5, "cleanPodPolicy": "None"})
    async with running_operator(cluster.k):
        await cluster.create_job("j", spec)
        await start_all(cluster, 4)
        for i in range(2):
            await cluster.set_phase(f"j-worker-{i}", "Succeeded", terminated={"exitCode": 0})
        seen = await eventually(
            lambda: (
                "j" not in cluster.objects("sgdjob.dev/v1alpha1/sgdjobs")
                or (status(cluster).get("phase") == "Succeeded" and len(cluster.pods()))
            ),
            what="Succeeded",
        )
        if seen is not True:  # still there: cleanPodPolicy None deleted no pod
            assert seen == 4
        await eventually(lambda: "j" not in cluster.objects("sgdjob.dev/v1alpha1/sgdjobs"))
    # The pods go with their owner, through the garbage collector.
    await eventually(lambda: not cluster.pods(), what="the GC", timeout=120)


async def test_a_pod_pending_past_the_deadline_fails_the_job_naming_the_reason(
    cluster: Cluster,
) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec(supervision={"preRunningDeadlineSeconds": 3}))
        await eventually(lambda: len(cluster.pods()) == 4)
        # Every pod runs but worker-1, which cannot pull its image (creation times are the
        # server's own, so the deadline is a real 3 s).
        for name in ("j-ps-0", "j-ps-1", "j-worker-0"):
            await cluster.patch_pod(name, {"status": {"phase": "Running"}})
        await cluster.patch_pod(
            "j-worker-1",
            {
                "status": {
                    "phase": "Pending",
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "image": "example.test/sgdjob:test",
                            "imageID": "",
                            "ready": False,
                            "restartCount": 0,
                            "state": {"waiting": {"reason": "ImagePullBackOff"}},
                        }
                    ],
                },
            },
        )
        st = await eventually(lambda: status(cluster).get("phase") == "Failed" and status(cluster))
    assert "worker-1" in st["message"] and "ImagePullBackOff" in st["message"]
    assert "3s" in st["message"]


async def test_the_operator_restarted_mid_job_creates_no_duplicates_and_keeps_counters(
    cluster: Cluster,
) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec())
        await start_all(cluster, 4)
        await cluster.set_phase("j-worker-0", "Failed", terminated={"exitCode": 137})
        await eventually(lambda: status(cluster).get("restarts") == 1)
        await eventually(lambda: attempt(cluster, "j-worker-0") == "1")
    before = {n: p["metadata"]["uid"] for n, p in cluster.pods().items()}

    async with running_operator(cluster.k) as state:
        # Let the new operator resume and run several passes over the same job.
        await eventually(lambda: state.config.metrics.reconciles >= 5, what="passes")
        # The same pod objects (uids), none created again, none added.
        assert {n: p["metadata"]["uid"] for n, p in cluster.pods().items()} == before
        assert status(cluster)["restarts"] == 1
        # The counters carried over: the next failure is restart number 2.
        await cluster.patch_pod("j-worker-0", {"status": {"phase": "Running"}})
        await cluster.set_phase("j-worker-0", "Failed", terminated={"exitCode": 137})
        st = await eventually(lambda: status(cluster).get("restarts") == 2 and status(cluster))
        # Counters are persisted before acting; the new pod follows.
        await eventually(lambda: attempt(cluster, "j-worker-0") == "2", what="attempt 2")
    assert st["replicaRestarts"] == {"worker-0": 2}
    assert len(cluster.pods()) == 4


async def test_the_active_deadline_fails_a_running_job(cluster: Cluster) -> None:
    async with running_operator(cluster.k):
        await cluster.create_job("j", basic_spec(supervision={"activeDeadlineSeconds": 1}))
        # Neither phase Running nor the four pods are waited for: on a loaded machine the
        # deadline may come first, and the failed job's pods are cleaned up at once, so a
        # poll can miss the moment all four existed (it did, with make test beside it).
        st = await eventually(lambda: status(cluster).get("phase") == "Failed" and status(cluster))
    assert "activeDeadlineSeconds (1s)" in st["message"]
    failed = [c for c in st["conditions"] if c["type"] == "Failed"]
    assert failed[0]["reason"] == "DeadlineExceeded"


async def test_a_restarted_operator_still_honours_the_ttl_of_a_finished_job(
    cluster: Cluster,
) -> None:
    # The TTL is far beyond the first operator's life, and the completion time is then moved
    # an hour back: only the restarted operator can have deleted the job, whatever the load.
    spec = basic_spec(supervision={"ttlSecondsAfterFinished": 600})
    async with running_operator(cluster.k):
        await cluster.create_job("j", spec)
        await start_all(cluster, 4)
        for i in range(2):
            await cluster.set_phase(f"j-worker-{i}", "Succeeded", terminated={"exitCode": 0})
        await eventually(lambda: status(cluster).get("phase") == "Succeeded")
    assert "j" in cluster.objects("sgdjob.dev/v1alpha1/sgdjobs")
    await asyncio.to_thread(
        cluster.custom.patch_namespaced_custom_object_status,
        "sgdjob.dev", "v1alpha1", cluster.ns, "sgdjobs", "j",
        {"status": {"completionTime": "2020-01-01T00:00:00Z"}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    async with running_operator(cluster.k):
        await eventually(lambda: "j" not in cluster.objects("sgdjob.dev/v1alpha1/sgdjobs"))
