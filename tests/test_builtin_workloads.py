"""The built-in workloads end to end through `sgdjob run`: Fashion-MNIST on the ResNet-style
CNN with BatchNorm, and the character language model on the standard library's sources.

The acceptance runs (`slow`) are the shipped examples as they are; the default suite runs the
same code paths for a few steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sgdjob.api.validation import load_job
from sgdjob.data import DataError
from sgdjob.data.images import FASHION_DIRS, find_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def fashion_mnist_installed() -> bool:
    try:
        find_dir(FASHION_DIRS, "SGDJOB_FASHION_MNIST_DIR", package="dataset-fashion-mnist")
    except DataError:
        if os.environ.get("CI"):
            raise  # `make tools` must have installed it
        return False
    return True


needs_fashion = pytest.mark.skipif(
    not fashion_mnist_installed(),
    reason="Debian package dataset-fashion-mnist not installed (make tools installs it)",
)


def example(name: str, **training: Any) -> dict[str, Any]:
    doc = load_job(EXAMPLES / name).model_dump(by_alias=True, mode="json")
    doc["spec"]["training"].update(training)
    return doc


def eval_lines(out: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "eval"]


@needs_fashion
def test_the_fashion_mnist_cnn_path_trains_for_a_few_steps(run_job: Any) -> None:
    doc = example(
        "fashion-mnist-cnn.yaml",
        epochs=None,
        maxSteps=40,
        evalInterval=20,
        evalSamples=300,
        schedule={"kind": "cosine", "warmupSteps": 5},
    )
    summary, out = run_job(doc)
    assert summary["version"] == 40 and summary["metric"] == "accuracy"
    assert summary["finalAccuracy"] >= 0.6  # chance is 0.1
    assert [e["metric"] for e in eval_lines(out)] == ["accuracy"] * 3  # steps 0, 20, final


@pytest.mark.slow
@needs_fashion
def test_the_fashion_mnist_cnn_reaches_88_percent_with_2_shards_and_2_sync_workers(
    run_job: Any,
) -> None:
    doc = example("fashion-mnist-cnn.yaml")
    spec = doc["spec"]
    assert spec["parameterServers"]["shards"] == 2 and spec["workers"]["replicas"] == 2
    assert spec["training"]["mode"] == "sync" and spec["model"]["builtin"] == "resnet"
    summary, _ = run_job(doc)
    assert summary["finalAccuracy"] >= 0.88


def test_the_character_language_model_reports_bits_per_byte_and_learns(run_job: Any) -> None:
    doc = example("stdlib-charlm.yaml", maxSteps=40, evalInterval=20, evalSamples=64)
    doc["spec"]["data"]["text"]["maxBytes"] = 1 << 20
    doc["spec"]["training"]["schedule"] = {"kind": "cosine", "warmupSteps": 5}
    summary, out = run_job(doc)
    assert summary["metric"] == "bitsPerToken" and summary["finalAccuracy"] is None
    evals = eval_lines(out)
    assert evals[0]["metric"] == "bitsPerToken"
    assert evals[0]["value"] > 7.0  # step 0: about uniform over 256 bytes
    assert summary["finalMetric"] < 6.0


@pytest.mark.slow
def test_the_character_language_model_gets_below_3_bits_per_byte(run_job: Any) -> None:
    summary, _ = run_job(example("stdlib-charlm.yaml"))
    assert summary["finalMetric"] < 3.0
