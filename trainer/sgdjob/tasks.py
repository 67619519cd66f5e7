"""Tasks: what a model's output is trained against and how a held-out set is scored.

A ``Task`` names its loss and its metric:

| task | loss | metric (``metric``) | better |
|---|---|---|---|
| ``classification`` | cross-entropy over logits (B, C) | ``accuracy`` | higher |
| ``regression`` | mean squared error (output reshaped to the target's shape) | ``rmse`` | lower |
| ``languageModel`` | next-token cross-entropy over logits (B, T, V) | ``bitsPerToken`` | lower |

A ``custom`` task is a user entry point ``fn(**spec.training.taskKwargs)`` returning a
``Task``: a ``loss(output, target)`` giving the batch's mean loss as a tensor, a
``score(output, target)`` giving (sum of the metric over the batch, number of items it
covers), and the metric's name. ``evaluate`` sums both over the test set; the metric is
``finish(loss mean, score mean)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sgdjob.api.types import TrainingSpec
from sgdjob.entrypoints import load_entry_point

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Score = Callable[[torch.Tensor, torch.Tensor], tuple[float, int]]


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    loss: Loss
    score: Score
    higher_is_better: bool = True
    finish: Callable[[float, float], float] = lambda loss, score: score


@dataclass(frozen=True)
class Evaluation:
    metric: float
    loss: float


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), y)


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    return float((out.argmax(dim=1) == y).sum()), int(y.shape[0])


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float().reshape(y.shape), y.float())


def _squared(out: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    return float(((out.float().reshape(y.shape) - y.float()) ** 2).sum()), int(y.numel())


def _next_token(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))


def _token_nats(out: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    flat = out.float().reshape(-1, out.shape[-1])
    return float(F.cross_entropy(flat, y.reshape(-1), reduction="sum")), int(y.numel())


CLASSIFICATION = Task("classification", "accuracy", _ce, _accuracy)
REGRESSION = Task(
    "regression",
    "rmse",
    _mse,
    _squared,
    higher_is_better=False,
    finish=lambda loss, score: math.sqrt(score),
)
LANGUAGE_MODEL = Task(
    "languageModel",
    "bitsPerToken",
    _next_token,
    _token_nats,
    higher_is_better=False,
    finish=lambda loss, score: score / math.log(2.0),
)
BUILTIN = {t.name: t for t in (CLASSIFICATION, REGRESSION, LANGUAGE_MODEL)}


def load_task(t: TrainingSpec) -> Task:
    if t.task != "custom":
        return BUILTIN[t.task]
    assert t.task_entry_point is not None  # validation guarantees it
    fn = load_entry_point(t.task_entry_point, field="spec.training.taskEntryPoint")
    task = fn(**t.task_kwargs)
    if not isinstance(task, Task):
        raise TypeError(
            f"spec.training.taskEntryPoint must return sgdjob.tasks.Task, not {type(task)}"
        )
    return task


def evaluate(
    model: nn.Module,
    task: Task,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> Evaluation:
    """The task's metric and mean loss over ``batches`` (eval mode, no gradients)."""
    model.eval()
    loss_sum, score_sum, items, count = 0.0, 0.0, 0, 0
    try:
        with torch.no_grad():
            for xb, yb in batches:
                xb, yb = xb.to(device), yb.to(device)
                with autocast():
                    out = model(xb)
                n = int(yb.shape[0])
                loss_sum += float(task.loss(out, yb)) * n
                s, c = task.score(out, yb)
                score_sum += s
                count += c
                items += n
    finally:
        model.train()
    loss = loss_sum / max(1, items)
    return Evaluation(metric=task.finish(loss, score_sum / max(1, count)), loss=loss)
