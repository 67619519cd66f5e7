"""The children of an SGDJob as plain dicts: pure functions, no I/O, no clock, no randomness.

For a job ``j`` in namespace ``ns``: ConfigMap ``j-spec`` (the validated spec JSON, mounted at
``/etc/sgdjob/spec.json`` in every replica), Secret ``j-token`` (the per-job token, passed as
``SGDJOB_TOKEN`` through a secretKeyRef, never as a literal in the pod spec; with CURVE also the
job's key pairs, each role getting only its share), headless Service
``j-ps`` (``publishNotReadyAddresses`` so a shard is resolvable before it is ready), shard pods
``j-ps-<k>`` (``hostname``/``subdomain`` give ``j-ps-<k>.j-ps.ns.svc.<clusterDomain>``) and
worker pods ``j-worker-<i>``. Every child has a controller owner reference to the job and the
labels ``sgdjob.dev/job``, ``sgdjob.dev/role`` and ``sgdjob.dev/index`` (empty for children
that are not replicas); pods also carry ``sgdjob.dev/attempt`` (see ``sgdjob.policy``).

Pods use ``restartPolicy: Never``: the operator, not the kubelet, decides about restarts.

The output volume is the PersistentVolumeClaim ``spec.kubernetes.outputClaimName`` when set.
Otherwise it is an ``emptyDir``: the model, metrics and summary live only as long as the pod,
so with ``cleanPodPolicy: All`` (or any pod deletion) they are gone; name a claim to keep them.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sgdjob.api.defaults import pod_output_dir, run_output_dir
from sgdjob.api.types import API_VERSION, KIND, ObjectMeta, ResourcesSpec, SGDJob, SGDJobSpec
from sgdjob.api.validation import GPU_RESOURCE, spec_to_json
from sgdjob.contract import (
    ENV_CURVE_CLIENT_PUBLIC,
    ENV_CURVE_CLIENT_SECRET,
    ENV_CURVE_SERVER_PUBLIC,
    ENV_CURVE_SERVER_SECRET,
    ENV_TERMINATION_LOG,
    ENV_TOKEN,
    TERMINATION_LOG,
    ProcessContract,
    with_curve,
)
from sgdjob.curvekeys import JobKeys
from sgdjob.policy import Role

LABEL_JOB = "sgdjob.dev/job"
LABEL_ROLE = "sgdjob.dev/role"
LABEL_INDEX = "sgdjob.dev/index"
LABEL_ATTEMPT = "sgdjob.dev/attempt"

SPEC_DIR = "/etc/sgdjob"
SPEC_KEY = "spec.json"
TOKEN_KEY = "token"
# Environment variable -> key in the job's Secret (values never appear in a pod spec).
CURVE_FIELDS = (
    (ENV_CURVE_SERVER_PUBLIC, "server_public"),
    (ENV_CURVE_SERVER_SECRET, "server_secret"),
    (ENV_CURVE_CLIENT_PUBLIC, "client_public"),
    (ENV_CURVE_CLIENT_SECRET, "client_secret"),
)
SECRET_KEYS = {ENV_TOKEN: TOKEN_KEY} | {env: f.replace("_", "-") for env, f in CURVE_FIELDS}
CONTAINER = "trainer"
TRAINER_COMMAND = ["sgdjob", "trainer"]
HOSTNAME_LABEL = "kubernetes.io/hostname"
# The trainer image's non-root user and group (trainer/Dockerfile).
TRAINER_UID = 10001
# Pod Security "restricted": non-root, no privilege escalation, no capabilities, the runtime's
# seccomp profile. fsGroup makes the output volume group-writable by the trainer: a claim's
# volume is typically root-owned 0755, and the kubelet applies fsGroup to it on mount.
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": TRAINER_UID,
    "runAsGroup": TRAINER_UID,
    "fsGroup": TRAINER_UID,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}

Manifest = dict[str, Any]


@dataclass(frozen=True)
class JobRef:
    """What a child needs to know about its owner (from the SGDJob's metadata)."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class PodSettings:
    """Operator-wide defaults a pod needs besides the spec."""

    trainer_image: str
    cluster_domain: str = "cluster.local"


def config_map_name(job: str) -> str:
    return f"{job}-spec"


def secret_name(job: str) -> str:
    return f"{job}-token"


def service_name(job: str) -> str:
    return f"{job}-ps"


def pod_name(job: str, role: Role, index: int) -> str:
    return f"{job}-{role}-{index}"


def owner_reference(ref: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(job: str, role: str, index: int | None = None) -> dict[str, str]:
    return {
        LABEL_JOB: job,
        LABEL_ROLE: role,
        LABEL_INDEX: "" if index is None else str(index),
    }


def _meta(ref: JobRef, name: str, role: str, index: int | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": labels(ref.name, role, index),
        "ownerReferences": [owner_reference(ref)],
    }


def shard_addrs(ref: JobRef, spec: SGDJobSpec, cluster_domain: str) -> tuple[str, ...]:
    """The ZeroMQ endpoint of every shard, shard 0 first, by its stable DNS name."""
    svc = service_name(ref.name)
    port = spec.parameter_servers.port
    return tuple(
        f"tcp://{pod_name(ref.name, 'ps', k)}.{svc}.{ref.namespace}.svc.{cluster_domain}:{port}"
        for k in range(spec.parameter_servers.shards)
    )


def coordinator_url(ref: JobRef, spec: SGDJobSpec, cluster_domain: str) -> str:
    """Where shard 0 serves /status inside the cluster."""
    host = f"{pod_name(ref.name, 'ps', 0)}.{service_name(ref.name)}.{ref.namespace}.svc"
    return f"http://{host}.{cluster_domain}:{spec.parameter_servers.status_port}/status"


def config_map(ref: JobRef, spec: SGDJobSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ref, config_map_name(ref.name), "spec"),
        "data": {SPEC_KEY: spec_to_json(spec)},
    }


def secret(ref: JobRef, token: str, keys: JobKeys | None = None) -> Manifest:
    """The job's token and, with CURVE, its two key pairs; mounted only into its own pods."""
    data = {TOKEN_KEY: token}
    if keys is not None:
        data.update({SECRET_KEYS[env]: getattr(keys, field) for env, field in CURVE_FIELDS})
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(ref, secret_name(ref.name), "token"),
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def service(ref: JobRef, spec: SGDJobSpec) -> Manifest:
    ps = spec.parameter_servers
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ref, service_name(ref.name), "service"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: ref.name, LABEL_ROLE: "ps"},
            "ports": [
                {"name": "zmq", "port": ps.port, "targetPort": ps.port},
                {"name": "status", "port": ps.status_port, "targetPort": ps.status_port},
            ],
        },
    }


