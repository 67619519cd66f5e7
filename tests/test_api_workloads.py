"""Validation of the workload fields: each bad combination is named by its field."""

from __future__ import annotations

from typing import Any

import pytest

from sgdjob.api.validation import SpecError, parse_job
from tests.conftest import job_doc

BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"training": {"optimizer": "adam", "nesterov": True}}, "spec.training.nesterov", "sgd"),
    ({"training": {"optimizer": "adamw", "momentum": 0.5}}, "spec.training.momentum", "beta1"),
    ({"training": {"beta2": 0.9}}, "spec.training.beta2", "adam"),
    ({"training": {"nesterov": True, "momentum": 0.0}}, "spec.training.nesterov", "momentum > 0"),
    (
        {"training": {"mode": "async", "staleness": "odena", "optimizer": "adam"}},
        "spec.training.staleness",
        "zhang",
    ),
    ({"training": {"task": "custom"}}, "spec.training.taskEntryPoint", "custom"),
    ({"training": {"task": "regression"}}, "spec.training.task", "digits"),
    ({"training": {"optimizer": "lion"}}, "spec.training.optimizer", ""),
    ({"training": {"precision": "fp8"}}, "spec.training.precision", ""),
    (
        {"training": {"schedule": {"kind": "cosine", "warmupSteps": 60}}},
        "spec.training.schedule.warmupSteps",
        "maxSteps",
    ),
    ({"model": {"builtin": "transformer"}}, "spec.training.task", "languageModel"),
    (
        {"model": {"builtin": "resnet", "resnet": {"channels": [0]}}},
        "spec.model.resnet.channels",
        "1..1024",
    ),
    ({"data": {"builtin": "stdlibText"}}, "spec.training.task", "languageModel"),
    ({"data": {"loaderWorkers": -1}}, "spec.data.loaderWorkers", ""),
    ({"workers": {"gpus": 2}}, "spec.workers.gpus", ""),
]


@pytest.mark.parametrize(
    ("over", "path", "words"), BAD, ids=[b[1] + ":" + str(i) for i, b in enumerate(BAD)]
)
def test_a_bad_workload_setting_is_named_by_its_path(
    over: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(SpecError) as err:
        parse_job(job_doc("bad", **over))
    assert path in err.value.paths, err.value
    assert words in str(err.value)


def test_a_language_model_job_with_adamw_and_a_schedule_validates() -> None:
    job = parse_job(
        job_doc(
            "lm",
            model={"builtin": "transformer", "transformer": {"positions": "rotary"}},
            data={"builtin": "stdlibText"},
            training={
                "task": "languageModel",
                "optimizer": "adamw",
                "momentum": 0.9,
                "schedule": {"kind": "cosine", "warmupSteps": 10},
                "precision": "bf16",
                "gradClipNorm": 1.0,
            },
        )
    )
    assert (
        job.spec.training.optimizer == "adamw" and job.spec.model.transformer.positions == "rotary"
    )
