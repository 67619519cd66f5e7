"""Bring your own model and data: entry points named in examples/custom-*.yaml.

The 1-D form of the contract: a model entry point that names ``input_dim`` (given for 1-D
inputs, beside ``input_shape``) and ``num_classes`` gets those and ``spec.model.kwargs``, and
returns a ``torch.nn.Module`` mapping a (batch, input_dim) float tensor to class logits.
A data entry point is called as ``fn(seed=..., **spec.data.kwargs)`` and returns an
``sgdjob.data.Dataset`` (or a (train, test) pair of torch Datasets: see byo_cnn.py). The module must be importable by every trainer process: run
`sgdjob run` from the directory that holds it (locally), or bake it into the trainer image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sgdjob.data import Dataset


class SmallConvNet(nn.Module):
    """A two-layer CNN over square images given as flat vectors (8x8 digits: 64 inputs)."""

    def __init__(self, input_dim: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.side = int(round(input_dim**0.5))
        if self.side * self.side != input_dim:
            raise ValueError(f"SmallConvNet needs a square image, got {input_dim} inputs")
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * (self.side // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))


def conv_net(*, input_dim: int, num_classes: int, channels: int = 8) -> nn.Module:
    return SmallConvNet(input_dim, num_classes, channels)


def wine(*, seed: int, test_fraction: float = 0.3) -> Dataset:
    """sklearn's wine recognition data (13 features, 3 classes), standardised on train."""
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split

    x, y = load_wine(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-8

    def f(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    def i(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(f(x_tr), i(y_tr), f(x_te), i(y_te), num_classes=3)
