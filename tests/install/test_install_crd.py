"""The generated SGDJob CRD: current on disk, structural, faithful to the pydantic model."""

from __future__ import annotations

from typing import Any, Literal

import jsonschema
import pytest
import yaml
from install_support import (
    CHART_CRD_PATH,
    CRD_PATH,
    apply_defaults,
    crd_schema,
    load_yaml,
    module,
    to_jsonschema,
    walk,
)
from pydantic import BaseModel, Field

from sgdjob.api.crd import CRDSchemaError, build_crd, model_schema, render_crd_yaml
from sgdjob.api.types import SGDJobSpec, SGDJobStatus

TYPES = {"object", "array", "string", "integer", "number", "boolean"}
FORBIDDEN = {"$ref", "$defs", "definitions", "title", "const", "anyOf", "oneOf", "allOf", "not"}


def test_the_checked_in_crd_is_what_the_model_generates() -> None:
    assert CRD_PATH.read_text(encoding="utf-8") == render_crd_yaml(), (
        f"{CRD_PATH.relative_to(CRD_PATH.parents[1])} is stale: run `make crd` and commit it"
    )


def test_the_chart_ships_the_same_crd_file_as_crds() -> None:
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes(), (
        "charts/sgdjob-operator/files/sgdjob.dev_sgdjobs.yaml differs from crds/: run `make crd`"
    )


def test_the_crd_schema_is_structural() -> None:
    problems: list[str] = []
    for path, node in walk(crd_schema(build_crd())):
        where = path or "<root>"
        problems += [f"{where}: forbidden keyword {k}" for k in FORBIDDEN & node.keys()]
        free = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string"
        )
        if node.get("type") not in TYPES and not free:
            problems.append(f"{where}: missing or bad type {node.get('type')!r}")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: properties and additionalProperties together")
        if isinstance(node.get("additionalProperties"), bool):
            problems.append(f"{where}: boolean additionalProperties")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{where}: array without items")
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if key in node and (not isinstance(node[key], bool) or bound not in node):
                problems.append(f"{where}: {key} must be a boolean next to {bound}")
        if "default" in node and node["default"] is None:
            problems.append(f"{where}: null default")
        for value in node.get("enum", []):
            if value is None and not node.get("nullable"):
                problems.append(f"{where}: null in the enum of a non-nullable field")
    assert not problems, "\n".join(problems)


def test_metadata_constrains_only_the_name() -> None:
    metadata = crd_schema(build_crd())["properties"]["metadata"]
    assert metadata["type"] == "object"
    assert set(metadata.get("properties", {})) <= {"name", "generateName"}
    assert metadata["properties"]["name"]["maxLength"] == 40


def test_every_default_in_the_crd_is_valid_against_its_own_schema() -> None:
    for path, node in walk(crd_schema(build_crd())):
        if "default" in node:
            jsonschema.validate(node["default"], to_jsonschema(node))
            assert path  # the root carries no default


def test_api_server_defaulting_fills_in_exactly_the_pydantic_defaults() -> None:
    minimal = {
        "model": {"builtin": "mlp"},
        "data": {"builtin": "digits"},
        "training": {"maxSteps": 10},
    }
    spec_schema = crd_schema(build_crd())["properties"]["spec"]
    defaulted = apply_defaults(spec_schema, minimal)
    expected = SGDJobSpec.model_validate(minimal).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    assert defaulted == expected


def _fields(model: type[BaseModel], schema: dict[str, Any], path: str) -> list[str]:
    """Model fields (by alias, recursively through nested models) missing from the schema."""
    missing = []
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        if alias not in props:
            missing.append(f"{path}.{alias}")
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            missing += _fields(annotation, props[alias], f"{path}.{alias}")
    return missing


def test_every_field_of_the_model_is_in_the_crd() -> None:
    schema = crd_schema(build_crd())["properties"]
    assert _fields(SGDJobSpec, schema["spec"], "spec") == []
    assert _fields(SGDJobStatus, schema["status"], "status") == []


def test_the_status_keeps_kopf_bookkeeping_and_is_a_subresource() -> None:
    version = build_crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert "Kopf" in status["description"]


def test_printer_columns_point_at_fields_that_exist() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["sgdj"]
    assert names["kind"] == "SGDJob"
    version = crd["spec"]["versions"][0]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [n for n, c in columns.items() if not c.get("priority")] == [
        "Phase",
        "Step",
        "Loss",
        "Metric",
        "Value",
        "Workers",
        "Restarts",
        "Age",
    ]
    schema = version["schema"]["openAPIV3Schema"]
    for column in columns.values():
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] == "metadata":
            continue
        node = schema
        for part in parts:
            node = node["properties"][part]
        kind = {"date": "string"}.get(column["type"], column["type"])
        assert node["type"] == kind, column


def test_the_crd_is_a_valid_customresourcedefinition_for_current_kubernetes() -> None:
    kubernetes_validate = module("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(load_yaml(CRD_PATH), version, strict=True)


def test_the_rendered_yaml_has_no_anchors_and_a_generated_header() -> None:
    text = render_crd_yaml()
    assert text.startswith("# The SGDJob CustomResourceDefinition. GENERATED")
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == build_crd()


# --- the translation rules, on small models -------------------------------------------------


class _Inner(BaseModel):
    """An inner object."""

    size: int = Field(default=3, gt=0)


class _Sample(BaseModel):
    kind: Literal["a", "b"] | None = None
    one: Literal["x"] = "x"
    inner: _Inner = Field(default_factory=_Inner, description="The inner one.")
    items: list[_Inner] = Field(default_factory=list)
    by_name: dict[str, _Inner] = Field(default_factory=dict)
    free: dict[str, Any] = Field(default_factory=dict)
    anything: Any = None
    quantity: int | str = 1
    tags: set[str] = Field(default_factory=set)


def test_the_generator_translates_each_pydantic_construct() -> None:
    props = model_schema(_Sample)["properties"]
    assert props["kind"] == {"type": "string", "nullable": True, "enum": ["a", "b", None]}
    assert props["one"] == {"type": "string", "enum": ["x"], "default": "x"}
    inner = props["inner"]
    assert inner["description"] == "The inner one." and inner["default"] == {}
    assert inner["properties"]["size"] == {
        "type": "integer",
        "default": 3,
        "minimum": 0,
        "exclusiveMinimum": True,
    }
    assert props["items"]["items"]["properties"]["size"]["type"] == "integer"
    assert props["by_name"]["additionalProperties"]["type"] == "object"
    assert props["free"]["x-kubernetes-preserve-unknown-fields"] is True
    assert props["free"]["type"] == "object"
    assert props["anything"] == {"x-kubernetes-preserve-unknown-fields": True}
    assert props["quantity"]["x-kubernetes-int-or-string"] is True
    assert props["tags"]["x-kubernetes-list-type"] == "set"


class _Tree(BaseModel):
    children: list[_Tree] = Field(default_factory=list)


class _Union(BaseModel):
    value: int | list[int] = 0


@pytest.mark.parametrize("model", [_Tree, _Union])
def test_the_generator_refuses_what_a_structural_schema_cannot_express(
    model: type[BaseModel],
) -> None:
    with pytest.raises(CRDSchemaError):
        model_schema(model)
