"""The built-in `teacher`: a synthetic teacher-student task (no files at all)."""

from __future__ import annotations

import torch

from sgdjob.data.dataset import Dataset


def teacher(
    *, seed: int, input_dim: int, hidden_dim: int, classes: int, train: int, test: int
) -> Dataset:
    """Teacher-student task: Gaussian inputs labelled by the argmax of a fixed random MLP."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(input_dim, hidden_dim, generator=g) / input_dim**0.5
    w2 = torch.randn(hidden_dim, classes, generator=g) / hidden_dim**0.5
    x = torch.randn(train + test, input_dim, generator=g)
    y = (torch.relu(x @ w1) @ w2).argmax(dim=1)
    return Dataset(x[:train].contiguous(), y[:train], x[train:].contiguous(), y[train:], classes)
