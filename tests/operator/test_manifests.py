"""Pure manifests and the operator's spec fields: defaults, validation paths, pass-through."""

from __future__ import annotations

from typing import Any

import pytest

from sgdjob.api.validation import SpecError, validate_spec
from sgdjob.contract import Role
from sgdjob_operator.manifests import JobRef, PodSettings, owned_by, pod, shard_addrs
from sgdjob_operator.reconcile import validate_job
from tests.operator.harness import basic_spec

REF = JobRef(name="j", namespace="ns", uid="u1")
SETTINGS = PodSettings(trainer_image="default:1", cluster_domain="example.org")


def test_supervision_and_kubernetes_sections_have_documented_defaults() -> None:
    spec = validate_spec(basic_spec())
    sup = spec.supervision
    assert (sup.max_restarts, sup.clean_pod_policy) == (3, "Running")
    assert (sup.straggler.factor, sup.straggler.windows, sup.straggler.max_replacements) == (
        3.0,
        3,
        1,
    )
    assert sup.pre_running_deadline_seconds is None and sup.active_deadline_seconds is None
    assert sup.ttl_seconds_after_finished is None
    assert spec.kubernetes.image is None and spec.kubernetes.output_claim_name is None


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"supervision": {"maxRestarts": -1}}, "spec.supervision.maxRestarts"),
        ({"supervision": {"straggler": {"factor": 1.0}}}, "spec.supervision.straggler.factor"),
        ({"supervision": {"cleanPodPolicy": "Some"}}, "spec.supervision.cleanPodPolicy"),
        ({"supervision": {"restarts": 1}}, "spec.supervision.restarts"),
        (
            {"kubernetes": {"workerResources": {"limits": {"cpu": "lots"}}}},
            "spec.kubernetes.workerResources.limits.cpu",
        ),
        (
            {"kubernetes": {"workerResources": {"limits": {"nvidia.com/gpu": "1"}}}},
            "spec.kubernetes.workerResources",
        ),
        (
            {"kubernetes": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
            "spec.kubernetes.tolerations[0].value",
        ),
        ({"kubernetes": {"outputClaimName": "Not_A_Name"}}, "spec.kubernetes.outputClaimName"),
    ],
)
def test_a_bad_operator_field_is_reported_with_its_path(extra: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as err:
        validate_spec(basic_spec(**extra))
    assert path in err.value.paths


def test_a_job_name_too_long_for_pod_names_is_rejected_naming_metadata_name() -> None:
    with pytest.raises(SpecError) as err:
        validate_job("x" * 41, basic_spec())
    assert err.value.paths == ["metadata.name"]


def test_a_replaced_pod_avoids_old_nodes_and_uses_the_specs_image_and_pull_policy() -> None:
    spec = validate_spec(basic_spec(kubernetes={"image": "mine:2", "imagePullPolicy": "Always"}))
    body = pod(
        ref=REF,
        spec=spec,
        role="worker",
        index=1,
        attempt=3,
        settings=SETTINGS,
        avoid_nodes=["n2", "n1", "n2"],
    )
    (container,) = body["spec"]["containers"]
    assert container["image"] == "mine:2" and container["imagePullPolicy"] == "Always"
    assert body["metadata"]["labels"]["sgdjob.dev/attempt"] == "3"
    affinity = body["spec"]["affinity"]["nodeAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity  # never stuck Pending
    (pref,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref["weight"] == 100
    assert pref["preference"]["matchExpressions"][0]["values"] == ["n1", "n2"]
    assert "resources" not in container  # nothing requested, no GPUs


def test_without_a_spec_image_the_operator_default_is_used_and_no_affinity_is_set() -> None:
    body = pod(
        ref=REF, spec=validate_spec(basic_spec()), role="ps", index=0, attempt=0, settings=SETTINGS
    )
    assert body["spec"]["containers"][0]["image"] == "default:1"
    assert "affinity" not in body["spec"]
    assert shard_addrs(REF, validate_spec(basic_spec()), "example.org")[1] == (
        "tcp://j-ps-1.j-ps.ns.svc.example.org:5555"
    )


def test_the_trainer_is_told_where_its_termination_message_goes() -> None:
    body = pod(
        ref=REF,
        spec=validate_spec(basic_spec()),
        role="worker",
        index=0,
        attempt=0,
        settings=SETTINGS,
    )
    (container,) = body["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SGDJOB_TERMINATION_LOG"] == container["terminationMessagePath"]
    assert container["terminationMessagePolicy"] == "File"


def test_ownership_needs_the_owner_uid_and_the_job_label() -> None:
    body = pod(
        ref=REF, spec=validate_spec(basic_spec()), role="ps", index=0, attempt=0, settings=SETTINGS
    )
    assert owned_by(body, REF)
    assert not owned_by(body, JobRef(name="j", namespace="ns", uid="other"))
    assert not owned_by(body, JobRef(name="k", namespace="ns", uid="u1"))


@pytest.mark.parametrize("role", ["ps", "worker"])
def test_every_trainer_pod_meets_the_restricted_pod_security_standard(role: Role) -> None:
    body = pod(
        ref=REF, spec=validate_spec(basic_spec()), role=role, index=0, attempt=0, settings=SETTINGS
    )
    pod_ctx = body["spec"]["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] != 0
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    # fsGroup: a root-owned claim becomes writable by the trainer's group on mount.
    assert pod_ctx["fsGroup"] == pod_ctx["runAsGroup"] == 10001
    (container,) = body["spec"]["containers"]
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in ctx and "hostNetwork" not in body["spec"]
    assert all("hostPath" not in v for v in body["spec"]["volumes"])


def test_pods_do_not_share_security_context_objects() -> None:
    spec = validate_spec(basic_spec())
    a = pod(ref=REF, spec=spec, role="worker", index=0, attempt=0, settings=SETTINGS)
    b = pod(ref=REF, spec=spec, role="worker", index=1, attempt=0, settings=SETTINGS)
    a["spec"]["securityContext"]["fsGroup"] = 1
    a["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"].append("X")
    assert b["spec"]["securityContext"]["fsGroup"] == 10001
    assert b["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_shard_readiness_probe_sees_a_bound_shard_without_a_handshake_being_counted() -> None:
    import socket
    import subprocess
    import time

    import zmq

    from sgdjob.curvekeys import JobKeys
    from sgdjob.stats import ShardStats
    from sgdjob.transport import CurveServer, bind_router

    with socket.socket() as s:  # a free port for the shard, as a pod would have its own
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = validate_spec(basic_spec(parameterServers={"port": port}))
    body = pod(ref=REF, spec=spec, role="ps", index=0, attempt=0, settings=SETTINGS)
    probe = body["spec"]["containers"][0]["readinessProbe"]
    assert "tcpSocket" not in probe
    command = probe["exec"]["command"]

    def probe_passes() -> bool:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0

    assert not probe_passes()  # nothing listens yet
    keys = JobKeys.generate()
    stats = ShardStats(shard=0, workers=1, mode="sync")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    curve = CurveServer(
        public=keys.server_public, secret=keys.server_secret, client_public=keys.client_public
    )
    ep, _ = bind_router(
        ctx, f"tcp://0.0.0.0:{port}", curve=curve, on_handshake_failure=stats.reject
    )
    try:
        for _ in range(3):
            assert probe_passes()
            ep.poll(300)
        assert not any(k.startswith("HANDSHAKE") for k in stats.rejected)
        # What the old tcpSocket probe did, for contrast: a bare connect counts as a rejection.
        socket.create_connection(("127.0.0.1", port)).close()
        deadline = time.monotonic() + 30
        while not any(k.startswith("HANDSHAKE") for k in stats.rejected):
            assert time.monotonic() < deadline, "a bare TCP connect was not even counted"
            ep.poll(200)
    finally:
        ep.close()
        ctx.term()
    assert not probe_passes()
