"""The SGDJob CustomResourceDefinition, generated from the pydantic model in ``api.types``.

This module owns the translation from pydantic's JSON Schema (draft 2020-12) to a Kubernetes
*structural* OpenAPI v3 schema (apiextensions.k8s.io/v1), and the CRD around it (names,
status subresource, printer columns). It walks whatever the model holds, so a field added to
``SGDJobSpec`` or ``SGDJobStatus`` reaches the CRD with no edit here; ``make crd`` rewrites
``crds/sgdjob.dev_sgdjobs.yaml`` and a test fails when that file is stale.

Translation rules (each one exists because the API server rejects or mis-reads the input):
  * every ``$ref`` is inlined and ``$defs``/``title`` dropped (no references in a CRD);
    siblings of a ``$ref`` (a field's own description) win over the referenced model's;
  * ``anyOf: [X, {type: null}]`` becomes X with ``nullable: true`` (and ``null`` joins an
    ``enum``, which the API server checks even for null); a ``null`` default is dropped
    (absent and null mean the same to the model);
  * ``anyOf: [integer, string]`` becomes ``x-kubernetes-int-or-string: true``; any other
    union is an error, because a structural schema cannot express it;
  * ``const`` (a one-value ``Literal``) becomes a one-value ``enum``;
  * numeric ``exclusiveMinimum: x`` (draft 2020) becomes ``minimum: x`` with
    ``exclusiveMinimum: true`` (OpenAPI 3.0), likewise for the maximum;
  * ``additionalProperties: false`` (``extra="forbid"``) is dropped: the API server prunes
    unknown fields instead, and pydantic rejects them where the job is parsed;
  * ``dict[str, Any]`` (``additionalProperties: true`` or ``{}``) becomes ``type: object`` with
    ``x-kubernetes-preserve-unknown-fields: true``; a dict with typed values keeps
    ``additionalProperties: <value schema>``; a bare ``Any`` preserves unknown fields;
  * ``uniqueItems: true`` (a ``set``) becomes ``x-kubernetes-list-type: set``;
  * defaults (also those of a ``default_factory``) and descriptions are kept.

Imports neither torch nor zmq: the operator image (no torch) runs ``sgdjob crd``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from sgdjob.api.rules import SPEC_RULES
from sgdjob.api.types import (
    API_GROUP,
    API_VERSION_NAME,
    KIND,
    PLURAL,
    SHORT_NAME,
    SINGULAR,
    SGDJob,
    SGDJobSpec,
    SGDJobStatus,
)

CRD_NAME = f"{PLURAL}.{API_GROUP}"
CRD_FILE = f"crds/{API_GROUP}_{PLURAL}.yaml"

# `kubectl get all` lists SGDJobs: like a batch Job, an SGDJob is a workload whose pods
# already show up there, and `kubectl delete all --all` then deletes the owner too (deleting
# only the pods would make the operator recreate them).
CATEGORIES = ["all"]

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
    {"name": "Workers", "type": "integer", "jsonPath": ".status.readyWorkers"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # Shown by `kubectl get sgdj -o wide` only.
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.accuracy", "priority": 1},
    {"name": "Mode", "type": "string", "jsonPath": ".spec.training.mode", "priority": 1},
]

# Kopf keeps its own bookkeeping in the status (handler progress under `status.kopf`, handler
# results under `status.<handler id>`), so the status root must keep fields the model does
# not name; the API server would otherwise prune them and Kopf would re-run handlers forever.
STATUS_NOTE = (
    " Fields not listed here are kept (x-kubernetes-preserve-unknown-fields): the Kopf "
    "operator stores its own bookkeeping under the status."
)

# Keys dropped wherever they occur in a schema node (never inside a `properties` map).
_DROPPED = {"title", "$defs", "definitions", "$schema", "examples", "discriminator"}


class CRDSchemaError(ValueError):
    """The model uses a construct a structural CRD schema cannot express."""


def _is_null(node: Mapping[str, Any]) -> bool:
    return dict(node) == {"type": "null"}


class _Converter:
    """Turns one pydantic JSON Schema (with its ``$defs``) into a structural schema."""

    def __init__(self, defs: Mapping[str, Any]) -> None:
        self.defs = defs
        self.stack: list[str] = []

    def convert(self, node: Mapping[str, Any], path: str) -> dict[str, Any]:
        if "$ref" in node:
            return self._ref(node, path)
        for key in ("anyOf", "oneOf"):
            if key in node:
                return self._union(node, key, path)
        if "allOf" in node:  # pydantic wraps a lone $ref this way in some versions
            parts = node["allOf"]
            if len(parts) != 1:
                raise CRDSchemaError(f"{path}: allOf with {len(parts)} schemas")
            siblings = {k: v for k, v in node.items() if k != "allOf"}
            return self.convert({**parts[0], **siblings}, path)
        out = self._keys(node, path)
        if not out.get("type") and not out.get("x-kubernetes-int-or-string"):
            if "properties" in out or out.get("x-kubernetes-preserve-unknown-fields"):
                out["type"] = "object"
            elif "enum" in out:
                out["type"] = _enum_type(out["enum"], path)
            else:  # `Any`: keep whatever the user wrote
                out["x-kubernetes-preserve-unknown-fields"] = True
        return _ordered(out)

    def _keys(self, node: Mapping[str, Any], path: str) -> dict[str, Any]:
        """Translate the keywords of one node (no type inference, no references)."""
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROPPED or key == "propertyNames":  # dict key rules: pydantic checks
                continue
            if key == "properties":
                out[key] = {
                    name: self.convert(sub, f"{path}.{name}") for name, sub in value.items()
                }
            elif key == "items":
                out[key] = self.convert(value, f"{path}[]")
            elif key == "additionalProperties":
                if value is True or value == {}:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                elif value is not False:
                    out[key] = self.convert(value, f"{path}.*")
            elif key == "const":
                out["enum"] = [value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
                out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                out[key] = True
            elif key == "uniqueItems":
                if value:
                    out["x-kubernetes-list-type"] = "set"
            else:
                out[key] = value
        if "default" in out and out["default"] is None:
            del out["default"]
        return out

    def _ref(self, node: Mapping[str, Any], path: str) -> dict[str, Any]:
        ref = node["$ref"]
        prefix = "#/$defs/"
        name = ref[len(prefix) :] if ref.startswith(prefix) else ""
        if name not in self.defs:
            raise CRDSchemaError(f"{path}: unresolvable reference {ref}")
        if name in self.stack:
            raise CRDSchemaError(f"{path}: recursive model {name} (CRD schemas cannot recurse)")
        self.stack.append(name)
        try:
            target = self.convert(self.defs[name], path)
        finally:
            self.stack.pop()
        siblings = self._keys({k: v for k, v in node.items() if k != "$ref"}, path)
        return _ordered({**target, **siblings})

    def _union(self, node: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
        options = list(node[key])
        siblings = {k: v for k, v in node.items() if k != key}
        nullable = any(_is_null(o) for o in options)
        options = [o for o in options if not _is_null(o)]
        types = sorted(str(o.get("type")) for o in options)
        if len(options) == 1:
            out = self.convert({**options[0], **siblings}, path)
        elif types == ["integer", "string"] and all(len(o) == 1 for o in options):
            out = self.convert(siblings, path) if siblings else {}
            out.pop("x-kubernetes-preserve-unknown-fields", None)
            out["x-kubernetes-int-or-string"] = True
        else:
            raise CRDSchemaError(f"{path}: union of {types} has no structural form")
        if nullable:
            out["nullable"] = True
            if "enum" in out and None not in out["enum"]:
                # The API server checks `enum` even for null (OpenAPI 3.0.3); list it.
                out["enum"] = [*out["enum"], None]
        return _ordered(out)


def _enum_type(values: list[Any], path: str) -> str:
    kinds = {type(v) for v in values}
    for py, name in ((bool, "boolean"), (str, "string"), (int, "integer"), (float, "number")):
        if kinds == {py}:
            return name
    raise CRDSchemaError(f"{path}: enum of mixed types {sorted(k.__name__ for k in kinds)}")


_ORDER = ("description", "type", "format", "nullable", "enum", "default")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Stable, readable key order: description and type first, nested maps last."""
    head = {k: node[k] for k in _ORDER if k in node}
    tail_keys = ("properties", "additionalProperties", "items", "required")
    middle = {k: v for k, v in node.items() if k not in head and k not in tail_keys}
    tail = {k: node[k] for k in tail_keys if k in node}
    return {**head, **middle, **tail}


