"""On the real API server: an SGDJob's children, and an invalid spec that creates none."""

from __future__ import annotations

import base64
import json

from sgdjob.api.validation import spec_to_json, validate_spec
from tests.operator.harness import (
    IMAGE,
    Cluster,
    basic_spec,
    eventually,
    running_operator,
)


def env_of(pod: dict) -> dict:
    (container,) = pod["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


async def test_creating_an_sgdjob_yields_configmap_secret_service_shards_and_workers(
    cluster: Cluster,
) -> None:
    raw = basic_spec(
        training={"maxSteps": 100, "backupWorkers": 1},
        workers={"replicas": 2, "gpus": 1},
        kubernetes={
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "workerResources": {"limits": {"cpu": "2", "memory": "4Gi"}},
            "psResources": {"requests": {"cpu": "500m"}},
        },
    )
    async with running_operator(cluster.k):
        uid = await cluster.create_job("j", raw)
        pods = await eventually(
            lambda: len(cluster.pods()) == 5 and cluster.pods(), what="2 shards + 3 workers"
        )

    assert sorted(pods) == ["j-ps-0", "j-ps-1", "j-worker-0", "j-worker-1", "j-worker-2"]
    owner = {
        "apiVersion": "sgdjob.dev/v1alpha1",
        "kind": "SGDJob",
        "name": "j",
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    cm = cluster.objects("v1/configmaps")["j-spec"]
    secret = cluster.objects("v1/secrets")["j-token"]
    svc = cluster.objects("v1/services")["j-ps"]
    for obj, role in ((cm, "spec"), (secret, "token"), (svc, "service")):
        assert obj["metadata"]["ownerReferences"] == [owner]
        assert obj["metadata"]["labels"] == {
            "sgdjob.dev/job": "j",
            "sgdjob.dev/role": role,
            "sgdjob.dev/index": "",
        }
    assert json.loads(cm["data"]["spec.json"]) == json.loads(spec_to_json(validate_spec(raw)))
    assert len(base64.b64decode(secret["data"]["token"])) == 64
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"sgdjob.dev/job": "j", "sgdjob.dev/role": "ps"}

    addrs = ",".join(f"tcp://j-ps-{k}.j-ps.{cluster.ns}.svc.cluster.test:5555" for k in range(2))
    for name, pod in pods.items():
        role, index = name.split("-")[1], int(name.split("-")[2])
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["ownerReferences"] == [owner]
        assert meta["labels"] == {
            "sgdjob.dev/job": "j",
            "sgdjob.dev/role": role,
            "sgdjob.dev/index": str(index),
            "sgdjob.dev/attempt": "0",
        }
        assert spec["restartPolicy"] == "Never"
        assert spec["nodeSelector"] == {"pool": "gpu"}
        # The server's DefaultTolerationSeconds admission adds its own beside ours.
        assert {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        (container,) = spec["containers"]
        assert container["image"] == IMAGE
        assert container["command"] == ["sgdjob", "trainer"]
        env = env_of(pod)
        assert env["SGDJOB_ROLE"] == role and env["SGDJOB_INDEX"] == str(index)
        assert env["SGDJOB_JOB_NAME"] == "j"
        assert env["SGDJOB_SPEC"] == "/etc/sgdjob/spec.json"
        assert env["SGDJOB_OUTPUT"] == f"/output/j/{uid}"  # this run's own directory
        assert env["SGDJOB_TOKEN"] == {"secretKeyRef": {"name": "j-token", "key": "token"}}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["spec"]["configMap"]["name"] == "j-spec"
        assert volumes["output"] == {"name": "output", "emptyDir": {}}
        if role == "ps":
            assert spec["hostname"] == name and spec["subdomain"] == "j-ps"
            assert env["SGDJOB_BIND"] == "tcp://0.0.0.0:5555"
            assert ("SGDJOB_STATUS_BIND" in env) is (index == 0)
            assert container["resources"] == {"requests": {"cpu": "500m"}}
            assert "nvidia.com/gpu" not in json.dumps(container)
        else:
            assert env["SGDJOB_SHARD_ADDRS"] == addrs
            assert "SGDJOB_BIND" not in env and "SGDJOB_STATUS_BIND" not in env
            assert container["resources"]["limits"] == {  # the server writes them as it parsed
                "cpu": "2",
                "memory": "4Gi",
                "nvidia.com/gpu": "1",
            }
    created = [e for e in cluster.events() if e["reason"] == "Created"]
    assert created and created[0]["involvedObject"]["uid"] == uid


async def test_an_invalid_spec_fails_the_job_naming_the_field_and_creates_nothing(
    cluster: Cluster,
) -> None:
    # The API server checks the schema and the CEL rules itself (test_api_server); a rule only
    # Python checks reaches the operator, which must fail the job naming the field.
    raw = basic_spec(debug={"slowWorkers": {"7": 10}})
    async with running_operator(cluster.k):
        await cluster.create_job("bad", raw)
        status = await eventually(
            lambda: (
                cluster.job("bad").get("status", {}).get("phase") == "Failed"
                and cluster.job("bad")["status"]
            ),
            what="phase Failed",
        )
    assert "spec.debug.slowWorkers.7" in status["message"]
    assert status["conditions"][0]["type"] == "Failed"
    assert status["conditions"][0]["reason"] == "InvalidSpec"
    for resource in ("v1/pods", "v1/configmaps", "v1/secrets", "v1/services"):
        # kube-root-ca.crt: the token controller's own ConfigMap in every namespace.
        assert set(cluster.objects(resource)) <= {"kube-root-ca.crt"}, resource
    assert [e["reason"] for e in cluster.events()] == ["InvalidSpec"]


async def test_an_output_claim_replaces_the_empty_dir(cluster: Cluster) -> None:
    raw = basic_spec(kubernetes={"outputClaimName": "results"})
    async with running_operator(cluster.k):
        await cluster.create_job("j", raw)
        pods = await eventually(lambda: len(cluster.pods()) == 4 and cluster.pods())
    for pod in pods.values():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["output"] == {
            "name": "output",
            "persistentVolumeClaim": {"claimName": "results"},
        }
