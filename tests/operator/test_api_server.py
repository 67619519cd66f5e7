"""What only a real API server shows: garbage collection, uids, admission, quotas, RBAC,
printer columns and rotated credentials. Each operator here runs as the chart's ServiceAccount.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from sgdjob.api.validation import SpecError, parse_job
from tests.kube_cluster import CHART_NAMESPACE
from tests.operator.harness import (
    Cluster,
    FakeCoordinator,
    basic_spec,
    eventually,
    running_operator,
    serve_coordinator,
)

ROOT = Path(__file__).resolve().parents[2]
CHILDREN = ("v1/configmaps", "v1/secrets", "v1/services", "v1/pods")


def status(cluster: Cluster, job: str = "j") -> dict[str, Any]:
    return dict(cluster.job(job).get("status") or {})


def children(cluster: Cluster) -> dict[str, set[str]]:
    out = {r: set(cluster.objects(r)) for r in CHILDREN}
    # The token controller adds its own ConfigMap to every namespace.
    out["v1/configmaps"].discard("kube-root-ca.crt")
    return out


async def test_deleting_a_job_lets_the_garbage_collector_remove_every_child(
    cluster: Cluster,
) -> None:
    async with running_operator(cluster):
        uid = await cluster.create_job("j", basic_spec())
        await eventually(lambda: len(cluster.pods()) == 4, what="4 pods")
        await eventually(lambda: all(children(cluster).values()), what="every kind of child")
        for kind in CHILDREN:
            for obj in cluster.objects(kind).values():
                if obj["metadata"]["name"] == "kube-root-ca.crt":
                    continue
                (owner,) = obj["metadata"]["ownerReferences"]
                assert owner["uid"] == uid
        await cluster.delete_job("j")
        await eventually(
            lambda: not any(children(cluster).values()), what="the garbage collector", timeout=120
        )


async def test_a_job_deleted_and_created_again_under_its_name_is_a_new_run(
    cluster: Cluster,
) -> None:
    async with running_operator(cluster) as state:
        old = await cluster.create_job("j", basic_spec())
        await eventually(lambda: len(cluster.pods()) == 4)
        await cluster.set_phase("j-worker-0", "Failed", terminated={"exitCode": 137})
        await eventually(lambda: status(cluster).get("restarts") == 1, what="a restart")
        old_pods = {p["metadata"]["uid"] for p in cluster.pods().values()}
        await cluster.delete_job("j")
        await eventually(lambda: "j" not in cluster.objects("sgdjob.dev/v1alpha1/sgdjobs"))
        new = await cluster.create_job("j", basic_spec())
        assert new != old

        def fresh() -> bool:
            pods = cluster.pods()
            return (
                len(pods) == 4
                and all(p["metadata"]["ownerReferences"][0]["uid"] == new for p in pods.values())
                and status(cluster).get("phase") == "Pending"
            )

        await eventually(fresh, what="the new run's pods", timeout=120)
        st = status(cluster)
        assert st.get("restarts", 0) == 0 and st.get("replicaRestarts", {}) == {}
        assert not {p["metadata"]["uid"] for p in cluster.pods().values()} & old_pods
        env = {
            e["name"]: e.get("value")
            for e in cluster.pods()["j-worker-0"]["spec"]["containers"][0]["env"]
        }
        assert env["SGDJOB_RUN_ID"] == new  # checkpoints and outputs are keyed by it
        # The operator holds state for the live job only.
        assert set(state.jobs) == {new}
        assert set(state.config.metrics.job_phase) <= {new}


async def test_a_leftover_child_of_another_owner_is_never_adopted(cluster: Cluster) -> None:
    # A live owner: the garbage collector would remove a child whose owner is gone.
    owner = await asyncio.to_thread(
        cluster.core.create_namespaced_config_map,
        cluster.ns,
        k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="someone-else")),
    )
    assert owner.metadata is not None
    stranger = k8s.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="someone-else", uid=str(owner.metadata.uid)
    )
    await asyncio.to_thread(
        cluster.core.create_namespaced_config_map,
        cluster.ns,
        k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name="j-spec", owner_references=[stranger]), data={"x": "1"}
        ),
    )
    async with running_operator(cluster):
        await cluster.create_job("j", basic_spec())
        st = await eventually(
            lambda: "j-spec" in status(cluster).get("message", "") and status(cluster),
            what="the blocked name in status",
        )
        assert "owned by ConfigMap/someone-else" in st["message"]
        blocked = [c for c in st["conditions"] if c["type"] == "Blocked"]
        assert blocked and blocked[0]["status"] == "True"
        assert cluster.pods() == {}
        assert cluster.objects("v1/configmaps")["j-spec"]["data"] == {"x": "1"}
        await asyncio.to_thread(cluster.core.delete_namespaced_config_map, "j-spec", cluster.ns)
        await eventually(lambda: len(cluster.pods()) == 4, what="pods once the name is free")
    spec_cm = cluster.objects("v1/configmaps")["j-spec"]
    assert spec_cm["metadata"]["ownerReferences"][0]["kind"] == "SGDJob"


async def test_a_refused_pod_shows_the_servers_message_and_is_retried_with_backoff(
    cluster: Cluster,
) -> None:
    await asyncio.to_thread(
        cluster.core.create_namespaced_resource_quota,
        cluster.ns,
        k8s.V1ResourceQuota(
            metadata=k8s.V1ObjectMeta(name="two-pods"),
            spec=k8s.V1ResourceQuotaSpec(hard={"pods": "2"}),
        ),
    )
    async with running_operator(cluster, resync_seconds=0.25) as state:
        uid = await cluster.create_job("j", basic_spec())
        st = await eventually(
            lambda: "exceeded quota" in status(cluster).get("message", "") and status(cluster),
            what="the quota message in status",
        )
        assert "forbidden" in st["message"].lower() and "two-pods" in st["message"]
        events = [e for e in cluster.events() if e["reason"] in ("Forbidden", "APIError")]
        assert events and "exceeded quota" in events[0]["message"]
        # Backoff: 0.25, 0.5, 1, 2, 4 s ... so in 4 s a handful of passes, not sixteen. The
        # status is written before the pass counts its failure, so count from a counted one:
        # from there at most four more fall in 4 s (+0.25, +0.75, +1.75, +3.75), and one more
        # for where in its wait the count was read.
        await eventually(lambda: state.jobs[uid].failures >= 1, what="a counted failure")
        before = state.jobs[uid].failures
        await asyncio.sleep(4)
        assert 1 <= state.jobs[uid].failures - before <= 5
        # One Event per distinct message, not one per retry.
        again = [e for e in cluster.events() if e["reason"] in ("Forbidden", "APIError")]
        assert sum(e.get("count", 1) for e in again) <= 2
        assert len(cluster.pods()) == 2


async def test_removing_one_verb_the_operator_needs_fails_the_job_visibly_with_the_403(
    cluster: Cluster, tmp_path: Path
) -> None:
    rbac = k8s.RbacAuthorizationV1Api(cluster.kc.api)
    chart_role = await asyncio.to_thread(rbac.read_cluster_role, "sgdjob-sgdjob-operator")
    rules = []
    for rule in chart_role.rules or []:
        verbs = list(rule.verbs)
        if "pods" in (rule.resources or []) and "create" in verbs:
            verbs.remove("create")
        rules.append(
            k8s.V1PolicyRule(api_groups=rule.api_groups, resources=rule.resources, verbs=verbs)
        )
    name = f"sgdjob-no-pod-create-{cluster.ns}"
    sa = "limited-operator"
    await asyncio.to_thread(
        cluster.core.create_namespaced_service_account,
        cluster.ns,
        k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=sa)),
    )
    role = k8s.V1ClusterRole(metadata=k8s.V1ObjectMeta(name=name), rules=rules)
    await asyncio.to_thread(rbac.create_cluster_role, role)
    binding = k8s.V1ClusterRoleBinding(
        metadata=k8s.V1ObjectMeta(name=name),
        role_ref=k8s.V1RoleRef(
            api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=name
        ),
        subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=sa, namespace=cluster.ns)],
    )
    await asyncio.to_thread(rbac.create_cluster_role_binding, binding)
    try:
        token = await asyncio.to_thread(
            cluster.core.create_namespaced_service_account_token,
            sa,
            cluster.ns,
            k8s.AuthenticationV1TokenRequest(
                spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
            ),
        )
        assert token.status is not None
        cluster.token_file.write_text(str(token.status.token))
        async with running_operator(cluster):
            await cluster.create_job("j", basic_spec())
            st = await eventually(
                lambda: "403" in status(cluster).get("message", "") and status(cluster),
                what="the 403 in status",
            )
        assert "create pods/j-" in st["message"] and "forbidden" in st["message"].lower()
        assert [c["reason"] for c in st["conditions"] if c["type"] == "Blocked"] == ["Forbidden"]
        assert cluster.pods() == {}
        assert any(e["reason"] == "Forbidden" for e in cluster.events())
    finally:
        await asyncio.to_thread(rbac.delete_cluster_role_binding, name)
        await asyncio.to_thread(rbac.delete_cluster_role, name)


async def test_a_rotated_token_does_not_break_the_operators_writes(cluster: Cluster) -> None:
    first = f"token-a-{cluster.ns}"
    cluster.token_file.write_text(cluster.kc.operator_token(bound_secret=first))
    async with running_operator(cluster):
        await cluster.create_job("j", basic_spec())
        await eventually(lambda: len(cluster.pods()) == 4)
        # Rotate: a new token in the file, then revoke the old one by deleting what binds it.
        second = f"token-b-{cluster.ns}"
        cluster.token_file.write_text(cluster.kc.operator_token(bound_secret=second))
        await asyncio.to_thread(cluster.core.delete_namespaced_secret, first, CHART_NAMESPACE)
        await cluster.set_phase("j-worker-1", "Failed", terminated={"exitCode": 137})
        st = await eventually(lambda: status(cluster).get("restarts") == 1 and status(cluster))
        await eventually(lambda: cluster.pods()["j-worker-1"]["status"]["phase"] == "Pending")
    assert st["replicaRestarts"] == {"worker-1": 1}
    await asyncio.to_thread(cluster.core.delete_namespaced_secret, second, CHART_NAMESPACE)


async def test_kubectl_get_shows_the_status_the_operator_wrote(cluster: Cluster) -> None:
    fake = FakeCoordinator({0: 0.1, 1: 0.1})
    async with (
        serve_coordinator(fake) as url,
        running_operator(cluster, coordinator_url=lambda ref, spec: url),
    ):
        await cluster.create_job("j", basic_spec())
        await eventually(lambda: len(cluster.pods()) == 4)
        for name in sorted(cluster.pods()):
            await cluster.patch_pod(
                name, {"spec": {"nodeName": "node-a"}, "status": {"phase": "Running"}}
            )
        await eventually(
            lambda: (
                status(cluster).get("accuracy") == 0.8 and status(cluster)["phase"] == "Running"
            ),
            what="a report while running",
        )
    out = cluster.kc.kubectl("-n", cluster.ns, "get", "sgdj", "j", "-o", "wide")
    header, row = out.rstrip("\n").splitlines()
    # Columns by their header's offsets: an empty column prints nothing, not a placeholder.
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    cols = {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}
    st = status(cluster)
    assert cols["PHASE"] == st["phase"] == "Running"
    assert cols["LOSS"] == "0.5" and cols["ACCURACY"] == "0.8"
    assert cols["STEP"] == str(st["step"])


async def test_the_spec_of_a_created_job_is_immutable_with_a_message(cluster: Cluster) -> None:
    await cluster.create_job("j", basic_spec())
    with pytest.raises(ApiException) as err:
        await asyncio.to_thread(
            cluster.custom.patch_namespaced_custom_object,
            "sgdjob.dev", "v1alpha1", cluster.ns, "sgdjobs", "j",
            {"spec": {"training": {"maxSteps": 5}}},
            _content_type="application/merge-patch+json",
        )  # fmt: skip
    assert err.value.status == 422
    assert "spec is immutable" in str(err.value.body)


def test_a_name_the_service_could_not_carry_is_rejected_at_admission(cluster: Cluster) -> None:
    for bad, words in (("2024-run", "should match"), ("a" * 41, "may not be more than 40")):
        job = {
            "apiVersion": "sgdjob.dev/v1alpha1",
            "kind": "SGDJob",
            "metadata": {"name": bad, "namespace": cluster.ns},
            "spec": basic_spec(),
        }
        out = _apply(cluster, job)
        assert "metadata.name" in out and words in out, out
        with pytest.raises(SpecError) as err:
            parse_job(job)
        assert err.value.paths == ["metadata.name"]


def _apply(cluster: Cluster, doc: Any) -> str:
    return cluster.kc.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc), check=False
    )


def test_every_example_passes_a_server_side_dry_run(cluster: Cluster) -> None:
    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert files
    for path in files:
        doc = yaml.safe_load(path.read_text())
        doc.setdefault("metadata", {})["namespace"] = cluster.ns
        out = _apply(cluster, doc)
        assert "created (server dry run)" in out, f"{path.name}: {out}"


INVALID: list[tuple[str, dict[str, Any]]] = [
    ("a negative learning rate", {"training": {"maxSteps": 10, "lr": -1}}),
    ("zero shards", {"parameterServers": {"shards": 0}}),
    ("an unknown mode", {"training": {"maxSteps": 10, "mode": "gossip"}}),
    ("steps and epochs", {"training": {"maxSteps": 10, "epochs": 2}}),
    ("no steps or epochs", {"training": {}}),
    ("both model sources", {"model": {"builtin": "mlp", "entryPoint": "a:b"}}),
    ("too many backup workers", {"training": {"maxSteps": 5, "backupWorkers": 2}}),
    (
        "backup workers out of sync",
        {
            "training": {"maxSteps": 5, "mode": "async", "backupWorkers": 1},
            "workers": {"replicas": 3},
        },
    ),
    ("staleness in sync", {"training": {"maxSteps": 5, "staleness": "zhang"}}),
    ("lazy fetches outside downpour", {"training": {"maxSteps": 5, "fetchEvery": 3}}),
    ("a bad compression kind", {"compression": {"kind": "zip"}}),
    ("workers' updates without 1-bit", {"compression": {"send": "updates"}}),
    (
        "workers' updates in async mode",
        {
            "compression": {"kind": "onebit", "send": "updates"},
            "training": {"maxSteps": 5, "mode": "async"},
        },
    ),
    ("odena's scale in sync", {"training": {"maxSteps": 5, "odenaScale": 2.0}}),
    # The workload rules (model, data, task, optimizer, schedule), CEL twins of Python's.
    ("a custom task without its entry point", {"training": {"maxSteps": 5, "task": "custom"}}),
    (
        "a language model on digits with an MLP",
        {"training": {"maxSteps": 5, "task": "languageModel"}},
    ),
    (
        "heads that do not divide dModel",
        {"model": {"builtin": "mlp", "transformer": {"dModel": 10, "heads": 4}}},
    ),
    (
        "rotary positions with an odd head width",
        {
            "model": {
                "builtin": "mlp",
                "transformer": {"dModel": 12, "heads": 4, "positions": "rotary"},
            }
        },
    ),
    ("an Adam knob on SGD", {"training": {"maxSteps": 5, "beta2": 0.99}}),
    ("Nesterov without momentum", {"training": {"maxSteps": 5, "nesterov": True, "momentum": 0}}),
    ("momentum on Adam", {"training": {"maxSteps": 5, "optimizer": "adam", "momentum": 0.5}}),
    ("Nesterov on AdamW", {"training": {"maxSteps": 5, "optimizer": "adamw", "nesterov": True}}),
    (
        "odena with Adam",
        {"training": {"maxSteps": 5, "optimizer": "adam", "mode": "async", "staleness": "odena"}},
    ),
    (
        "warmup as long as the run",
        {"training": {"maxSteps": 5, "schedule": {"kind": "cosine", "warmupSteps": 5}}},
    ),
    (
        "a cosine floor above the rate",
        {"training": {"maxSteps": 5, "lr": 0.01, "schedule": {"kind": "cosine", "minLr": 0.1}}},
    ),
]


@pytest.mark.parametrize(("what", "over"), INVALID, ids=[w for w, _ in INVALID])
def test_an_invalid_job_is_rejected_by_the_api_server_and_by_validate_with_the_same_path(
    cluster: Cluster, what: str, over: dict[str, Any]
) -> None:
    job = {
        "apiVersion": "sgdjob.dev/v1alpha1",
        "kind": "SGDJob",
        "metadata": {"name": "bad", "namespace": cluster.ns},
        "spec": basic_spec(**over),
    }
    with pytest.raises(SpecError) as err:
        parse_job(job)
    ours = set(err.value.paths)
    out = _apply(cluster, job)
    assert "is invalid" in out, f"{what}: the API server accepted it: {out}"
    server = {
        line.split(":", 1)[0].lstrip("* ").strip()
        for line in out.replace("is invalid: ", "is invalid:\n").splitlines()[1:]
        if line.strip().startswith(("* spec", "spec", "* metadata", "metadata"))
    }
    assert server == ours, f"{what}: server {server} vs sgdjob validate {ours}"