class _FactoryDefaults(GenerateJsonSchema):
    """Pydantic's schema generator, also stating defaults made by a ``default_factory``.

    A nested model's default becomes ``{}`` when it equals the model's all-default instance:
    the API server then fills that object in and applies the nested fields' own defaults, so
    a stored SGDJob carries every default, exactly as pydantic would see it.
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            if value == type(value)():
                return {}
            return value.model_dump(mode="json", by_alias=True)
        return value


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one pydantic model (camelCase field names)."""
    raw = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_FactoryDefaults
    )
    return _Converter(raw.get("$defs", {})).convert(raw, model.__name__)


def _metadata_schema() -> dict[str, Any]:
    """Only `metadata.name` may be constrained in a CRD; take its limits from the model."""
    name = model_schema(SGDJob)["properties"]["metadata"]["properties"]["name"]
    keep = {k: v for k, v in name.items() if k in ("type", "maxLength", "minLength", "pattern")}
    return {"type": "object", "properties": {"name": keep}}


# Spec edits would be half-applied to a running job (its ConfigMap and pods are made once), so
# the spec is immutable: a changed job is a new run, made by deleting and creating it again.
SPEC_RULE = {
    "rule": "self == oldSelf",
    "message": "spec is immutable: delete the SGDJob and create it again to start a new run "
    "with another spec",
}