def _resources(res: ResourcesSpec, gpus: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if res.requests:
        out["requests"] = dict(res.requests)
    limits = dict(res.limits)
    if gpus > 0:
        limits[GPU_RESOURCE] = str(gpus)
    if limits:
        out["limits"] = limits
    return out


def _anti_affinity(avoid_nodes: Sequence[str]) -> dict[str, Any]:
    # Preferred, not required: the scheduler puts the replacement on another node whenever one
    # fits, and back on a slow node only when no other can take it (one node, a full cluster).
    # A required rule would leave the replacement Pending there, and the job stuck for good.
    term = {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(set(avoid_nodes))}
    return {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": {"matchExpressions": [term]}}
            ]
        }
    }


def _env(contract: ProcessContract, ref: JobRef) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    for key, value in contract.to_env().items():
        if key in SECRET_KEYS:
            ref_ = {"name": secret_name(ref.name), "key": SECRET_KEYS[key]}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref_}})
        else:
            env.append({"name": key, "value": value})
    return env


def pod(
    *,
    ref: JobRef,
    spec: SGDJobSpec,
    role: Role,
    index: int,
    attempt: int,
    settings: PodSettings,
    avoid_nodes: Sequence[str] = (),
) -> Manifest:
    """A shard or worker pod for this attempt; ``avoid_nodes`` become preferred node
    anti-affinity."""
    k8s = spec.kubernetes
    ps = spec.parameter_servers
    job = SGDJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=ObjectMeta(name=ref.name, namespace=ref.namespace),
        spec=spec,
    )
    output = pod_output_dir(job)
    is_ps = role == "ps"
    contract = ProcessContract(
        role=role,
        index=index,
        job_name=ref.name,
        spec_path=f"{SPEC_DIR}/{SPEC_KEY}",
        # The literal token never enters the pod spec; _env swaps in a secretKeyRef.
        token="<from-secret>",
        # The claim is mounted at `output`; this run writes below it, in its own directory,
        # so jobs sharing a claim (or a job created again under its name) never collide.
        output_dir=run_output_dir(output, ref.name, ref.uid),
        shard_addrs=() if is_ps else shard_addrs(ref, spec, settings.cluster_domain),
        bind=f"tcp://0.0.0.0:{ps.port}" if is_ps else "",
        status_bind=f"0.0.0.0:{ps.status_port}" if is_ps and index == 0 else "",
        attempt=attempt,
        # The run is the job's uid: a job deleted and created again under its name is a new
        # run and never restores the old one's checkpoints from a shared claim.
        run_id=ref.uid,
    )
    if spec.security.curve:
        # Placeholders: _env turns every key variable into a secretKeyRef; each role gets
        # only its share (no worker holds the server secret, no shard the client secret).
        contract = with_curve(contract, {f: "<from-secret>" for _, f in CURVE_FIELDS})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": k8s.image or settings.trainer_image,
        "command": list(TRAINER_COMMAND),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
        "env": [*_env(contract, ref), {"name": ENV_TERMINATION_LOG, "value": TERMINATION_LOG}],
        # Worker 0 writes its final step and metric here; the operator reads them from the
        # pod's status, since the coordinator may exit before its last poll.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "output", "mountPath": output},
        ],
    }
    if k8s.image_pull_policy:
        container["imagePullPolicy"] = k8s.image_pull_policy
    resources = (
        _resources(k8s.ps_resources)
        if is_ps
        else _resources(k8s.worker_resources, spec.workers.gpus)
    )
    if resources:
        container["resources"] = resources
    if is_ps:
        ports = [{"name": "zmq", "containerPort": ps.port}]
        if index == 0:
            ports.append({"name": "status", "containerPort": ps.status_port})
        container["ports"] = ports
        # Ready = the shard's socket is bound (listening); feeds status.readyShards. Read
        # from the kernel's socket table, not by connecting: a tcpSocket probe opened a TCP
        # connection every period that CURVE counted as a rejected handshake.
        listening = f":{ps.port:04X} [0-9A-F]+:0000 0A"
        container["readinessProbe"] = {
            "exec": {"command": ["grep", "-qsE", listening, "/proc/net/tcp", "/proc/net/tcp6"]},
            "periodSeconds": 5,
        }
    output_volume: dict[str, Any] = (
        {"name": "output", "persistentVolumeClaim": {"claimName": k8s.output_claim_name}}
        if k8s.output_claim_name
        else {"name": "output", "emptyDir": {}}
    )
    name = pod_name(ref.name, role, index)
    meta = _meta(ref, name, role, index)
    meta["labels"][LABEL_ATTEMPT] = str(attempt)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": config_map_name(ref.name)}},
            output_volume,
        ],
    }
    if is_ps:
        pod_spec["hostname"] = name
        pod_spec["subdomain"] = service_name(ref.name)
    if k8s.node_selector:
        pod_spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in k8s.tolerations
        ]
    if avoid_nodes:
        pod_spec["affinity"] = _anti_affinity(avoid_nodes)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def event(
    *,
    ref: JobRef,
    name: str,
    type_: str,
    reason: str,
    message: str,
    timestamp: str,
    component: str = "sgdjob-operator",
) -> Manifest:
    """A core/v1 Event about the job; ``name`` must be unique (the caller adds a suffix)."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": ref.namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": ref.name,
            "namespace": ref.namespace,
            "uid": ref.uid,
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
    }


def owned_by(obj: Mapping[str, Any], ref: JobRef) -> bool:
    """Whether a listed object is this job's child (the server's label filter is not trusted)."""
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(LABEL_JOB) != ref.name:
        return False
    if meta.get("namespace") not in (None, ref.namespace):
        return False
    owners = meta.get("ownerReferences") or []
    return any(o.get("uid") == ref.uid and o.get("kind") == KIND for o in owners)
