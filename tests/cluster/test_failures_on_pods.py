"""Real pods under failure: SIGKILL from the host, a straggler, the operator pod deleted,
Pod Security "restricted", and a job deleted and applied again.

Workers are slowed with ``spec.debug.slowWorkers`` only so that a run lasts long enough to be
interrupted mid-way; every kill is a real SIGKILL of the container's process on the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.node import CHART_NAMESPACE, EXAMPLES, Node, example
from tests.kube_cluster import delete_namespace, new_namespace

# A job is minutes of real pods on two shared cores (the default per-test limit is 300 s).
pytestmark = pytest.mark.timeout(1800)

SLOW = {"debug": {"slowWorkers": {"0": 150, "1": 150}}}


def _attempt(node: Node, ns: str, pod: str) -> str:
    pods = node.pods(ns)
    return str(pods[pod]["metadata"]["labels"].get("sgdjob.dev/attempt", "")) if pod in pods else ""


def _running_at(node: Node, ns: str, job: str, step: int) -> dict[str, object]:
    def probe() -> dict[str, object] | None:
        st = node.status(ns, job)
        if st.get("phase") == "Failed":
            raise AssertionError(f"{job} failed: {st.get('message')}")
        return st if st.get("phase") == "Running" and int(st.get("step") or 0) >= step else None

    return node.wait(
        probe, what=f"{job} running past step {step}", diagnose=lambda: node.diagnose(ns)
    )


def _running_pod(node: Node, ns: str, pod: str) -> None:
    node.wait(
        lambda: node.pods(ns).get(pod, {}).get("status", {}).get("phase") == "Running",
        what=f"{pod} running",
        diagnose=lambda: node.diagnose(ns),
    )


def test_a_worker_killed_from_the_host_is_recreated_counted_once_and_the_job_succeeds(
    node: Node, namespace: str
) -> None:
    node.apply(namespace, example("digits-sync", **SLOW))
    _running_at(node, namespace, "digits-sync", 20)
    _running_pod(node, namespace, "digits-sync-worker-1")
    old = node.pods(namespace)["digits-sync-worker-1"]["metadata"]["uid"]
    node.kill9(namespace, "digits-sync-worker-1")
    node.wait(
        lambda: _attempt(node, namespace, "digits-sync-worker-1") == "1",
        what="the operator to recreate worker-1",
        diagnose=lambda: node.diagnose(namespace),
    )
    st = node.wait_phase(namespace, "digits-sync", "Succeeded")
    assert node.pods(namespace)["digits-sync-worker-1"]["metadata"]["uid"] != old
    assert st["restarts"] == 1 and st["replicaRestarts"] == {"worker-1": 1}, st
    assert st["accuracy"] >= 0.93


def test_a_shard_killed_from_the_host_restores_from_its_checkpoint_on_the_claim(
    node: Node, namespace: str
) -> None:
    node.claim(namespace, "out")
    # Slower than SLOW: at 150 ms a step the run ended before the kill landed mid-run.
    doc = example(
        "digits-sync",
        kubernetes={"outputClaimName": "out"},
        checkpoint={"every": 20},
        debug={"slowWorkers": {"0": 400, "1": 400}},
    )
    node.apply(namespace, doc)
    _running_at(node, namespace, "digits-sync", 60)
    # The run's own directory on the claim: <job>/<uid>/checkpoints/shard-<i>/.
    uid = node.get(namespace, "sgdj", "digits-sync")["metadata"]["uid"]
    ckpts = node.claim_dir(namespace, "out") / "digits-sync" / uid / "checkpoints"
    node.wait(
        lambda: any(ckpts.glob("shard-0/*.sgdckpt")),
        what=f"a checkpoint of shard 0 in {ckpts}",
        diagnose=lambda: node.diagnose(namespace),
    )
    node.kill9(namespace, "digits-sync-ps-0")
    node.wait(
        lambda: _attempt(node, namespace, "digits-sync-ps-0") == "1",
        what="the operator to recreate ps-0",
        diagnose=lambda: node.diagnose(namespace),
    )
    st = node.wait_phase(namespace, "digits-sync", "Succeeded")
    assert st["restoredVersion"] is not None and 20 <= st["restoredVersion"] < 300, st
    assert st["replicaRestarts"] == {"ps-0": 1}, st


def test_a_straggler_is_replaced_with_status_and_an_event(node: Node, namespace: str) -> None:
    # Asynchronous: each worker steps at its own pace, so the slow one shows in step times.
    # The others are slowed a little too, and the run is longer, so that it lasts beyond the
    # replacement (the old pod is deleted first, and its successor created once it is gone).
    job = "digits-async-zhang"
    doc = example(
        job,
        training={"maxSteps": 3000},
        debug={"slowWorkers": {"0": 20, "1": 20, "2": 1000}},
        supervision={"straggler": {"factor": 3.0, "windows": 2, "maxReplacements": 1}},
    )
    node.apply(namespace, doc)
    node.wait(
        lambda: node.status(namespace, job).get("replacedStragglers") == 1,
        what="the straggler's replacement in status",
        diagnose=lambda: node.diagnose(namespace),
    )
    node.wait(
        lambda: _attempt(node, namespace, f"{job}-worker-2") == "1",
        what="worker-2's successor (attempt 1)",
        diagnose=lambda: node.diagnose(namespace),
    )
    reasons = [e["reason"] for e in node.events(namespace)]
    assert "ReplacedStraggler" in reasons
    st = node.wait_phase(namespace, job, "Succeeded")
    assert st["replacedStragglers"] == 1 and st["restarts"] == 0, st
    # Only the straggler was replaced; the others ran on.
    assert _attempt(node, namespace, f"{job}-worker-0") == "0"
    assert _attempt(node, namespace, f"{job}-worker-1") == "0"


def test_the_operator_pod_deleted_mid_job_duplicates_nothing_and_loses_no_counter(
    node: Node, namespace: str
) -> None:
    node.apply(namespace, example("digits-sync", **SLOW))
    _running_at(node, namespace, "digits-sync", 20)
    _running_pod(node, namespace, "digits-sync-worker-0")
    node.kill9(namespace, "digits-sync-worker-0")
    node.wait(
        lambda: node.status(namespace, "digits-sync").get("restarts") == 1,
        what="the restart counted",
        diagnose=lambda: node.diagnose(namespace),
    )
    before = {n: p["metadata"]["uid"] for n, p in node.pods(namespace).items()}
    (op,) = node.operator_pods()
    node.kubectl("-n", CHART_NAMESPACE, "delete", "pod", op["metadata"]["name"], "--wait=true")
    node.kubectl(
        "-n",
        CHART_NAMESPACE,
        "rollout",
        "status",
        "deploy/sgdjob-sgdjob-operator",
        "--timeout=300s",
    )
    st = node.wait_phase(namespace, "digits-sync", "Succeeded")
    after = node.pods(namespace)
    assert st["restarts"] == 1 and st["replicaRestarts"] == {"worker-0": 1}, st
    # The new operator adopted every pod: the same uids, and no extra pod for any replica.
    assert {n: after[n]["metadata"]["uid"] for n in before if n in after} == {
        n: uid for n, uid in before.items() if n in after
    }
    assert set(after) <= set(before)


@pytest.fixture
def restricted_namespace(node: Node) -> Iterator[str]:
    ns = new_namespace(
        node.cluster,
        labels={
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        },
    )
    yield ns
    delete_namespace(node.cluster, ns)


def test_a_namespace_enforcing_pod_security_restricted_admits_the_pods_and_the_job_succeeds(
    node: Node, restricted_namespace: str
) -> None:
    ns = restricted_namespace
    node.claim(ns, "out")
    node.apply(ns, example("digits-sync", kubernetes={"outputClaimName": "out"}))
    st = node.wait_phase(ns, "digits-sync", "Succeeded")
    assert st["accuracy"] >= 0.93
    refused = [e for e in node.events(ns) if "violates PodSecurity" in e.get("message", "")]
    assert refused == []


def test_a_deleted_job_takes_its_pods_and_applying_it_again_trains_a_fresh_run(
    node: Node, namespace: str
) -> None:
    path = EXAMPLES / "digits-sync.yaml"
    node.apply_file(namespace, path)
    first = node.wait_phase(namespace, "digits-sync", "Succeeded")
    uid = node.get(namespace, "sgdj", "digits-sync")["metadata"]["uid"]
    node.kubectl("-n", namespace, "delete", "sgdj", "digits-sync", "--wait=true")
    node.wait(lambda: not node.pods(namespace), what="the garbage collector to remove the pods")
    node.apply_file(namespace, path)
    again = node.get(namespace, "sgdj", "digits-sync")
    assert again["metadata"]["uid"] != uid and not (again.get("status") or {}).get("accuracy")
    second = node.wait_phase(namespace, "digits-sync", "Succeeded")
    assert second["accuracy"] >= 0.93 and second["restarts"] == 0
    assert second["startTime"] != first["startTime"]
    env = node.pods(namespace)["digits-sync-worker-0"]["spec"]["containers"][0]["env"]
    run_ids = [e.get("value") for e in env if e["name"] == "SGDJOB_RUN_ID"]
    assert run_ids in ([again["metadata"]["uid"]], [])
