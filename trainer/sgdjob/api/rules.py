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

from dataclasses import dataclass


def _is_set(field: str) -> str:
    return f"has(self.{field})"


def _get(field: str, default: str) -> str:
    """A field's value, or its default where absent: the API server also checks a section's
    own default (``{}``) against these rules, before the fields' defaults are filled in."""
    return f"(has(self.{field}) ? self.{field} : {default})"


_MODE = _get("mode", "'sync'")
_STALENESS = _get("staleness", "'none'")


@dataclass(frozen=True)
class Rule:
    """One CEL rule on the object at ``at`` (dotted, below ``spec``; "" is the spec)."""

    at: str
    rule: str
    message: str
    field_path: str = ""  # relative to ``at``, e.g. ".backupWorkers"; "" is the object itself

    def as_validation(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
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
)
