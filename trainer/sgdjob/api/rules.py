"""The cross-field rules of ``validation.cross_field_problems``, as CEL for the API server.

``sgdjob validate`` checks them in Python; the CRD carries the same rules as
``x-kubernetes-validations`` so that ``kubectl apply`` of a bad job is refused at admission with
the same field path, instead of being accepted and then failed by the operator. Each rule sits
on the object it reads (a schema path below ``spec``) and names, with ``fieldPath``, the field
``sgdjob validate`` reports; a test applies a corpus of bad jobs to a real API server and
compares both paths.

Rules that only Python can check (entry points that must import, per-key dict checks) stay in
``validation`` alone; the operator still fails such a job with an ``InvalidSpec`` message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sgdjob.api.workloads import DATA_TASK, MODEL_TASKS


def _is_set(field: str) -> str:
    return f"has(self.{field})"


def _get(field: str, default: str) -> str:
    """A field's value, or its default where absent: the API server also checks a section's
    own default (``{}``) against these rules, before the fields' defaults are filled in."""
    return f"(has(self.{field}) ? self.{field} : {default})"


_MODE = _get("mode", "'sync'")
_STALENESS = _get("staleness", "'none'")
_OPTIMIZER = _get("optimizer", "'sgd'")
_MOMENTUM = _get("momentum", "0.9")
_NESTEROV = _get("nesterov", "false")
_SEND = _get("send", "'gradients'")  # on `compression`
_KIND = _get("kind", "'none'")  # on `compression`
_TASK_HERE = _get("task", "'classification'")  # on `training`
_POSITIONS = _get("positions", "'learned'")  # on `model.transformer`
_D_MODEL = _get("dModel", "128")
_HEADS = _get("heads", "4")
# On the spec: the task of `training`, which a rule on the spec reads beside `model`/`data`.
_TASK = "(has(self.training) && has(self.training.task) ? self.training.task : 'classification')"


