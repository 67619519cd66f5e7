"""Shared helpers of the install checks: locating tools, running helm, reading schemas.

A missing tool skips a test with the reason when run by hand and fails it in CI (``CI`` set),
so CI can never pass by silently checking nothing. ``.ci/install-tools.sh`` installs every
tool into ``.tools/bin``.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sgdjob-operator"
CRD_PATH = ROOT / "crds" / "sgdjob.dev_sgdjobs.yaml"
CHART_CRD_PATH = CHART / "files" / "sgdjob.dev_sgdjobs.yaml"
EXAMPLES = ROOT / "examples"
ALL_ON_VALUES = Path(__file__).resolve().parent / "values-all-on.yaml"
TOOLS_BIN = Path(os.environ.get("TOOLS_DIR", ROOT / ".tools")) / "bin"
HELMS = {"helm4": "v4.1.4", "helm3": "v3.17.2"}


def need(what: str, how: str) -> NoReturn:
    """Skip (by hand) or fail (in CI) because ``what`` is unavailable."""
    message = f"{what} is unavailable: {how}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)")
    pytest.skip(message)


def tool(name: str) -> Path:
    """A tool binary: .tools/bin, then the virtual environment's bin, then PATH."""
    candidates = [TOOLS_BIN / name, Path(sys.executable).parent / name]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    need(name, "run .ci/install-tools.sh (installs into .tools/bin)")


def module(name: str) -> Any:
    """Import a Python dev dependency, or skip (by hand) / fail (in CI) without it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        need(f"the Python package {name}", "pip install -e '.[dev]'")


def run(cmd: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; never raises on a non-zero exit."""
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


def helm_template(helm: str, *args: str) -> list[dict[str, Any]]:
    """Render the chart with one helm binary; every non-empty document, parsed."""
    result = run([tool(helm), "template", "sgdjob", CHART, "--namespace", "sgdjob-system", *args])
    assert result.returncode == 0, f"{helm} template failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def crd_schema(crd: dict[str, Any]) -> dict[str, Any]:
    versions = crd["spec"]["versions"]
    assert len(versions) == 1, "one served version expected"
    schema: dict[str, Any] = versions[0]["schema"]["openAPIV3Schema"]
    return schema


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node (path, node) of a structural schema, parents first."""
    if not isinstance(node, dict):
        return
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")


def to_jsonschema(node: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """An OpenAPI v3.0 structural schema as a JSON Schema (draft 7) a validator can use.

    ``nullable`` adds ``null`` to the type, boolean exclusive bounds become numeric, and with
    ``strict`` an object with ``properties`` and no ``x-kubernetes-preserve-unknown-fields``
    rejects unknown fields (the API server would prune them silently, a typo lost).
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "description"):
            continue
        if key == "properties":
            out[key] = {k: to_jsonschema(v, strict=strict) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_jsonschema(value, strict=strict)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            if value:
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[key] = node[bound]
        else:
            out[key] = copy.deepcopy(value)
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if node.get(key):
            out.pop("minimum" if key == "exclusiveMinimum" else "maximum", None)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        strict
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """What the API server's defaulting does to ``obj``: fill absent fields, recursively."""
    if not isinstance(obj, dict) or schema.get("type") != "object":
        if isinstance(obj, list) and isinstance(schema.get("items"), dict):
            return [apply_defaults(schema["items"], item) for item in obj]
        return obj
    out = dict(obj)
    for name, sub in (schema.get("properties") or {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = apply_defaults(sub, out[name])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        known = schema.get("properties") or {}
        out = {k: v if k in known else apply_defaults(extra, v) for k, v in out.items()}
    return out
