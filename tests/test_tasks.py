"""Tasks: each names its metric and scores exact numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sgdjob.api.types import TrainingSpec
from sgdjob.tasks import (
    BUILTIN,
    CLASSIFICATION,
    LANGUAGE_MODEL,
    REGRESSION,
    Task,
    evaluate,
    load_task,
)

CPU = torch.device("cpu")


class Fixed(nn.Module):
    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out[x]


def test_classification_scores_accuracy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    ev = evaluate(
        Fixed(logits), CLASSIFICATION, [(torch.arange(4), torch.tensor([0, 1, 1, 1]))], device=CPU
    )
    assert ev.metric == 0.75


def test_regression_scores_the_root_mean_squared_error() -> None:
    out = torch.tensor([[1.0], [3.0]])
    ev = evaluate(Fixed(out), REGRESSION, [(torch.arange(2), torch.tensor([0.0, 0.0]))], device=CPU)
    assert ev.metric == pytest.approx(math.sqrt(5.0)) and ev.loss == pytest.approx(5.0)


def test_a_language_model_scores_bits_per_token_and_uniform_is_log2_of_the_vocabulary() -> None:
    out = torch.zeros(3, 5, 256)  # uniform logits
    ev = evaluate(
        Fixed(out),
        LANGUAGE_MODEL,
        [(torch.arange(3), torch.zeros(3, 5, dtype=torch.long))],
        device=CPU,
    )
    assert ev.metric == pytest.approx(8.0)


def custom_task(*, scale: float) -> Task:
    return Task(
        "maxError",
        "maxError",
        loss=lambda out, y: ((out - y) ** 2).mean(),
        score=lambda out, y: (float((out - y).abs().sum()) * scale, int(y.numel())),
        higher_is_better=False,
    )


def test_a_custom_task_comes_from_its_entry_point() -> None:
    t = load_task(
        TrainingSpec(
            task="custom",
            task_entry_point="tests.test_tasks:custom_task",
            task_kwargs={"scale": 2.0},
            max_steps=1,
        )
    )
    assert t.metric == "maxError"
    assert load_task(TrainingSpec(task="regression", max_steps=1)) is BUILTIN["regression"]