def openapi_schema() -> dict[str, Any]:
    """The `openAPIV3Schema` of the one served version."""
    spec = model_schema(SGDJobSpec)
    spec["x-kubernetes-validations"] = [dict(SPEC_RULE)]
    for rule in SPEC_RULES:
        node = spec
        for part in filter(None, rule.at.split(".")):
            node = node["properties"][part]
        node.setdefault("x-kubernetes-validations", []).append(rule.as_validation())
    status = model_schema(SGDJobStatus)
    status["description"] = status.get("description", "") + STATUS_NOTE
    status["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "description": SGDJob.__doc__ or KIND,
        "type": "object",
        "properties": {
            "apiVersion": {
                "description": "Versioned schema of this object: sgdjob.dev/v1alpha1.",
                "type": "string",
            },
            "kind": {"description": "The REST resource this object represents.", "type": "string"},
            "metadata": _metadata_schema(),
            "spec": spec,
            "status": _ordered(status),
        },
        "required": ["spec"],
    }


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition as a plain dict (ready for YAML or the API)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "sgdjob"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": API_VERSION_NAME,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = (
    "# The SGDJob CustomResourceDefinition. GENERATED by `sgdjob crd` from the pydantic model\n"
    "# in trainer/sgdjob/api/types.py: do not edit; run `make crd` after changing the model.\n"
    "# The status root keeps unknown fields: Kopf stores its bookkeeping under the status.\n"
)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared sub-schemas out in full: no `&id001`/`*id001` anchors in the CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_crd_yaml() -> str:
    """The CRD as one YAML document with a generated-file header (what `sgdjob crd` prints)."""
    body = yaml.dump(
        build_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=100, allow_unicode=True
    )
    return HEADER + "---\n" + body