@dataclass(frozen=True)
class Rule:
    """One CEL rule on the object at ``at`` (dotted, below ``spec``; "" is the spec)."""

    at: str
    rule: str
    message: str
    field_path: str = ""  # relative to ``at``, e.g. ".backupWorkers"; "" is the object itself
    # A CEL string expression for a message that names values (``message`` is the fallback).
    message_expression: str = ""

    def as_validation(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def _exactly_one(section: str, a: str, b: str) -> Rule:
    # On the spec, not on the section: a section's default ({}) is checked on its own and
    # would break an exactly-one rule placed on the section.
    sec = f"self.{section}"
    return Rule(
        "",
        f"has({sec}) && (has({sec}.{a}) != has({sec}.{b}))",
        f"set exactly one of `{a}` and `{b}`",
        f".{section}",
    )


def _cel_map(table: Mapping[str, object]) -> str:
    """A CEL map literal of strings (or lists of strings)."""

    def value(v: object) -> str:
        if isinstance(v, (tuple, list)):
            return "[" + ", ".join(f"'{x}'" for x in v) + "]"
        return f"'{v}'"

    return "{" + ", ".join(f"'{k}': {value(v)}" for k, v in table.items()) + "}"


def _adam_only_knob(alias: str, default: str) -> Rule:
    # Compared with its default, as in Python: a round-tripped spec carries every default.
    return Rule(
        "training",
        f"{_OPTIMIZER} != 'sgd' || {_get(alias, default)} == {default}",
        "applies only to `adam` and `adamw`",
        f".{alias}",
    )


def _workload_rules() -> tuple[Rule, ...]:
    """The CEL twins of ``validation.workload_problems``, from the same task tables."""
    made_for = {m: " or ".join(f"`{t}`" for t in tasks) for m, tasks in MODEL_TASKS.items()}
    return (
        Rule(
            "training",
            f"({_TASK_HERE} == 'custom') == {_is_set('taskEntryPoint')}",
            "set it exactly when `task` is `custom`",
            ".taskEntryPoint",
        ),
        Rule(
            "",
            f"!has(self.data) || !has(self.data.builtin) || {_TASK} == 'custom'"
            f" || {_cel_map(DATA_TASK)}[self.data.builtin] == {_TASK}",
            "the built-in data set is made for another task",
            ".training.task",
            message_expression=f"'data.builtin `' + self.data.builtin + '` is a `' + "
            f"{_cel_map(DATA_TASK)}[self.data.builtin] + '` data set'",
        ),
        Rule(
            "",
            f"!has(self.model) || !has(self.model.builtin) || {_TASK} == 'custom'"
            f" || {_TASK} in {_cel_map(MODEL_TASKS)}[self.model.builtin]",
            "the built-in model is made for another task",
            ".training.task",
            message_expression="'model.builtin `' + self.model.builtin + '` is made for ' + "
            f"{_cel_map(made_for)}[self.model.builtin]",
        ),
        Rule(
            "model.transformer",
            f"{_D_MODEL} % {_HEADS} == 0",
            "must divide dModel",
            ".heads",
        ),
        Rule(
            "model.transformer",
            f"{_POSITIONS} != 'rotary'"
            f" || {_D_MODEL} % {_HEADS} != 0 || ({_D_MODEL} / {_HEADS}) % 2 == 0",
            "rotary needs an even head width",
        ),
        _adam_only_knob("beta1", "0.9"),
        _adam_only_knob("beta2", "0.999"),
        _adam_only_knob("eps", "1e-8"),
        Rule(
            "training",
            f"{_OPTIMIZER} != 'sgd' || !{_NESTEROV} || {_MOMENTUM} > 0.0",
            "Nesterov momentum needs momentum > 0",
            ".nesterov",
        ),
        Rule(
            "training",
            f"{_OPTIMIZER} == 'sgd' || !{_NESTEROV}",
            "applies only to `sgd`",
            ".nesterov",
        ),
        Rule(
            "training",
            f"{_OPTIMIZER} == 'sgd' || {_MOMENTUM} == 0.9",
            "applies only to `sgd`; Adam uses beta1",
            ".momentum",
        ),
        Rule(
            "training",
            f"{_OPTIMIZER} == 'sgd' || {_STALENESS} != 'odena'",
            "`odena` scales each gradient element, which Adam's normalisation undoes; "
            "use `zhang` or `none` with Adam",
            ".staleness",
        ),
        Rule(
            "training",
            "!has(self.maxSteps) || !has(self.schedule) || !has(self.schedule.warmupSteps)"
            " || self.schedule.warmupSteps < self.maxSteps",
            "must be less than maxSteps",
            ".schedule.warmupSteps",
        ),
        Rule(
            "training",
            "!has(self.schedule) || !has(self.schedule.kind) || self.schedule.kind != 'cosine'"
            f" || {_get('schedule.minLr', '0.0')} <= {_get('lr', '0.05')}",
            "must not exceed lr",
            ".schedule.minLr",
        ),
    )


SPEC_RULES: tuple[Rule, ...] = (
    _exactly_one("model", "builtin", "entryPoint"),
    _exactly_one("data", "builtin", "entryPoint"),
    _exactly_one("training", "maxSteps", "epochs"),
    Rule(
        "training",
        f"{_get('backupWorkers', '0')} == 0 || {_MODE} == 'sync'",
        "backup workers exist only in `sync` mode",
        ".backupWorkers",
    ),
    Rule(
        "",
        "!has(self.training) || !has(self.training.backupWorkers) || !has(self.workers)"
        " || !has(self.workers.replicas) || self.training.backupWorkers < self.workers.replicas",
        "must be less than workers.replicas",
        ".training.backupWorkers",
    ),
    Rule(
        "training",
        f"{_MODE} != 'sync' || {_STALENESS} == 'none'",
        "staleness rules apply only to async modes",
        ".staleness",
    ),
    Rule(
        "training",
        f"{_MODE} != 'sync' || !{_is_set('maxStaleness')}",
        "staleness rules apply only to async modes",
        ".maxStaleness",
    ),
    Rule(
        "training",
        f"{_MODE} != 'sync' || {_get('odenaScale', '1.0')} == 1.0",
        "staleness rules apply only to async modes",
        ".odenaScale",
    ),
    Rule(
        "training",
        f"{_MODE} == 'downpour' || {_get('fetchEvery', '1')} == 1",
        "only `downpour` mode fetches/pushes lazily",
        ".fetchEvery",
    ),
    Rule(
        "training",
        f"{_MODE} == 'downpour' || {_get('pushEvery', '1')} == 1",
        "only `downpour` mode fetches/pushes lazily",
        ".pushEvery",
    ),
    Rule(
        "compression",
        f"{_SEND} == 'gradients' || {_KIND} == 'onebit'",
        "`updates` needs `kind: onebit`",
        ".send",
    ),
    Rule(
        "",
        "!has(self.compression) || !has(self.compression.send)"
        " || self.compression.send == 'gradients' || !has(self.training)"
        " || !has(self.training.mode) || self.training.mode == 'sync'",
        "`updates` exists only in `sync` mode",
        ".compression.send",
    ),
    *_workload_rules(),
)
