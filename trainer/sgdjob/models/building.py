"""Build the job's model: a built-in (one module each) or a user entry point.

The model contract: the entry point is called with keyword arguments

- ``input_shape``: the shape of one input, as a tuple (e.g. ``(1, 28, 28)``);
- ``input_dim``: the same as an int, only when inputs are 1-D (today's contract);
- ``num_classes``: for classification (and the vocabulary for a language model);
- ``target_shape``: for regression, the shape of one target;
- and every key of ``spec.model.kwargs``.

A function that takes ``**kwargs`` gets all of them; one that does not gets only the ones it
names (so ``fn(*, input_dim, num_classes)`` keeps working). It returns a ``torch.nn.Module``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sgdjob.api.types import ModelSpec
from sgdjob.entrypoints import EntryPointError, load_entry_point
from sgdjob.models.mlp import mlp
from sgdjob.models.resnet import resnet
from sgdjob.models.transformer import transformer


class ModelError(ValueError):
    """The model cannot be built for this data; the message names the field."""


def model_kwargs(
    *,
    input_shape: tuple[int, ...],
    num_classes: int | None,
    target_shape: tuple[int, ...],
    task: str,
) -> dict[str, Any]:
    kw: dict[str, Any] = {"input_shape": tuple(input_shape)}
    if len(input_shape) == 1:
        kw["input_dim"] = int(input_shape[0])
    if task == "regression":
        kw["target_shape"] = tuple(target_shape)
    elif num_classes is not None:
        kw["num_classes"] = int(num_classes)
    return kw


def _call(fn: Callable[..., Any], provided: dict[str, Any], extra: dict[str, Any]) -> Any:
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        provided = {k: v for k, v in provided.items() if k in names}
    return fn(**provided, **extra)


def build_model(
    spec: ModelSpec,
    *,
    input_shape: tuple[int, ...],
    num_classes: int | None,
    target_shape: tuple[int, ...] = (),
    task: str = "classification",
    seed: int,
) -> nn.Module:
    """The job's model with deterministic initial weights (same on every process)."""
    torch.manual_seed(seed)
    kw = model_kwargs(
        input_shape=input_shape, num_classes=num_classes, target_shape=target_shape, task=task
    )
    try:
        if spec.builtin == "mlp":
            return mlp(**kw, hidden=list(spec.hidden))
        if spec.builtin == "resnet":
            r = spec.resnet
            return resnet(**kw, channels=list(r.channels), blocks=r.blocks)
        if spec.builtin == "transformer":
            return transformer(**kw, **spec.transformer.model_dump())
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(f"spec.model.builtin: {err}") from None
    assert spec.entry_point is not None
    fn = load_entry_point(spec.entry_point, field="spec.model.entryPoint")
    try:
        model = _call(fn, kw, dict(spec.kwargs))
    except TypeError as err:
        raise EntryPointError(f"spec.model.entryPoint: {err}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"spec.model.entryPoint must return torch.nn.Module, not {type(model)}")
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
