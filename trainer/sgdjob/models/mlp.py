"""The built-in multilayer perceptron (ReLU), over inputs of any shape (flattened)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def mlp(
    *,
    input_shape: tuple[int, ...],
    hidden: list[int],
    num_classes: int | None = None,
    target_shape: tuple[int, ...] = (),
    **_: Any,
) -> nn.Module:
    """Logits for ``num_classes`` classes, or (regression) one output per target element."""
    width = math.prod(input_shape)
    out = num_classes if num_classes is not None else math.prod(target_shape)
    layers: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)
