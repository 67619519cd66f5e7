"""The examples: each one valid for the pydantic model AND for the generated CRD's schema."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from install_support import CRD_PATH, EXAMPLES, crd_schema, load_yaml, to_jsonschema

from sgdjob.api.validation import SpecError, parse_job

EXPECTED = {
    "digits-sync",
    "digits-backup",
    "digits-async-zhang",
    "digits-async-odena",
    "digits-downpour",
    "digits-onebit",
    "teacher-gpu",
}
FILES = sorted(EXAMPLES.glob("*.yaml"))


def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(to_jsonschema(crd_schema(load_yaml(CRD_PATH))))


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in _validator().iter_errors(doc)
    ]


def test_there_is_one_example_per_mode() -> None:
    assert {f.stem for f in FILES} >= EXPECTED


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_each_example_is_a_valid_sgdjob_for_the_model(path: Path) -> None:
    job = parse_job(load_yaml(path))
    assert job.metadata.name == path.stem


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_each_example_is_valid_against_the_crd_schema(path: Path) -> None:
    assert _crd_errors(load_yaml(path)) == []


def test_each_example_shows_the_feature_it_is_named_after() -> None:
    spec = {f.stem: parse_job(load_yaml(f)).spec for f in FILES}
    sync = spec["digits-sync"]
    assert sync.training.mode == "sync" and sync.model.hidden == [64]
    assert sync.parameter_servers.shards == 2 and sync.workers.replicas == 2
    backup = spec["digits-backup"]
    assert backup.workers.replicas == 3 and backup.training.backup_workers == 1
    assert backup.debug.slow_workers == {3: 50}
    assert spec["digits-async-zhang"].training.staleness == "zhang"
    assert spec["digits-async-odena"].training.staleness == "odena"
    downpour = spec["digits-downpour"].training
    assert (downpour.mode, downpour.fetch_every, downpour.push_every) == ("downpour", 4, 2)
    assert spec["digits-onebit"].compression.kind == "onebit"
    teacher = spec["teacher-gpu"]
    assert teacher.data.builtin == "teacher" and teacher.workers.gpus == 1
    t = teacher.data.teacher
    widths = [t.input_dim, *teacher.model.hidden, t.classes]
    params = sum(a * b + b for a, b in itertools.pairwise(widths))
    assert 1_000_000 <= params <= 10_000_000, params


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["training"].update(lr=-1), "training.lr"),
        (lambda s: s["training"].update(mode="hogwild"), "training.mode"),
        (lambda s: s["workers"].update(replicaz=2), "workers"),
        (lambda s: s["parameterServers"].update(port=80), "parameterServers.port"),
    ],
    ids=["negative-lr", "unknown-mode", "typo", "low-port"],
)
def test_a_broken_example_is_rejected_by_both_the_model_and_the_crd(
    change: Any, field: str
) -> None:
    doc = copy.deepcopy(load_yaml(EXAMPLES / "digits-sync.yaml"))
    change(doc["spec"])
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert any(field.split(".")[0] in p for p in err.value.paths)
    assert any(e.startswith(f"spec.{field}".rsplit(".", 1)[0]) for e in _crd_errors(doc))
