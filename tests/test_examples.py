"""The shipped examples: every file validates, and the bring-your-own ones train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sgdjob.api.validation import load_job

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_a_valid_sgdjob(path: Path) -> None:
    load_job(path)


@pytest.mark.parametrize(
    ("name", "steps", "floor"),
    [("custom-model.yaml", 60, 0.6), ("custom-data.yaml", 40, 0.85), ("byo-cnn.yaml", 60, 0.8)],
)
def test_the_bring_your_own_examples_train(
    run_job: Any, monkeypatch: pytest.MonkeyPatch, name: str, steps: int, floor: float
) -> None:
    # Children run `python -m sgdjob` from the current directory: the repository root makes
    # `examples.custom_model` importable, exactly as the README tells users to run it.
    monkeypatch.chdir(EXAMPLES.parent)
    doc = load_job(EXAMPLES / name).model_dump(by_alias=True, mode="json")
    doc["spec"]["training"]["maxSteps"] = steps
    summary, out = run_job(doc)
    assert summary["finalAccuracy"] >= floor
    assert (out / "model.pt").exists()


def test_the_regression_example_trains_and_reports_rmse(
    run_job: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(EXAMPLES.parent)
    doc = load_job(EXAMPLES / "diabetes-regression.yaml").model_dump(by_alias=True, mode="json")
    doc["spec"]["training"]["maxSteps"] = 150
    summary, _ = run_job(doc)
    assert summary["metric"] == "rmse" and summary["finalAccuracy"] is None
    assert summary["finalMetric"] < 0.9  # a constant guess scores about 1.0
