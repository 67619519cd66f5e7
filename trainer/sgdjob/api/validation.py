"""SGDJob validation: parse a document, check every field and every cross-field rule.

Every problem is reported with the dotted path of the field it concerns, e.g.
``spec.training.lr: must be greater than 0``. ``SpecError`` carries all of them at once so a
user fixes a file in one round. Nothing here has side effects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sgdjob.api.quantity import QuantityError, parse_quantity
from sgdjob.api.types import RESOURCE_NAME, SGDJob, SGDJobSpec
from sgdjob.api.workloads import DATA_TASK, MODEL_TASKS

GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Problem:
    """One invalid field: where it is and what is wrong with it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """An SGDJob (or its spec) is invalid; ``problems`` names every bad field."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.problems]


def _loc_to_path(prefix: str, loc: tuple[int | str, ...]) -> str:
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] = f"{parts[-1]}[{item}]"
            else:
                parts.append(f"[{item}]")
        else:
            parts.append(str(item))
    return ".".join(parts) or "<document>"


def _from_validation_error(err: ValidationError, prefix: str) -> SpecError:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(Problem(_loc_to_path(prefix, loc), msg))
    return SpecError(problems)


def cross_field_problems(spec: SGDJobSpec, prefix: str = "spec") -> list[Problem]:
    """Rules that involve more than one field; per-field bounds live on the types."""
    out: list[Problem] = []
    for name, sub in (("model", spec.model), ("data", spec.data)):
        if (sub.builtin is None) == (sub.entry_point is None):
            out.append(Problem(f"{prefix}.{name}", "set exactly one of `builtin` and `entryPoint`"))
    if any(h < 1 or h > 1 << 16 for h in spec.model.hidden):
        out.append(Problem(f"{prefix}.model.hidden", "every width must be in 1..65536"))
    t = spec.training
    tp = f"{prefix}.training"
    if (t.max_steps is None) == (t.epochs is None):
        out.append(Problem(tp, "set exactly one of `maxSteps` and `epochs`"))
    if t.backup_workers and t.mode != "sync":
        out.append(Problem(f"{tp}.backupWorkers", "backup workers exist only in `sync` mode"))
    if t.backup_workers >= spec.workers.replicas:
        out.append(
            Problem(
                f"{tp}.backupWorkers",
                f"must be less than workers.replicas ({spec.workers.replicas})",
            )
        )
    if t.mode == "sync":
        # Compared with the defaults, not "was the field set": a round-tripped spec (the
        # ConfigMap JSON) carries every default explicitly.
        for alias, is_set in (
            ("staleness", t.staleness != "none"),
            ("maxStaleness", t.max_staleness is not None),
            ("odenaScale", t.odena_scale != 1.0),
        ):
            if is_set:
                out.append(Problem(f"{tp}.{alias}", "staleness rules apply only to async modes"))
    if t.mode != "downpour":
        for name, alias in (("fetch_every", "fetchEvery"), ("push_every", "pushEvery")):
            if getattr(t, name) != 1:
                out.append(Problem(f"{tp}.{alias}", "only `downpour` mode fetches/pushes lazily"))
    if spec.compression.send == "updates":
        send = f"{prefix}.compression.send"
        if spec.compression.kind != "onebit":
            out.append(Problem(send, "`updates` needs `kind: onebit`"))
        if t.mode != "sync":
            out.append(Problem(send, "`updates` exists only in `sync` mode"))
    total = spec.workers.replicas + t.backup_workers
    for index in spec.debug.slow_workers:
        if not 0 <= index < total:
            out.append(
                Problem(
                    f"{prefix}.debug.slowWorkers.{index}", f"no worker {index} (0..{total - 1})"
                )
            )
    for index, ms in spec.debug.slow_workers.items():
        if not 0 <= ms <= 600_000:
            out.append(Problem(f"{prefix}.debug.slowWorkers.{index}", "delay must be 0..600000 ms"))
    out.extend(workload_problems(spec, prefix))
    out.extend(kubernetes_problems(spec, prefix))
    return out


def workload_problems(spec: SGDJobSpec, prefix: str = "spec") -> list[Problem]:
    """Rules across the model, the data, the task and the optimizer."""
    out: list[Problem] = []
    t = spec.training
    tp = f"{prefix}.training"
    if (t.task == "custom") != (t.task_entry_point is not None):
        out.append(Problem(f"{tp}.taskEntryPoint", "set it exactly when `task` is `custom`"))
    if t.task_kwargs and t.task != "custom":
        out.append(Problem(f"{tp}.taskKwargs", "only a `custom` task takes keyword arguments"))
    data, model = spec.data.builtin, spec.model.builtin
    if data is not None and t.task != "custom" and DATA_TASK[data] != t.task:
        out.append(
            Problem(f"{tp}.task", f"data.builtin `{data}` is a `{DATA_TASK[data]}` data set")
        )
    if model is not None and t.task != "custom" and t.task not in MODEL_TASKS[model]:
        allowed = " or ".join(f"`{k}`" for k in MODEL_TASKS[model])
        out.append(Problem(f"{tp}.task", f"model.builtin `{model}` is made for {allowed}"))
    if any(c < 1 or c > 1024 for c in spec.model.resnet.channels):
        out.append(Problem(f"{prefix}.model.resnet.channels", "every width must be in 1..1024"))
    tr = spec.model.transformer
    if tr.d_model % tr.heads:
        out.append(Problem(f"{prefix}.model.transformer.heads", "must divide dModel"))
    elif tr.positions == "rotary" and (tr.d_model // tr.heads) % 2:
        out.append(Problem(f"{prefix}.model.transformer", "rotary needs an even head width"))
    if t.optimizer == "sgd":
        # Compared with the defaults (a round-tripped spec carries every default).
        for alias, is_set in (
            ("beta1", t.beta1 != 0.9),
            ("beta2", t.beta2 != 0.999),
            ("eps", t.eps != 1e-8),
        ):
            if is_set:
                out.append(Problem(f"{tp}.{alias}", "applies only to `adam` and `adamw`"))
        if t.nesterov and t.momentum == 0.0:
            out.append(Problem(f"{tp}.nesterov", "Nesterov momentum needs momentum > 0"))
    else:
        if t.nesterov:
            out.append(Problem(f"{tp}.nesterov", "applies only to `sgd`"))
        if t.momentum != 0.9:
            out.append(Problem(f"{tp}.momentum", "applies only to `sgd`; Adam uses beta1"))
        if t.staleness == "odena":
            out.append(
                Problem(
                    f"{tp}.staleness",
                    "`odena` scales each gradient element, which Adam's normalisation undoes; "
                    "use `zhang` or `none` with Adam",
                )
            )
    sch = t.schedule
    if t.max_steps is not None and sch.warmup_steps >= t.max_steps:
        out.append(Problem(f"{tp}.schedule.warmupSteps", "must be less than maxSteps"))
    if sch.kind == "cosine" and sch.min_lr > t.lr:
        out.append(Problem(f"{tp}.schedule.minLr", "must not exceed lr"))
    return out


def kubernetes_problems(spec: SGDJobSpec, prefix: str = "spec") -> list[Problem]:
    """Rules of the `kubernetes` section: quantities, resource names, the GPU count."""
    out: list[Problem] = []
    kp = f"{prefix}.kubernetes"
    for alias, res in (
        ("psResources", spec.kubernetes.ps_resources),
        ("workerResources", spec.kubernetes.worker_resources),
    ):
        values: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
        for kind, table in (("requests", res.requests), ("limits", res.limits)):
            for name, qty in table.items():
                where = f"{kp}.{alias}.{kind}.{name}"
                if not re.match(RESOURCE_NAME, name):
                    out.append(Problem(where, "not a valid resource name"))
                try:
                    value = parse_quantity(qty)
                except QuantityError as err:
                    out.append(Problem(where, str(err)))
                    continue
                if value < 0:
                    out.append(Problem(where, f"{qty!r} must not be negative"))
                values[kind][name] = value
        for name, request in values["requests"].items():
            limit = values["limits"].get(name)
            if limit is not None and request > limit:
                out.append(
                    Problem(
                        f"{kp}.{alias}.requests.{name}",
                        f"must be less than or equal to the limit {res.limits[name]!r}",
                    )
                )
    worker = spec.kubernetes.worker_resources
    if GPU_RESOURCE in worker.limits or GPU_RESOURCE in worker.requests:
        out.append(
            Problem(f"{kp}.workerResources", f"set GPUs with workers.gpus, not {GPU_RESOURCE}")
        )
    for i, tol in enumerate(spec.kubernetes.tolerations):
        if tol.operator == "Exists" and tol.value:
            out.append(Problem(f"{kp}.tolerations[{i}].value", "must be empty with `Exists`"))
        if tol.toleration_seconds is not None and tol.effect != "NoExecute":
            out.append(
                Problem(f"{kp}.tolerations[{i}].tolerationSeconds", "needs effect `NoExecute`")
            )
    return out


def validate_spec(raw: Mapping[str, Any], prefix: str = "spec") -> SGDJobSpec:
    """Validate a bare spec mapping (as the operator receives it from the API server)."""
    try:
        spec = SGDJobSpec.model_validate(raw)
    except ValidationError as err:
        raise _from_validation_error(err, prefix) from None
    problems = cross_field_problems(spec, prefix)
    if problems:
        raise SpecError(problems)
    return spec


def parse_job(doc: Any) -> SGDJob:
    """Validate a whole SGDJob document already decoded from YAML or JSON."""
    if not isinstance(doc, Mapping):
        raise SpecError([Problem("<document>", "expected a mapping with apiVersion/kind/spec")])
    try:
        job = SGDJob.model_validate(doc)
    except ValidationError as err:
        raise _from_validation_error(err, "") from None
    problems = cross_field_problems(job.spec)
    if problems:
        raise SpecError(problems)
    return job


def load_job(path: str | Path) -> SGDJob:
    """Read, parse and validate one SGDJob file (YAML or JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError([Problem(str(p), f"cannot read file: {err.strerror or err}")]) from None
    return parse_job_text(text, source=str(p))


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping names a key twice (the API server's strict decoding refuses it too)."""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a duplicate key is an error, not "the last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges, and may override, on purpose
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first = seen[key].start_mark
                raise DuplicateKey(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def parse_job_text(text: str, *, source: str = "<input>") -> SGDJob:
    """Parse YAML/JSON text holding exactly one SGDJob document; duplicate keys are errors."""
    try:
        docs = [d for d in yaml.load_all(text, Loader=StrictLoader) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError([Problem(where, f"invalid YAML: {problem}")]) from None
    if len(docs) != 1:
        raise SpecError([Problem(source, f"expected one SGDJob document, found {len(docs)}")])
    return parse_job(docs[0])


def spec_to_json(spec: SGDJobSpec) -> str:
    """The canonical JSON of a spec (camelCase), as mounted into every replica."""
    return json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True)
